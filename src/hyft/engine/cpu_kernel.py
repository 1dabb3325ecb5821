"""A fused CPU kernel for counter-v3 Gaussian directions (``csrc/counter_gaussian.c``), built on first use.

The torch-op path of :mod:`hyft.engine.noise` makes ~25 passes over a piece's memory; this kernel hashes and
transforms one 512-pair block at a time in cache, calling the same vector math that torch's CPU kernels call
for log, cos and sin (MKL's, exported by libtorch_cpu). It is used only where it is bitwise equal to the
torch-op path: torch built with MKL, and a self-check on load. Anything else (no C compiler, no MKL, a failed
check, ``HYFT_CPU_KERNEL=0``) falls back to the torch ops, which give the same numbers more slowly.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import subprocess
import sysconfig
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "counter_gaussian.c"
# no contraction (products as torch computes them); OpenMP from torch's own libgomp, already loaded
FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared"]
PAIRS_PER_BLOCK = 512


def _flags() -> list[str]:
    """AVX2 for the hashing loop where torch itself runs AVX2 (or wider) kernels on this CPU."""
    wide = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return [*FLAGS, *(["-mavx2"] if wide else [])]


def _torch_lib() -> Path:
    return Path(torch.__file__).parent / "lib"


def _build(cache_dir: Path) -> Path:
    """Compile the kernel once per (source, flags, torch build) into ``cache_dir``; atomic, so concurrent
    processes (torchrun ranks) may race safely."""
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")  # e.g. "ccache gcc"
    flags = _flags()
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([*cc, *flags, torch.__version__]).encode()).hexdigest()
    target = cache_dir / f"counter_gaussian-{digest[:16]}.so"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    lib = _torch_lib()
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        out = Path(tmp) / target.name
        cmd = [*cc, *flags, str(SOURCE), "-o", str(out), f"-L{lib}", "-l:libtorch_cpu.so", f"-Wl,-rpath,{lib}"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.replace(out, target)
    return target


@cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernel, or None where it cannot be used here (the reason goes to the debug log)."""
    if os.environ.get("HYFT_CPU_KERNEL", "1") == "0":
        return None
    if not torch.backends.mkl.is_available():
        log.debug("cpu kernel off: torch is built without MKL, whose vector math the kernel calls")
        return None
    from hyft.models import cache_root

    try:
        lib = ctypes.CDLL(str(_build(cache_root() / "kernels")))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        warnings.warn(f"hyft: the fused CPU kernel for Gaussian directions could not be built ({e}"
                      f"{': ' + detail.decode(errors='replace').strip()[:200] if detail else ''}); falling back "
                      "to torch's ops, which give the same numbers ~6x slower (set HYFT_CPU_KERNEL=0 to silence)",
                      RuntimeWarning, stacklevel=2)
        return None
    fn = lib.hyft_gaussian_blocks
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint64]
    fn.restype = None
    return lib


def _run(lib: ctypes.CDLL, out: Tensor, key: int, first_pair: int) -> None:
    lib.hyft_gaussian_blocks(out.data_ptr(), out.numel() // (2 * PAIRS_PER_BLOCK), key, first_pair)


def gaussian_(lib: ctypes.CDLL, out: Tensor, key: int, first_pair: int) -> bool:
    """Fill the contiguous float32 CPU vector ``out`` (whole blocks) with the Gaussian z of direction ``key``
    from pair ``first_pair`` on; False (``out`` untouched) where the kernel cannot take it."""
    if out.device.type != "cpu" or out.dtype != torch.float32 or not out.is_contiguous():
        return False
    _run(lib, out, key, first_pair)
    return True


def library() -> ctypes.CDLL | None:
    """The built kernel, or None (with one visible warning when a build was expected to work but failed)."""
    return _library()


def active() -> bool:
    """Whether Gaussian directions on CPU can go through the fused kernel in this process (built and loaded;
    :func:`hyft.engine.noise.kernel` also checks it against the torch-op path before using it)."""
    return _library() is not None
