"""The fused CPU kernel for Gaussian directions gives bitwise the torch-op path's z, and is used where it can."""

import shutil

import pytest
import torch

from hyft.engine import cpu_kernel, noise

CAN_BUILD = torch.backends.mkl.is_available() and shutil.which("cc") is not None


@pytest.mark.skipif(not CAN_BUILD, reason="needs a C compiler and torch built with MKL")
def test_kernel_is_built_and_used_where_a_compiler_and_mkl_exist():
    lib = noise.kernel()  # built, loaded and checked against the torch ops
    assert lib is not None and cpu_kernel.active()
    out = torch.empty(4 * noise.BLOCK)
    assert cpu_kernel.gaussian_(lib, out, noise.direction_key(1), 0)
    assert not cpu_kernel.gaussian_(lib, torch.empty(4 * noise.BLOCK, dtype=torch.float64), 1, 0)  # not its layout


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    """No silent ~6x slowdown: a compiler that fails gives one visible warning, and the torch ops take over."""
    monkeypatch.setenv("CC", "false")  # a 'compiler' that always fails
    monkeypatch.setenv("HYFT_CACHE", str(tmp_path))
    cpu_kernel._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built"):
            assert cpu_kernel.library() is None
    finally:
        cpu_kernel._library.cache_clear()


@pytest.mark.skipif(not CAN_BUILD, reason="needs a C compiler and torch built with MKL")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_equals_the_torch_ops_bitwise(threads):
    """Same bits for 64-bit seeds, starts far into a tensor, and any thread count (blocks split over threads)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seed, start in [(0, 0), (7, 1 << 20), ((1 << 63) + 99, 1 << 34), (2**64 - 1, 77 * noise.BLOCK)]:
            key = noise.direction_key(seed)
            ref = noise.gaussian_torch_(torch.empty(noise.CPU_PIECE), key, start)
            mine = torch.full_like(ref, float("nan"))
            assert cpu_kernel.gaussian_(noise.kernel(), mine, key, start // 2)
            assert torch.equal(ref.view(torch.int32), mine.view(torch.int32)), (seed, start)
    finally:
        torch.set_num_threads(saved)
