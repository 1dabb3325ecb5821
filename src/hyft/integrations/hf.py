"""``hyft.HybridTrainer``: the hybrid step inside a ``transformers.Trainer``, for users who bring their own
model, dataset, collator and ``TrainingArguments`` (logging, ``report_to``, saving, evaluation).

The model is a ``peft`` model: its trainable adapter is the first-order group φ, trained by the Trainer's
own optimizer and scheduler; the frozen base weights θ get the fused two-sided SPSA step from hyft's
engine (φ's gradient taken at θ+εz, one extra forward at θ−εz). ``HybridArguments(method="zo-full")``
(every weight of any model) and ``"zo-peft"`` (the adapter) run the two-sided SPSA step alone. Each ZO
update is one line of ``<output_dir>/zo_log.jsonl``, so ``hyft replay`` rebuilds the tuned base from the
original weights, and each Trainer checkpoint records how many lines it covers (``zo_state.json``) for
resuming.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from hyft.engine import noise
from hyft.engine.zo import ZOEngine, ZOLog, ZOUpdate, canonical_name, select_params
from hyft.errors import HyftError
from hyft.methods.base import dropout_active

ZO_STATE = "zo_state.json"


@dataclass
class HybridArguments:
    """The ZO side of the hybrid step (the FO side is ``TrainingArguments``)."""

    method: str = "hybrid"  # hybrid (peft model), zo-full (every weight by ZO), zo-peft (the adapter by ZO)
    lr_zo: float = 1e-6  # follows the Trainer's schedule: lr_zo × (current lr / learning_rate)
    eps: float = 1e-3
    zo_dist: str = "rademacher"
    zo_params: str | None = None  # regex on the base model's parameter names; None: every frozen weight
    weight_decay_zo: float = 0.0
    seed: int | None = None  # direction seeds; None: TrainingArguments.seed


class HybridTrainer(Trainer):
    """A ``transformers.Trainer`` whose training step is hyft's fused hybrid step."""

    def __init__(self, model: nn.Module, args: Any = None, hybrid_args: HybridArguments | None = None,
                 **kwargs: Any):
        super().__init__(model=model, args=args, **kwargs)
        self.hybrid_args = hybrid = hybrid_args or HybridArguments()
        if hybrid.method not in ("hybrid", "zo-full", "zo-peft"):
            raise HyftError(f"HybridArguments.method must be hybrid, zo-full or zo-peft, got {hybrid.method!r}")
        if hybrid.method != "zo-full" and not hasattr(self.model, "peft_config"):
            raise HyftError(f"{hybrid.method} trains a peft model: wrap yours with peft.get_peft_model first")
        if self.args.gradient_accumulation_steps != 1:
            raise HyftError("HybridTrainer makes one ZO update per batch: set gradient_accumulation_steps=1 "
                            "and raise per_device_train_batch_size instead")
        if hybrid.method == "hybrid":
            params = select_params(self.model, hybrid.zo_params, trainable=False)
        else:  # no first-order group: the Trainer's optimizer gets nothing to step
            params = select_params(self.model, hybrid.zo_params, trainable=True if hybrid.method == "zo-peft" else None)
            for p in self.model.parameters():
                p.requires_grad_(False)
        if not params or any(p.dtype not in noise.FULL_PRECISION for _, p in params):
            raise HyftError("HybridTrainer needs float32 base weights to perturb in place")
        self.engine = ZOEngine(self.model, params, self.hybrid_args.zo_dist, eps=self.hybrid_args.eps)
        seed = self.args.seed if self.hybrid_args.seed is None else self.hybrid_args.seed
        self.seeds = torch.Generator().manual_seed(seed * 1_000_003 + 17)
        self.zo_log = ZOLog(Path(self.args.output_dir) / "zo_log.jsonl")
        self.zo_updates = 0

    # --- the step ---------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
                      ) -> torch.Tensor:
        """∇φ L(θ+εz, φ) by backprop, L(θ−εz, φ) without grad, θ ← θ + εz − η_zo (g z + λ θ); the
        Trainer's optimizer then steps φ."""
        if not self.zo_log.path.is_file():
            self.zo_log.path.parent.mkdir(parents=True, exist_ok=True)
            self.zo_log.start(self._header())
        eps, seed = self.hybrid_args.eps, int(torch.randint(0, 2**62, (1,), generator=self.seeds).item())
        inputs = self._prepare_inputs(inputs)
        self.engine.shift_(seed, +eps)
        if self.hybrid_args.method == "hybrid":
            model.train()
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            self.accelerator.backward(loss)
            plus = self._eval_loss(model, inputs) if dropout_active(model) else loss.item()
        else:
            plus = self._eval_loss(model, inputs)
        self.engine.shift_(seed, -2 * eps)
        minus = self._eval_loss(model, inputs)
        g = (plus - minus) / (2 * eps)
        if not math.isfinite(g):
            g = 0.0
            model.zero_grad(set_to_none=True)  # no step for either group
        update = ZOUpdate(self.state.global_step, seed, g, lr=self._lr_zo(),
                          weight_decay=self.hybrid_args.weight_decay_zo, shifts=(eps, -2 * eps, eps))
        self.engine.update(update)  # also undoes the last shift
        self.zo_log.append(update)
        self.zo_updates += 1
        if self.hybrid_args.method != "hybrid":
            return torch.tensor((plus + minus) / 2, device=self.args.device)
        return loss.detach()

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """ZO-only methods have no first-order group: a placeholder the Trainer can step and schedule."""
        if self.hybrid_args.method == "hybrid":
            return super().create_optimizer(model)
        if self.optimizer is None:
            self.optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=self.args.learning_rate)
        return self.optimizer

    def _eval_loss(self, model: nn.Module, inputs: dict[str, Any]) -> float:
        model.eval()
        with torch.no_grad(), self.compute_loss_context_manager():
            value = self.compute_loss(model, inputs).item()
        model.train()
        return value

    def _lr_zo(self) -> float:
        scheduler, base = self.lr_scheduler, self.args.learning_rate
        factor = scheduler.get_last_lr()[0] / base if scheduler is not None and base else 1.0
        return self.hybrid_args.lr_zo * factor

    def _header(self) -> dict[str, Any]:
        names = [canonical_name(n) for n, _ in self.engine.params]
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return {"model": getattr(base.config, "_name_or_path", "") or "user model", "method": self.hybrid_args.method,
                "dtype": "float32", "dist": self.engine.dist, "scheme": noise.SCHEME,
                "device": self.engine.params[0][1].device.type, "eps": self.hybrid_args.eps,
                "estimator": "two-sided", "zo_q": 1, "zo_combine": "mean", "zo_mask": None, "zo_compensate": True,
                "zo_params": self.hybrid_args.zo_params, "num_tensors": len(names), "numel": self.engine.numel,
                "first": names[:1], "last": names[-1:], "trainer": "transformers", **asdict(self.hybrid_args)}

    # --- checkpoints --------------------------------------------------------------------------------
    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        if folder.is_dir():
            state = {"zo_updates": self.zo_updates, "seeds": self.seeds.get_state().tolist()}
            (folder / ZO_STATE).write_text(json.dumps(state))

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """As ``Trainer.train``; resuming also rebuilds the base from the ZO log up to the checkpoint (the
        model must hold the original base weights, as when it was first built)."""
        if resume_from_checkpoint:
            folder = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True \
                else resume_from_checkpoint
            if folder is None or not (Path(folder) / ZO_STATE).is_file():
                raise HyftError(f"no hybrid checkpoint to resume in {self.args.output_dir}")
            state = json.loads((Path(folder) / ZO_STATE).read_text())
            _, updates = ZOLog.read(self.zo_log.path)
            for u in updates[:state["zo_updates"]]:
                self.engine.update(u)
            lines = self.zo_log.path.read_text().splitlines(keepends=True)
            self.zo_log.path.write_text("".join(lines[:1 + state["zo_updates"]]))
            self.zo_updates = state["zo_updates"]
            self.seeds.set_state(torch.tensor(state["seeds"], dtype=torch.uint8))
            resume_from_checkpoint = folder
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
