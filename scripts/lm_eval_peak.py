"""Peak RSS of the longest batches of an LM-loss evaluation (issue #28's Alpaca peak).

An evaluation sorts its examples by length and cuts them into batches in that order, so its last batches are its
longest: 500 held-out examples at 32 a batch end on one of 32 (ranks 449-480) and one of 20 (the 20 longest).
This runs those last ``--batches`` batches as the evaluation forms them, one evaluation call each, and prints
the process's peak RSS (MB = MiB, as everywhere in hyft) and each batch's loss:

    python scripts/lm_eval_peak.py --task alpaca --batch-size 32 --max-length 256   # hyft train's defaults
"""

from __future__ import annotations

import argparse
import resource
import time

from hyft.distributed import Communicator
from hyft.models import load_model
from hyft.tasks import get_task, sample_splits
from hyft.tasks.evaluate import _by_length, evaluate_task


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="alpaca")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=2, help="how many of the last (longest) batches")
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    held_out = sample_splits(task := get_task(args.task), seed=0).get("test")
    order = _by_length(held_out, Communicator())
    batches = [order[lo: lo + args.batch_size] for lo in range(0, len(order), args.batch_size)][-args.batches:]
    model, tokenizer = load_model(args.model)
    print(f"{args.task}: {len(held_out)} held-out examples; {peak_mb():,.0f} MB after loading")
    for batch in batches:
        start = time.perf_counter()
        result = evaluate_task(model, tokenizer, task, [held_out[i] for i in batch], batch_size=args.batch_size,
                               max_length=args.max_length, progress=False)
        print(f"  batch of {len(batch)} (length ranks {order.index(batch[0]) + 1}-{order.index(batch[-1]) + 1}):"
              f" loss {result.metrics['loss']!r}, {time.perf_counter() - start:.1f} s, peak RSS so far"
              f" {peak_mb():,.0f} MB")


if __name__ == "__main__":
    main()
