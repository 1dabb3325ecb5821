"""The benchmark's rows: each is one kind of training step (or the no-grad forward) on a fixed batch,
built on its own copy of the model, with timing hooks around the pieces a step is made of."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hyft.config import RunConfig
from hyft.engine import masks, noise
from hyft.engine.lowrank import LowRankEngine
from hyft.engine.zo import ZOEngine
from hyft.methods import Objective
from hyft.methods.params import prepare
from hyft.models import load_model
from hyft.tasks.scoring import Batch
from hyft.tools.bench.mezo import MeZOReference
from hyft.tools.bench.timing import SplitTimer, device_sync

# row -> (label, RunConfig overrides); "forward" and "mezo" are not hyft methods
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "forward": ("no-grad forward (inference)", {}),
    "fo-peft": ("fo-peft (LoRA, AdamW)", {"method": "fo-peft"}),
    "fo-full": ("fo-full (AdamW)", {"method": "fo-full", "lr_fo": 1e-6}),
    "zo-full": ("zo-full (hyft engine, Gaussian z)", {"method": "zo-full", "zo_dist": "gaussian", "fused": False}),
    "zo-full-rademacher": ("zo-full, Rademacher z", {"method": "zo-full", "zo_dist": "rademacher", "fused": False}),
    "zo-full-in-place": ("zo-full, in place (default)", {"method": "zo-full"}),
    "zo-full-sparse": ("zo-full, 1 % magnitude mask", {"method": "zo-full", "zo_mask": "magnitude"}),
    "mezo": ("MeZO algorithm (reference)", {"method": "zo-full", "zo_dist": "gaussian", "fused": False}),
    "zo-full-stochastic": ("zo-full, stochastic rounding (bf16: no residual)",
                           {"method": "zo-full", "zo_rounding": "stochastic", "zo_compensate": False}),
    "zo-peft": ("zo-peft (LoRA)", {"method": "zo-peft", "lr_zo": 1e-4, "eps": 1e-2}),
    "hybrid-one-sided": ("hybrid, one-sided", {"method": "hybrid", "estimator": "one-sided"}),
    "hybrid-two-sided": ("hybrid, two-sided, fused (default)", {"method": "hybrid"}),
    "hybrid-two-sided-separate": ("hybrid, two-sided, separate FO pass", {"method": "hybrid", "fused": False}),
    "hybrid-two-sided-gaussian": ("hybrid, two-sided, fused, Gaussian z", {"method": "hybrid", "zo_dist": "gaussian"}),
    "hybrid-stochastic": ("hybrid, two-sided, stochastic rounding (bf16: no residual)",
                          {"method": "hybrid", "zo_rounding": "stochastic", "zo_compensate": False}),
    "hybrid-sparse": ("hybrid, two-sided, fused, 1 % magnitude mask", {"method": "hybrid", "zo_mask": "magnitude"}),
    "zo-lowrank": ("zo-full, low-rank directions (rank 2, V held 50)", {"method": "zo-full", "zo_dist": "lowrank"}),
    "hybrid-lowrank": ("hybrid, fused, low-rank directions (rank 2, V held 50)",
                       {"method": "hybrid", "zo_dist": "lowrank"}),
}


@dataclass
class Row:
    name: str
    label: str
    step: Callable[[], None]
    timer: SplitTimer = field(default_factory=SplitTimer)
    zo_numel: int = 0  # ZO parameters: one RNG sweep draws this many numbers
    generated: Callable[[], int] = lambda: 0  # a counter of random numbers drawn (read before and after a step)
    temporary: Callable[[], int] = lambda: 0  # the largest perturbed temporary so far (elements)


def fixed_batch(vocab: int, batch_size: int, seq_len: int, device: torch.device, seed: int = 0) -> Batch:
    """A [batch, seq] batch of random token ids scored as a 2-way classification on the last position,
    which is exactly the work of a training step on SST-2-style tasks at that shape."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
    ones = torch.ones_like(ids)
    return Batch(
        input_ids=ids, attention_mask=ones, position_ids=torch.arange(seq_len).expand(batch_size, -1).clone(),
        target_mask=torch.zeros_like(ids, dtype=torch.bool), num_candidates=[2] * batch_size,
        gold=torch.randint(0, 2, (batch_size,), generator=gen), keep=1,
        candidate_ids=torch.randint(0, vocab, (batch_size, 2), generator=gen),
    ).to(device)


class _FixedObjective:
    """The method's objective, fed the fixed batch and timed as the forward pass."""

    def __init__(self, objective: Objective, batch: Batch, timer: SplitTimer):
        self.objective, self.batch = objective, batch
        self.call = timer.timed(objective.__call__, "forward")

    def encode(self, _examples: object) -> Batch:
        return self.batch

    def __call__(self, batch: Batch) -> Tensor:
        return self.call(batch)


class _Temporaries:
    """The largest perturbed temporary (elements) made since the last reset: whole tensors and row blocks."""

    def __init__(self) -> None:
        self.peak = 0

    def wrap(self, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.peak = max([self.peak, *(o.numel() for o in (out if isinstance(out, list) else [out]))])
            return out
        return wrapped


def build_row(name: str, model_name: str, batch_size: int, seq_len: int, dtype: str, device: str,
              timed: bool = True, autocast: str = "none") -> Row:
    """One row on a fresh copy of the model (steps change weights; rows must not share them); ``autocast``:
    every forward of the row in that precision (``--autocast``)."""
    if name not in ROWS:
        raise ValueError(f"unknown benchmark row {name!r}; choose from {', '.join(ROWS)}")
    label, overrides = ROWS[name]
    config = RunConfig(model=model_name, dtype=dtype, device=device, autocast=autocast, **overrides)
    model, tokenizer = load_model(model_name, dtype, device)
    dev = next(model.parameters()).device
    batch = fixed_batch(len(tokenizer), batch_size, seq_len, dev)
    timer = SplitTimer(sync=device_sync(dev), enabled=timed)
    if name == "forward":
        model.eval()
        objective = Objective(model, tokenizer, config)
        forward = timer.timed(objective.__call__, "forward")

        def step() -> None:
            with torch.no_grad():
                forward(batch)

        return Row(name, label, step, timer)
    if name == "mezo":
        return _mezo_row(name, label, model, tokenizer, config, batch, timer)
    model, groups = prepare(model, config)
    objective = _FixedObjective(Objective(model, tokenizer, config), batch, timer)
    mask = masks.build(config.zo_mask, groups.zo, config.zo_density) if config.zo_mask else None
    method = config.spec.rule(model, groups, objective, config, total=10_000, mask=mask)  # type: ignore[arg-type]
    method.loss_with_grad = timer.timed(method.loss_with_grad, "backward")  # exclusive of the forward inside
    temporaries = _Temporaries()
    if method.engine is not None:
        engine = method.engine
        if isinstance(engine, ZOEngine):
            engine._perturbed_values = timer.timed(temporaries.wrap(engine._perturbed_values), "perturb")
            engine._perturbed_rows = timer.timed(temporaries.wrap(engine._perturbed_rows), "perturb")
            engine._perturbed_lookup = timer.timed(engine._perturbed_lookup, "perturb")  # batch-sized rows
            engine.shift_ = timer.timed(engine.shift_, "perturb")  # the fused step's in-place shifts
        elif isinstance(engine, LowRankEngine):  # M = A + s·U/√R and the perturbed vectors; folds at new periods
            engine._refresh = timer.timed(engine._refresh, "perturb")
            engine.begin = timer.timed(engine.begin, "update")
        else:  # in place at the masked positions (shifts included)
            engine._set = timer.timed(engine._set, "perturb")
            engine._restore = timer.timed(engine._restore, "perturb")
        engine.update = timer.timed(engine.update, "update")
    if method.optimizer is not None:
        method.optimizer.step = timer.timed(method.optimizer.step, "update")
    steps = iter(range(10**9))

    def step() -> None:
        method.step([], next(steps))

    return Row(name, label, step, timer, method.engine.numel if method.engine else 0, noise.drawn,
               lambda: temporaries.peak)


def _mezo_row(name: str, label: str, model: nn.Module, tokenizer, config: RunConfig, batch: Batch,
              timer: SplitTimer) -> Row:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    objective = Objective(model, tokenizer, config)
    loss = timer.timed(lambda: objective(batch), "forward")
    params = list(model.parameters())  # tied weights once, as named_parameters() dedups them
    ref = MeZOReference(params, loss, eps=config.eps, lr=config.lr_zo)
    ref.perturb = timer.timed(ref.perturb, "perturb")
    ref.update = timer.timed(ref.update, "update")
    return Row(name, label, ref.step, timer, sum(p.numel() for p in params), lambda: ref.generated)
