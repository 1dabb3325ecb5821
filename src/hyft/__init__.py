"""hyft: hybrid fine-tuning — zeroth-order updates on the base model, first-order updates on a PEFT module."""

import os

# transformers fetches "hub kernels" (a fused rotary, say) on CUDA when the `kernels` package is installed: a
# download at run time, which fails offline, and arithmetic that a replay elsewhere may not load. Off unless asked.
os.environ.setdefault("USE_HUB_KERNELS", "NO")

from hyft.errors import HyftError
from hyft.models import DEFAULT_MODEL, load_model
from hyft.tasks import Example, get_task, sample_splits
from hyft.tasks.evaluate import EvalResult, evaluate, evaluate_task

__version__ = "0.1.0"


def __getattr__(name: str):
    """``hyft.HybridTrainer`` / ``hyft.HybridArguments``, imported on first use (transformers' Trainer is heavy)."""
    if name in ("HybridTrainer", "HybridArguments"):
        from hyft.integrations import hf

        return getattr(hf, name)
    if name in ("sft_features", "sft_collator"):
        from hyft.integrations import sft

        return getattr(sft, name)
    raise AttributeError(f"module 'hyft' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODEL",
    "EvalResult",
    "Example",
    "HybridArguments",
    "HybridTrainer",
    "HyftError",
    "evaluate",
    "evaluate_task",
    "get_task",
    "load_model",
    "sample_splits",
    "sft_collator",
    "sft_features",
]
