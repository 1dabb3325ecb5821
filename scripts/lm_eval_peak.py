"""Peak RSS of one LM-loss evaluation batch: the N longest of a task's held-out examples, the batch a full
evaluation ends on (examples are evaluated in length order). Explains the Alpaca run's 8.0 GB (issue #28):

    python scripts/lm_eval_peak.py --task alpaca --rows 32      # 32 = hyft train's default --eval-batch-size
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
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()
    held_out = sample_splits(task := get_task(args.task), seed=0).get("test")
    longest = [held_out[i] for i in _by_length(held_out, Communicator())[-args.rows:]]
    model, tokenizer = load_model(args.model)
    loaded, start = peak_mb(), time.perf_counter()
    result = evaluate_task(model, tokenizer, task, longest, batch_size=args.rows, max_length=args.max_length,
                           progress=False)
    print(f"{args.task}: the {args.rows} longest of {len(held_out)} held-out examples in one batch: peak RSS "
          f"{peak_mb():,.0f} MB ({loaded:,.0f} MB after loading), {time.perf_counter() - start:.1f} s, "
          f"{result.metrics}")


if __name__ == "__main__":
    main()
