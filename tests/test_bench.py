"""The benchmark harness on a tiny model: every row runs, RNG sweeps per step are counted as designed
(hyft: 3 two-sided, 2 one-sided, plus the looked-up embedding rows; the MeZO algorithm: 4), the split
adds up, and the reports are written.
No timing is asserted."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hyft.config import RunConfig
from hyft.engine import noise
from hyft.engine.zo import select_params
from hyft.methods.params import prepare
from hyft.tools.bench import ROWS, run_bench
from hyft.tools.bench.report import targets
from hyft.tools.bench.rows import fixed_batch


@pytest.fixture(scope="module")
def results(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    res = run_bench(tiny_dir, batch_size=2, seq_len=8, repeats=2, warmup=1, device="cpu", memory=False,
                    out=out, log=lambda _: None)
    return res, out


def test_every_row_runs_and_the_split_adds_up(results):
    res, _ = results
    assert set(res["rows"]) == set(ROWS)
    for row in res["rows"].values():
        sec = row["seconds"]
        assert sec["total"] > 0
        parts = sum(v for k, v in sec.items() if k != "total")
        assert parts == pytest.approx(sec["total"], rel=0.05)  # medians of parts vs median of totals
    assert res["rows"]["fo-peft"]["seconds"]["backward"] > 0
    assert res["rows"]["zo-full"]["seconds"]["perturb"] > 0
    assert res["rows"]["zo-full"]["seconds"]["backward"] == 0


def _padded(n: int) -> int:
    """Random numbers drawn for an n-element tensor: z is made in whole blocks."""
    return -(-n // noise.BLOCK) * noise.BLOCK


def test_rng_sweeps_per_step(results, tiny_dir):
    """hyft: 3 sweeps two-sided, 2 one-sided, plus the embedding rows the lookup draws (exactly the batch's
    tokens); the fused step 3 (in place, no lookups); a 1 % mask 3 % of a sweep; the MeZO algorithm: 4."""
    rows = results[0]["rows"]
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    params = select_params(model)
    numel = sum(p.numel() for _, p in params)
    sweep = sum(_padded(p.numel()) for _, p in params)
    cols = model.get_input_embeddings().weight.shape[1]
    ids = fixed_batch(model.config.vocab_size, 2, 8, torch.device("cpu")).input_ids.unique().tolist()
    lookup = len(ids) * cols  # exactly the looked-up rows
    assert rows["mezo"]["rng_sweeps"] == 4
    assert rows["zo-full"]["zo_numel"] == numel
    for name in ("zo-full", "zo-full-rademacher", "hybrid-two-sided-separate"):
        assert rows[name]["rng_sweeps"] == pytest.approx((3 * sweep + 2 * lookup) / numel), name
    assert rows["hybrid-two-sided"]["rng_sweeps"] == pytest.approx(3 * sweep / numel)  # in place: no lookups
    assert rows["hybrid-one-sided"]["rng_sweeps"] == pytest.approx((2 * sweep + lookup) / numel)
    sparse = rows["zo-full-sparse"]  # 1 % of each tensor, drawn at its positions: + and − and the update
    assert sparse["rng_sweeps"] == pytest.approx(3 * 0.01, rel=0.05)
    _, groups = prepare(AutoModelForCausalLM.from_pretrained(tiny_dir), RunConfig(method="zo-peft"))
    lora = sum(p.numel() for _, p in groups.zo)
    assert rows["zo-peft"]["rng_sweeps"] == pytest.approx(3 * sum(_padded(p.numel()) for _, p in groups.zo) / lora)
    # low-rank: one draw of every matrix's U (m×R) and one of the vectors' z per step (V once per 50 steps)
    matrices = [p for _, p in params if p.dim() == 2]
    per_step = _padded(sum(p.shape[0] * 2 for p in matrices)) + _padded(sum(p.numel() for _, p in params
                                                                          if p.dim() == 1))
    assert rows["zo-lowrank"]["rng_sweeps"] == pytest.approx(per_step / numel)
    assert rows["fo-peft"]["rng_sweeps"] == rows["fo-full"]["rng_sweeps"] == rows["forward"]["rng_sweeps"] == 0
    assert rows["zo-peft"]["zo_numel"] < rows["zo-full"]["zo_numel"] == rows["mezo"]["zo_numel"]


def test_reports_are_written(results):
    res, out = results
    assert json.loads((out / "bench.json").read_text())["setup"]["seq_len"] == 8
    md = (out / "bench.md").read_text()
    assert "MeZO algorithm (reference)" in md and "| target |" in md
    assert (out / "split.png").stat().st_size > 0
    names = [what for what, *_ in targets(res)]
    assert any(n.startswith("zo-full step") for n in names)
    assert any(n.startswith("(hybrid-one-sided − fo-peft)") for n in names)


def test_memory_is_measured_in_fresh_processes(tiny_dir):
    res = run_bench(tiny_dir, batch_size=2, seq_len=8, rows=["forward", "zo-full"], repeats=1, warmup=0,
                    device="cpu", memory=True, log=lambda _: None)
    for row in res["rows"].values():
        assert row["memory"]["peak_rss_mb"] >= row["memory"]["loaded_rss_mb"] > 0
    assert any("peak memory" in what for what, *_ in targets(res))


def test_sweeps_and_launch_counts_are_reported(tiny_dir, tmp_path):
    """The sweep timings cover both generators and their limits; launches are counted per piece, not per
    256 Ki chunk: far fewer than the previous scheme's chunks for a 7B model."""
    res = run_bench(tiny_dir, rows=[], memory=False, out=tmp_path, log=lambda _: None, sweeps=True, launches=True)
    assert set(res["sweeps"]["seconds"]) >= {"counter gaussian", "counter rademacher"}
    la = res["launches"]
    assert la["numel"] > 6.5e9 and la["pieces_per_sweep"] < la["previous_scheme_chunks_per_sweep"] / 20
    assert la["update_sweep"] < 2 * la["previous_scheme_chunks_per_sweep"]
    assert la["lowrank"]["two_sided_step_amortised"] < la["two_sided_step"] / 20  # no per-weight sweeps
    assert "Kernel launches" in (tmp_path / "bench.md").read_text()


def test_on_a_device_the_step_is_also_timed_without_the_splits_synchronisations():
    """The split syncs at every timed boundary (a perturbed module each); the step targets use the unobserved
    time: two syncs around the whole step, the same work, and the boundaries back on afterwards."""
    from hyft.tools.bench import _timed_rows
    from hyft.tools.bench.report import markdown
    from hyft.tools.bench.rows import Row
    from hyft.tools.bench.timing import SplitTimer

    syncs: list[int] = []
    work: list[int] = []
    timer = SplitTimer(sync=lambda: syncs.append(1))
    piece = timer.timed(lambda: work.append(1), "perturb")

    def step() -> None:
        for _ in range(5):
            piece()

    timer.measure(step)
    assert (len(syncs), len(work)) == (2 + 2 * 5, 5)
    syncs.clear()
    assert timer.measure_unobserved(step) >= 0 and (len(syncs), len(work)) == (2, 10)
    assert timer.observing and SplitTimer().synchronising is False
    rows = _timed_rows([Row("forward", "fwd", step, timer)], warmup=0, repeats=2, peaks={}, log=lambda _: None)
    assert "unobserved" in rows["forward"]
    results = {"rows": {"forward": {"label": "fwd", "seconds": {"total": 1.0, "forward": 1.0, "backward": 0.0,
                                                               "perturb": 0.0, "update": 0.0, "other": 0.0},
                                    "unobserved": 0.5, "rng_sweeps": 0.0},
                        "zo-full": {"label": "zo", "seconds": {"total": 2.0, "forward": 1.0, "backward": 0.0,
                                                               "perturb": 0.6, "update": 0.4, "other": 0.0},
                                    "unobserved": 1.3, "rng_sweeps": 3.0}},
               "setup": {"model": "m", "batch_size": 1, "seq_len": 1, "dtype": "float32", "repeats": 2,
                         "warmup": 0, "command": "c"},
               "machine": {"device": "cuda", "gpu": "g", "cores": 1, "torch_threads": 1, "torch": "t"}}
    assert targets(results)[0][:2] == ("zo-full step / two no-grad forwards", pytest.approx(1.3))
    assert "| zo | 1.300 | 2.60 | 2.000 | 1.000 |" in markdown(results)


@pytest.mark.parametrize("precision", ["none", "bfloat16"])
def test_bench_rows_compute_their_forwards_under_the_asked_autocast(tiny_dir, precision):
    """``hyft bench --autocast``: every linear layer of every forward in a row's step computes in that precision."""
    from hyft.tools.bench.rows import build_row

    rows = [build_row(name, tiny_dir, 2, 8, "float32", "cpu", autocast=precision) for name in ROWS]
    seen: set[torch.dtype] = set()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, _i, out: seen.add(out.dtype) if isinstance(m, torch.nn.Linear) else None)
    try:
        for row in rows:
            row.step()
            row.step()  # low-rank rows: the second step's forwards also add the updates' A Vᵀ
    finally:
        handle.remove()
    assert seen == {torch.bfloat16 if precision == "bfloat16" else torch.float32}
