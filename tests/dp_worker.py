"""Run by ``torchrun --nproc-per-node 2`` from test_distributed.py: trains each method once with the library
API inside one process group, then saves this rank's weights so the test can compare the replicas."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

from hyft.config import RunConfig
from hyft.training.loop import Trainer

# case -> RunConfig values; hybrid-lm: the LM loss on COPA's continuations, whose token counts differ by rank;
# zo-lm-mask: a sensitivity mask chosen by rank 0 alone with that loss (its token count is not all-reduced)
CASES = {"hybrid": {"method": "hybrid"}, "zo-full": {"method": "zo-full"}, "fo-peft": {"method": "fo-peft"},
         "hybrid-lm": {"method": "hybrid", "task": "copa", "loss": "lm"},
         "zo-lm-mask": {"method": "zo-full", "task": "copa", "loss": "lm", "zo_mask": "sensitivity",
                        "zo_density": 0.25}}
METHODS = tuple(CASES)


def config(model: str, case: str) -> RunConfig:
    """The run the test also trains in one process; a global batch of 4 is 2 examples per rank."""
    values = {"task": "sst2", **CASES[case]}
    return RunConfig(model=model, num_train=24, num_dev=8, num_test=8, steps=6,
                     batch_size=4, eval_every=6, checkpoint_every=3, lr_fo=0.05, lr_zo=1e-4, eps=1e-2,
                     optimizer_fo="sgd",  # AdamW divides by √v: rounding in near-zero gradients moves φ by ~lr
                     zero_shot=False, **values)


def main(model: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for method in METHODS:
        trainer = Trainer(config(model, method), out / method, progress=False)
        trainer.run()
        weights = {n: p.detach().contiguous() for n, p in trainer.model.named_parameters()}
        save_file(weights, str(out / f"{method}-rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    assert int(os.environ["WORLD_SIZE"]) == 2
    main(sys.argv[1], Path(sys.argv[2]))
