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
    "hybrid": {},
    "zo-full-bf16": {"dtype": "bfloat16"},
    "zo-full-mask": {"zo_mask": "magnitude", "zo_density": 0.2},
    "hybrid-lowrank": {"method": "hybrid", "fused": True, **LOWRANK},
    "zo-full-lowrank-bf16": {"method": "zo-full", "dtype": "bfloat16", **LOWRANK},
}


def config(model: str, case: str, shard_mode: str = "fsdp") -> RunConfig:
    """The run the test also trains in one process, unsharded; a global batch of 4 is 2 examples per rank.
    ε = 0.1: a coefficient divides the loss's float32 rounding (2 shards vs 1 batch) by 2ε."""
    settings = {"method": case.removesuffix("-bf16").removesuffix("-mask"), **CASES[case]}
    return RunConfig(model=model, task="sst2", num_train=24, num_dev=8, num_test=8, steps=5,
                     batch_size=4, eval_every=5, checkpoint_every=2, snapshot_every=2, lr_fo=0.05, lr_zo=1e-3,
                     eps=0.1, optimizer_fo="sgd", zero_shot=False, shard=shard_mode,
                     **{"zo_dist": "gaussian", **settings})


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


def main(model: str, out: Path) -> None:
    dist.init_process_group("gloo")
    z_slices(model, out)
    for case in CASES:
        Trainer(config(model, case), out / case, progress=False).run()
    dist.destroy_process_group()


if __name__ == "__main__":
    assert int(os.environ["WORLD_SIZE"]) == 2
    main(sys.argv[1], Path(sys.argv[2]))
