"""Run by ``torchrun --nproc-per-node 2`` from test_sharding.py: checks each rank's slice of z against the
unsharded z, then trains zo-full and hybrid with ``shard="fsdp"`` through the library API in one process group."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from hyft.config import RunConfig
from hyft.engine import noise
from hyft.engine.factory import make_engine
from hyft.engine.zo import direction_seed, select_params
from hyft.training.loop import Trainer
from hyft.training.sharding import shard

# bf16: perturbed rows written and restored, residuals per shard; mask: a sparse mask's positions split by
# shard; lowrank: folds of each shard's rows (V held 2 steps: folds at steps 2 and 4), vectors gathered whole,
# and in bf16 each shard's fold residuals
LOWRANK = {"zo_dist": "lowrank", "zo_rank": 2, "zo_lazy": 2}
CASES = {
    "zo-full": {},
    "hybrid": {"zero_shot": True},  # sharded: evaluated after sharding, the fresh adapter switched off
    "zo-full-bf16": {"dtype": "bfloat16"},
    "zo-full-mask": {"zo_mask": "magnitude", "zo_density": 0.2},
    "zo-full-mask-bf16": {"zo_mask": "magnitude", "zo_density": 0.2, "dtype": "bfloat16"},  # residuals per mask
    "hybrid-lowrank": {"method": "hybrid", "fused": True, **LOWRANK},
    "zo-full-lowrank-bf16": {"method": "zo-full", "dtype": "bfloat16", **LOWRANK},
    "fo-full": {"optimizer_fo": "adamw", "lr_fo": 1e-3},  # every weight sharded, saved gathered on rank 0
}


def config(model: str, case: str, shard_mode: str = "fsdp") -> RunConfig:
    """The run the test also trains in one process, unsharded; a global batch of 4 is 2 examples per rank.
    ε = 0.1: a coefficient divides the loss's float32 rounding (2 shards vs 1 batch) by 2ε."""
    settings = {"method": case.removesuffix("-bf16").removesuffix("-mask"), **CASES[case]}
    return RunConfig(model=model, task="sst2", num_train=24, num_dev=8, num_test=8, steps=5,
                     batch_size=4, eval_every=5, checkpoint_every=2, snapshot_every=2, lr_zo=1e-3,
                     eps=0.1, shard=shard_mode,
                     **{"zo_dist": "gaussian", "optimizer_fo": "sgd", "lr_fo": 0.05, "zero_shot": False, **settings})


def z_slices(model_dir: str, out: Path) -> None:
    """Every ZO weight's z as this rank's sharded engine draws it, against the same rows of the whole z."""
    from hyft.distributed import connect

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = shard(model, connect(torch.device("cpu"), sharded=True), torch.device("cpu"))
    params = select_params(model)
    engine = make_engine(model, params, RunConfig(zo_dist="gaussian").zo)
    checked = []
    for i, (name, p) in enumerate(params):
        mine = engine.direction(i, 2026)
        piece, start = engine.views[i]
        whole = noise.direction(p.shape, direction_seed(2026, name), "gaussian", torch.device("cpu")).view(-1)
        checked.append({"name": name, "start": start, "numel": piece.numel(),
                        "equal": bool(torch.equal(mine.view(torch.int32), whole[start:start + piece.numel()]
                                                  .view(torch.int32)))})
    (out / f"z-rank{dist.get_rank()}.json").write_text(json.dumps(checked))


def state_round_trip(model_dir: str, out: Path) -> None:
    """Each engine's state as a snapshot gathers it, in bf16 (residuals kept per shard): residuals set to
    their global flat position mod 97 (a mask's: its index in the whole mask) come back whole and in order, and
    loading whole tensors sets exactly this rank's rows (and residuals; absent ones: zero)."""
    from hyft.distributed import connect
    from hyft.engine import masks, shards
    from hyft.engine.zo import RESIDUAL, canonical_name

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    whole_params = select_params(model)
    mask = masks.magnitude(whole_params, 0.2)  # on the whole model, as a run chooses it
    model = shard(model, connect(torch.device("cpu"), sharded=True), torch.device("cpu"))
    params = select_params(model)
    checked = {}
    for kind, zo, m in (("dense", RunConfig(zo_dist="gaussian").zo, None),
                        ("mask", RunConfig(zo_dist="gaussian").zo, mask),
                        ("lowrank", RunConfig(zo_dist="lowrank").zo, None)):
        engine = make_engine(model, params, zo, m)
        expected = {}
        for i, ((name, p), r) in enumerate(zip(params, engine.residuals, strict=True)):
            if r is None:
                continue
            if m is None:  # rows: the global flat positions of this rank's elements
                _, start = shards.local(p.detach())
                r.view(-1).copy_(torch.arange(start, start + r.numel()) % 97)  # exact in a bf16 residual
                expected[canonical_name(name) + RESIDUAL] = (torch.arange(p.numel()) % 97).float()
            else:  # a mask's values: their index in the whole mask
                r.copy_(torch.arange(engine._before[i], engine._before[i] + r.numel()) % 97)
                expected[canonical_name(name) + RESIDUAL] = (torch.arange(m[i].numel()) % 97).float()
        state = engine.state_tensors()
        set_values = [r.clone() for r in engine.residuals if r is not None]
        gathered = all(torch.equal(state[k].float().reshape(-1), v) for k, v in expected.items())
        weights = all(torch.equal(state[canonical_name(n)], w.detach()) for (n, _), (_, w) in
                      zip(params, whole_params, strict=True))
        engine.load_state_tensors(lambda k, state=state: None if k.endswith(RESIDUAL) else
                                  (state[k] + 1 if k in {canonical_name(n) for n, _ in params} else state.get(k)))
        loaded = all(torch.equal(shards.local(p.detach())[0].reshape(-1),
                                 shards.slice_of(state[canonical_name(n)] + 1, p)) for n, p in params)
        zeroed = all(not r.any() for r in engine.residuals if r is not None)
        engine.load_state_tensors(lambda k, state=state: state.get(k))  # back to the model's own weights
        kept = [r for r in engine.residuals if r is not None]
        restored = all(torch.equal(a, b) for a, b in zip(set_values, kept, strict=True))
        whole = engine.whole_residuals()  # what checkpoint.pt keeps for a ZO group no snapshot holds (zo-peft)
        for r in kept:
            r.zero_()
        engine.load_whole_residuals(whole)
        restored &= all(torch.equal(a, b) for a, b in zip(set_values, kept, strict=True)) and all(
            torch.equal(w.float().reshape(-1), state[canonical_name(n) + RESIDUAL].float().reshape(-1))
            for (n, _), w in zip(params, whole, strict=True) if w is not None)
        getattr(engine, "close", lambda: None)()
        checked[kind] = {"residuals": len(expected), "gathered": gathered, "weights": weights, "loaded": loaded,
                         "zeroed": zeroed, "restored": restored}
    (out / f"state-rank{dist.get_rank()}.json").write_text(json.dumps(checked))


def main(model: str, out: Path) -> None:
    dist.init_process_group("gloo")
    z_slices(model, out)
    state_round_trip(model, out)
    for case in CASES:
        Trainer(config(model, case), out / case, progress=False).run()
    dist.destroy_process_group()


if __name__ == "__main__":
    assert int(os.environ["WORLD_SIZE"]) == 2
    main(sys.argv[1], Path(sys.argv[2]))
