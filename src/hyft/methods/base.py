"""What every update rule shares: the objective on a batch, the two parameter groups' updates, the seed
stream for ZO directions, and the SPSA estimate. A method subclass only writes ``update`` (its step on an
encoded batch)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from transformers import PreTrainedTokenizerBase

from hyft.distributed import Communicator
from hyft.engine.estimators import ESTIMATORS
from hyft.engine.factory import Engine, make_engine
from hyft.engine.zo import ZOUpdate
from hyft.methods.params import ParamGroups
from hyft.methods.schedule import lr_at
from hyft.precision import autocast
from hyft.seeds import derive_seed
from hyft.tasks.base import Example
from hyft.tasks.scoring import (
    Batch,
    Encoded,
    Pieces,
    candidate_scores,
    classification_loss,
    encode,
    encode_pieces,
    lm_loss,
    padding_for,
)

if TYPE_CHECKING:
    from hyft.config import RunConfig


class Objective:
    """The training loss of a batch of Examples: classification (CE over candidates) or LM on the gold.

    With ``micro_batch_size`` below the batch size a minibatch is encoded as length-sorted :class:`Pieces`
    whose weighted losses add up to the whole batch's: the same loss and update up to float rounding (with
    dropout, other masks), with less padding, and :meth:`backward` holds one piece's activations at a time.

    The LM loss under data parallel is the global batch's token mean: this rank's token mean is weighted by
    its share of the scored tokens (one all-reduce of a count), so the mean over ranks, which the methods
    and the gradient averaging take, is Σ token losses / Σ tokens whatever each rank's token count.
    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: RunConfig,
                 comm: Communicator | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.comm = comm or Communicator()
        self.device = next(model.parameters()).device

    def encode(self, examples: Sequence[Example]) -> Encoded:
        c = self.config
        args = (self.tokenizer, examples)
        kwargs = {"max_length": c.max_length, "padding_side": padding_for(self.model), "gold_only": c.loss == "lm"}
        if c.micro_batch_size is not None and c.micro_batch_size < len(examples):
            encoded: Encoded = encode_pieces(*args, c.micro_batch_size, **kwargs).to(self.device)
        else:
            encoded = encode(*args, **kwargs).to(self.device)
        if c.loss == "lm" and self.comm.world > 1:
            return self._token_weighted(encoded)
        return encoded

    def _token_weighted(self, encoded: Encoded) -> Pieces:
        """This rank's LM loss times (its scored tokens / the mean over ranks of scored tokens)."""
        pieces = encoded if isinstance(encoded, Pieces) else Pieces([encoded], [1.0])
        local = float(sum(int(b.target_mask.sum()) for b in pieces.batches))
        (mean,) = self.comm.mean([local], group="control")
        share = local / mean if mean else 0.0
        return Pieces(pieces.batches, [w * share for w in pieces.weights])

    def __call__(self, batch: Encoded) -> Tensor:
        if isinstance(batch, Pieces):
            return sum(w * self.loss(b) for b, w in zip(batch.batches, batch.weights, strict=True))
        return self.loss(batch)

    def loss(self, batch: Batch) -> Tensor:
        """Every training forward (FO and ZO) is this one, so ``autocast`` covers them all; backward runs
        outside it, as torch.autocast asks."""
        with autocast(self.config.autocast, self.device):
            if self.config.loss == "lm":
                return lm_loss(self.model, batch)
            return classification_loss(candidate_scores(self.model, batch, self.config.normalize), batch.gold)

    def backward(self, pieces: Pieces) -> Tensor:
        """Backprop the weighted loss of each piece in turn (gradients accumulate); returns the total loss,
        detached (its graphs are freed piece by piece)."""
        losses = []
        for b, w in zip(pieces.batches, pieces.weights, strict=True):
            loss = w * self.loss(b)
            loss.backward()
            losses.append(loss.detach())  # stays on the device: no host sync per piece
        return torch.stack(losses).sum()


@dataclass
class StepStats:
    loss: float
    lr_fo: float | None = None
    lr_zo: float | None = None
    zo_coef: float | None = None  # the first direction's finite difference g
    zo_updates: list[ZOUpdate] = field(default_factory=list)  # one per direction, in the order applied
    skipped: bool = False  # a non-finite loss or coefficient: no update was applied
    # the FO group's gradient norm before any clip, over the global batch; None where this method stepped no
    # φ itself: no FO group, an external optimizer (HybridTrainer: the Trainer logs it), or a skipped step
    grad_norm: float | None = None


Rates = Callable[[str, int], float]  # (group "fo" | "zo", step) -> learning rate


class Method(ABC):
    """An update rule: built from (model, groups, objective, config); ``step`` turns a batch into an update.

    It is the only code that perturbs, estimates and updates: the CLI's training loop, ``HybridTrainer``,
    ``hyft probe`` and ``hyft bench`` all call it. Two things can come from outside: ``rates`` (the learning
    rate of each group at a step; default: the config's schedules) and, with ``external_fo``, the optimizer
    of φ (``HybridTrainer``: the Trainer's optimizer steps φ from the gradients this step leaves).
    """

    name: str

    def __init__(self, model: nn.Module, groups: ParamGroups, objective: Objective, config: RunConfig, total: int,
                 mask: list[Tensor] | None = None, comm: Communicator | None = None, rates: Rates | None = None,
                 external_fo: bool = False):
        self.model, self.groups, self.objective, self.config, self.total = model, groups, objective, config, total
        # losses are this rank's shard's: ``global_losses`` turns them into the global batch's
        self.comm = comm or Communicator()
        self.engine = build_engine(model, groups, config, mask)
        self.rates = rates
        # does a train-mode loss equal the eval-mode loss (no dropout)? measured on the first batch
        self._deterministic: bool | None = None
        self._batch: Encoded | None = None  # the batch of the current step
        self._grad_norm: float | None = None  # set by ``fo_update``, copied into the step's StepStats
        self.optimizer = self._fo_optimizer() if groups.fo and not external_fo else None
        # ZO direction seeds only; derived from the run seed, so every rank draws the same directions
        self.seeds = torch.Generator().manual_seed(derive_seed(config.seed, "directions"))

    def step(self, examples: Sequence[Example], step: int) -> StepStats:
        """One update from one minibatch (this rank's shard of it)."""
        self._batch = batch = self.objective.encode(examples)
        self._grad_norm = None
        try:
            if self.engine is not None:
                _ = self.train_loss_is_eval_loss  # measured before the step's first forward, once per run
                self.engine.begin(step)  # low-rank directions: a new period folds and redraws V
            stats = self.update(batch, step)
            stats.grad_norm = self._grad_norm
            return stats
        finally:
            self._batch = None  # no reference to the batch's tensors outlives its step

    @abstractmethod
    def update(self, batch: Encoded, step: int) -> StepStats:
        """The update rule on an encoded minibatch."""

    @property
    def train_loss_is_eval_loss(self) -> bool:
        """A train-mode loss is the eval-mode loss (no dropout), so it can be an SPSA point; measured once."""
        if self._deterministic is None:  # every rank must agree: one decides "random" for all
            random = not train_mode_is_eval_mode(self.model, self.objective, self._batch)
            self._deterministic = self.comm.max(int(random)) == 0
        return self._deterministic

    # --- the pieces a step is made of -------------------------------------------------------------
    def _fo_optimizer(self) -> torch.optim.Optimizer:
        params = [p for _, p in self.groups.fo]
        c = self.config
        if c.optimizer_fo == "adamw":
            return torch.optim.AdamW(params, lr=c.lr_fo, weight_decay=c.weight_decay_fo)
        return torch.optim.SGD(params, lr=c.lr_fo, momentum=c.momentum_fo, weight_decay=c.weight_decay_fo)

    def lr_fo(self, step: int) -> float:
        if self.rates is not None:
            return self.rates("fo", step)
        return lr_at(self.config.lr_fo, self.config.schedule_fo, step, self.total, self.config.warmup_fo)

    def lr_zo(self, step: int) -> float:
        if self.rates is not None:
            return self.rates("zo", step)
        return lr_at(self.config.lr_zo, self.config.schedule_zo, step, self.total, self.config.warmup_zo)

    def next_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.seeds).item())

    def global_losses(self, *losses: float, group: str = "zo") -> list[float]:
        """This rank's losses → the global batch's (one all-reduce of a few scalars; identity on one process).
        Every decision (the coefficient, skipping a non-finite step) is then the same on every rank."""
        return self.comm.mean(losses, group)

    def loss_with_grad(self, batch: Encoded) -> Tensor:
        """L(θ, φ; B) with autograd through the FO group only (this rank's shard)."""
        self.model.train()
        if isinstance(batch, Pieces):  # one piece's activations at a time
            return self.objective.backward(batch)
        loss = self.objective(batch)
        loss.backward()
        return loss

    def loss_eval(self, batch: Encoded) -> float:
        """L(θ, φ; B) with no grad, eval mode (dropout off): a point of a finite difference (this rank's shard)."""
        self.model.eval()
        with torch.no_grad():
            return self.objective(batch).item()

    def spsa(self, batch: Encoded, seed: int, loss0: float | None = None) -> tuple[float, float]:
        """SPSA coefficient g for direction z(seed): two-sided (L+ − L−)/2ε, or one-sided (L+ − L0)/ε.

        Every loss of the difference is computed in eval mode (dropout off). ``loss0``, a loss at θ from
        a train-mode pass, is reused for L0 only when the model has no dropout (then it is the same
        number); otherwise L0 is computed here. Also returns the loss at θ: L0 one-sided, (L+ + L−)/2
        two-sided (or ``loss0`` when given).
        """
        assert self.engine is not None
        eps = self.config.eps
        if self.config.estimator == "two-sided":
            plus, minus = self.loss_pair(batch, seed, eps)
            return (plus - minus) / (2 * eps), (plus + minus) / 2 if loss0 is None else loss0
        with self.engine.perturbed(seed, +eps):
            plus = self.loss_eval(batch)
        if loss0 is None or not self.train_loss_is_eval_loss:
            plus, loss0 = self.global_losses(plus, self.loss_eval(batch))
        else:
            (plus,) = self.global_losses(plus)
        return (plus - loss0) / eps, loss0

    def loss_pair(self, batch: Encoded, seed: int, eps: float) -> tuple[float, float]:
        """L(θ+εz(seed)) and L(θ−εz(seed)) over the global batch, eval mode, θ left as it was (``hyft probe``)."""
        assert self.engine is not None
        with self.engine.perturbed(seed, +eps):
            plus = self.loss_eval(batch)
        with self.engine.perturbed(seed, -eps):
            minus = self.loss_eval(batch)
        plus, minus = self.global_losses(plus, minus)
        return plus, minus

    def estimate(self, batch: Encoded, loss0: float | None = None) -> tuple[list[tuple[int, float]], float, float]:
        """``zo_q`` SPSA estimates at the same weights, combined by the ``zo_combine`` estimator: returns
        [(seed, coefficient)] to apply, the first direction's g, and the loss at θ."""
        seeds = [self.next_seed() for _ in range(self.config.zo_q)]  # each z_i is regenerated from its seed
        gs, losses = [], []
        for seed in seeds:
            g, loss = self.spsa(batch, seed, loss0)
            gs.append(g)
            losses.append(loss)
            loss0 = loss if self.config.estimator == "one-sided" else loss0  # L0 once per step
        coefs = ESTIMATORS[self.config.zo_combine](gs) if finite(*gs) else gs
        return list(zip(seeds, coefs, strict=True)), gs[0], sum(losses) / len(losses)

    def fo_update(self, step: int) -> float:
        """φ ← optimizer step with this step's FO learning rate (gradients averaged over ranks); returns the rate.
        The gradient's norm (before clipping) is kept for the step's row: a rising norm is what precedes an
        FO blow-up. With an external optimizer the gradients are left for it (and the Trainer logs the norm)."""
        if self.optimizer is None:
            return self.lr_fo(step)
        params = [p for _, p in self.groups.fo]
        self.comm.average_grads(params)
        # after averaging: the global batch's gradient, clipped in place when asked (the clip returns its norm)
        clipped = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm) if self.config.max_grad_norm \
            else None
        self._grad_norm = self._norm_of_grads(params, clipped)
        lr = self.lr_fo(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def _norm_of_grads(self, params: list[nn.Parameter], norm: Tensor | None) -> float | None:
        """The averaged gradient's norm before any clip (``norm``, when the clip already computed it), read
        before the optimizer step is queued: the step's loss was already read, so on a device the read waits
        for a few norm kernels only. None when no φ weight has a gradient or ``log_grad_norm`` is off."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads or not self.config.log_grad_norm:
            return None
        if norm is None:
            norm = torch.nn.utils.get_total_norm(grads)
        return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()  # FSDP2: the whole gradient's

    def zo_update(self, seed: int, coef: float, step: int, shifts: tuple[float, ...] = ()) -> ZOUpdate:
        """θ ← θ − η_zo (c·z + λ θ), applied in place from the seed; returns the logged update.
        ``shifts``: this direction's in-place perturbations (see :meth:`ZOEngine.shift_`)."""
        assert self.engine is not None
        update = ZOUpdate(step, seed, coef, lr=self.lr_zo(step), weight_decay=self.config.weight_decay_zo,
                          shifts=shifts)
        self.engine.update(update)
        return update

    def restore(self, seed: int, step: int, shifts: tuple[float, ...]) -> ZOUpdate:
        """Undo in-place shifts and nothing else (a skipped step: no learning rate, no weight decay)."""
        assert self.engine is not None
        update = ZOUpdate(step, seed, 0.0, lr=0.0, weight_decay=0.0, shifts=shifts)
        self.engine.update(update)
        return update

    def zo_updates(self, directions: list[tuple[int, float]], step: int) -> list[ZOUpdate]:
        return [self.zo_update(seed, coef, step) for seed, coef in directions]

    def discard_grads(self) -> None:
        """A skipped step: φ's gradients are dropped, so no optimizer (ours or a Trainer's) moves φ."""
        for _, p in self.groups.fo:
            p.grad = None

    # --- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "seeds": self.seeds.get_state(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seeds.set_state(state["seeds"])
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])


def build_engine(model: nn.Module, groups: ParamGroups, config: RunConfig, mask: list[Tensor] | None = None
                 ) -> Engine | None:
    """The ZO engine of a run's ZO group (None without one), with the SPSA points the updates follow."""
    if not groups.zo:
        return None
    return make_engine(model, groups.zo, config.zo, mask)


def train_mode_is_eval_mode(model: nn.Module, objective: Callable[[Encoded], Tensor], batch: Encoded) -> bool:
    """Is the train-mode loss on ``batch`` bitwise the eval-mode loss? Measured, not read from a list of config
    names (functional dropout, layerdrop and router jitter all show up); a dropout module with p > 0 counts
    as random even where it changes nothing yet (peft's lora_dropout before LoRA's B leaves zero). Torch's
    RNG is restored after, so the measurement changes no random stream."""
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return False
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    training = model.training
    try:
        with torch.no_grad():
            model.train()
            train = objective(batch)
            model.eval()
            evaluated = objective(batch)
        return bool(torch.equal(train, evaluated))
    finally:
        model.train(training)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def finite(*values: float | None) -> bool:
    return all(v is None or math.isfinite(v) for v in values)
