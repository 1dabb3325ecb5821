"""``hyft.HybridTrainer``: hyft's methods inside a ``transformers.Trainer``, for users who bring their own
model, dataset, collator and ``TrainingArguments`` (logging, ``report_to``, saving, evaluation).

Each training step is ``Method.step`` of the registered method (``HybridArguments.method``), the same code
the CLI runs, with every ZO option the CLI has (masks, q directions, estimators, bf16 rounding). Two things
come from the Trainer: φ's optimizer and schedule (the method leaves φ's gradients for it), and the learning
rate schedule, which the ZO rate follows (``lr_zo × current lr / learning_rate``).

**The loss** is the token-weighted mean over the global batch: the sum of every rank's label-token losses
divided by the number of label tokens on all ranks (one all-reduce of a count per step). Both losses of an
SPSA pair and φ's gradient use it, so ``g = (L+ − L−)/2ε`` is the global batch's, the same on every rank;
every rank applies the same update, and rank 0 alone writes ``<output_dir>/zo_log.jsonl``.

Each ZO update is one line of that log, so ``hyft replay`` rebuilds the tuned base from the original
weights, and each Trainer checkpoint holds the ZO state (:mod:`hyft.training.checkpoint`) for resuming.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from hyft import rundir
from hyft.config import RunConfig
from hyft.distributed import Communicator, DataParallel
from hyft.engine import masks, noise
from hyft.engine.zo import ZOLog
from hyft.engine.zoconfig import ZOConfig
from hyft.errors import HyftError
from hyft.methods import METHODS, Method
from hyft.methods.params import split_groups
from hyft.precision import autocast
from hyft.training import checkpoint


@dataclass
class HybridArguments:
    """The method and its ZO side (the FO side is ``TrainingArguments``). The names are the CLI's flags."""

    method: str = "hybrid"  # any of hyft.methods.METHODS: hybrid, zo-full, zo-peft, fo-full, fo-peft
    lr_zo: float = 1e-6  # follows the Trainer's schedule: lr_zo × (current lr / learning_rate)
    eps: float = 1e-3
    estimator: str = "two-sided"
    zo_dist: str = "rademacher"  # or gaussian, or lowrank (U Vᵀ per matrix: zo_rank, zo_lazy)
    zo_rank: int = 2
    zo_lazy: int = 50
    zo_q: int = 1
    zo_combine: str = "mean"
    zo_mask: str | None = None  # magnitude or sensitivity (chosen from the first mask_batches batches)
    zo_density: float = 0.01
    mask_batches: int = 4
    zo_params: str | None = None  # regex on the base model's parameter names; None: every frozen weight
    zo_compensate: bool = True
    zo_rounding: str = "nearest"
    fused: bool = True
    weight_decay_zo: float = 0.0
    seed: int | None = None  # direction seeds; None: TrainingArguments.seed
    overwrite_zo_log: bool = False  # a fresh run into an output_dir that holds a ZO log: replace it


class TokenObjective:
    """The token-weighted loss of the global batch, as this rank's share: a rank's label-token loss sum times
    world / (label tokens on all ranks), so that the mean over ranks (what the method's reduction and DDP's
    gradient averaging compute) is the global batch's mean token loss."""

    def __init__(self, trainer: Trainer, comm: Communicator, wrapped: bool = True):
        self.trainer, self.comm, self.wrapped = trainer, comm, wrapped  # wrapped: DDP's gradient sync

    def encode(self, inputs: dict[str, Any]) -> dict[str, Any]:
        labels = inputs["labels"]
        count = float((labels[..., 1:] != -100).sum()) if labels.dim() > 1 else float(labels.numel())
        (total,) = self.comm.mean([count], group="control")
        return {**inputs, "_scale": 1.0 / total if total else 0.0}  # mean over ranks of count: total / world

    def __call__(self, batch: dict[str, Any]) -> Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "_scale")}
        wrapped = self.trainer.model_wrapped
        model = wrapped if self.wrapped and wrapped is not None else self.trainer.model
        with autocast(self.trainer.run_config.autocast, inputs["input_ids"].device):  # hyft's --autocast
            logits = model(**inputs).logits
        labels = batch["labels"]
        if labels.dim() > 1:  # causal LM: token t predicts label t + 1
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                                 ignore_index=-100, reduction="none")
        # summed in float64: a rank's sum and the one-process sum then differ by far less than an SPSA
        # difference L+ − L− (float32 sums in another order differ by ~1e-7 of the loss, which /2ε magnifies)
        return losses.double().sum() * batch["_scale"]


class HybridTrainer(Trainer):
    """A ``transformers.Trainer`` whose training step is a hyft method's step."""

    def __init__(self, model: nn.Module, args: Any = None, hybrid_args: HybridArguments | None = None,
                 **kwargs: Any):
        super().__init__(model=model, args=args, **kwargs)
        self.hybrid_args = hybrid = hybrid_args or HybridArguments()
        self._refuse_unsupported()
        self.spec = METHODS[hybrid.method]
        self.groups = split_groups(self.model, self.spec, hybrid.zo_params)
        self.run_config = self._run_config()
        self.comm: Communicator = Communicator()
        self.method: Method | None = None  # built in train(): a sensitivity mask needs the data loader
        self.zo_log = ZOLog(Path(self.args.output_dir) / rundir.ZO_LOG)
        self.zo_updates = 0

    # --- set-up -----------------------------------------------------------------------------------
    def _refuse_unsupported(self) -> None:
        """Everything that would train wrongly, refused in one line before any work."""
        hybrid, args = self.hybrid_args, self.args
        if hybrid.method not in METHODS:
            raise HyftError(f"HybridArguments.method must be one of {', '.join(METHODS)}, got {hybrid.method!r}")
        if args.gradient_accumulation_steps != 1:
            raise HyftError("HybridTrainer makes one ZO update per batch: set gradient_accumulation_steps=1 "
                            "and raise per_device_train_batch_size instead")
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            raise HyftError("HybridTrainer does not support accelerate's FSDP or DeepSpeed yet; shard with "
                            "`torchrun ... -m hyft train --shard fsdp`, or use plain data parallel (torchrun)")
        if getattr(args, "load_best_model_at_end", False):
            raise HyftError("HybridTrainer: load_best_model_at_end would roll back the adapter but not the base "
                            "(θ lives in the ZO log); pick the best checkpoint afterwards and replay its zo_updates")
        if args.fp16:
            raise HyftError("HybridTrainer does not support fp16: its loss needs scaling, which the method's "
                            "backward does not do; use bf16=True")
        spec = METHODS[hybrid.method]
        if spec.fo is None and args.world_size > 1:
            raise HyftError(f"{hybrid.method} in HybridTrainer runs on one process (DDP needs a gradient to "
                            "synchronise); for data parallel ZO use torchrun ... hyft train")

    def _run_config(self) -> RunConfig:
        """The method's configuration: HybridArguments and TrainingArguments as the CLI's RunConfig, validated."""
        h, a = self.hybrid_args, self.args
        zo_dtypes = {p.dtype for _, p in self.groups.zo}
        dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(next(iter(zo_dtypes), torch.float32),
                                                                           "float32")
        if self.groups.zo and not zo_dtypes <= set(noise.FULL_PRECISION) | {torch.bfloat16, torch.float16}:
            raise HyftError(f"HybridTrainer cannot perturb weights of dtype {sorted(map(str, zo_dtypes))}")
        values = {f.name: getattr(h, f.name) for f in dataclasses.fields(h)
                  if f.name not in ("seed", "overwrite_zo_log")}
        if a.bf16 and dtype != "float32":
            raise HyftError(f"HybridTrainer: bf16=True autocasts float32 weights, and the ZO weights are {dtype}; "
                            "turn bf16 off (they already compute in it) or load the model in float32")
        # TrainingArguments bf16: the method's forwards (SPSA points included) under the same autocast
        precision = "bfloat16" if a.bf16 else "none"
        values.update(seed=a.seed if h.seed is None else h.seed, dtype=dtype, loss="lm", autocast=precision,
                      steps=max(a.max_steps, 1), lr_fo=a.learning_rate, model=_model_name(self.model))
        return RunConfig.from_dict(values, source="HybridArguments")

    def _build_method(self, resuming: bool) -> Method:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.comm = DataParallel(self.args.device)
        mask = self._mask(resuming) if self.run_config.zo_mask and self.groups.zo else None
        base = self.args.learning_rate

        def rates(group: str, step: int) -> float:
            scheduler = self.lr_scheduler
            factor = scheduler.get_last_lr()[0] / base if scheduler is not None and base else 1.0
            return (self.run_config.lr_zo if group == "zo" else base) * factor

        return self.spec.rule(self.model, self.groups, TokenObjective(self, self.comm), self.run_config,
                              self.run_config.steps, mask, comm=self.comm, rates=rates, external_fo=True)

    def _mask(self, resuming: bool) -> list[Tensor]:
        """The sparse-ZO mask: chosen by rank 0 (sensitivity: from the first ``mask_batches`` training batches)
        and saved beside the log, where replay and every other rank read it."""
        c, path = self.run_config, Path(self.args.output_dir) / rundir.MASK_FILE
        if not resuming and self.is_world_process_zero():
            batches = []
            if c.zo_mask == "sensitivity":  # a plain loader on rank 0 alone (the Trainer's syncs every rank)
                loader = DataLoader(self.train_dataset, batch_size=self.args.per_device_train_batch_size,
                                    collate_fn=self.data_collator)
                for inputs in loader:
                    batches.append(self._prepare_inputs(inputs))
                    if len(batches) == c.mask_batches:
                        break
            objective = TokenObjective(self, Communicator(), wrapped=False)

            def loss(b: int) -> Tensor:
                self.model.train()
                return objective(objective.encode(batches[b % len(batches)]))

            path.parent.mkdir(parents=True, exist_ok=True)
            masks.save(path, self.groups.zo, masks.build(c.zo_mask, self.groups.zo, c.zo_density, loss,
                                                         c.mask_batches))
        self.comm.barrier()
        return masks.load(path, self.groups.zo)

    # --- the step ---------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
                      ) -> torch.Tensor:
        """The method's step on this rank's shard; the Trainer's optimizer then steps φ from its gradients."""
        assert self.method is not None, "HybridTrainer.train() builds the method"
        if self.zo_updates == 0 and self.method.engine is not None and self.is_world_process_zero() \
                and not self.zo_log.path.is_file():
            self.zo_log.path.parent.mkdir(parents=True, exist_ok=True)
            self.zo_log.start(self.run_config.zo_header(self.method.engine, self.args.device.type,
                                                        trainer="transformers"))
        stats = self.method.step(self._prepare_inputs(inputs), self.state.global_step)
        for update in stats.zo_updates:
            if self.is_world_process_zero():
                self.zo_log.append(update)
            self.zo_updates += 1
        model.train()  # the SPSA points ran in eval mode
        return torch.tensor(stats.loss, device=self.args.device)  # non-finite when skipped: the Trainer filters it

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """ZO-only methods have no first-order group: a placeholder the Trainer can step and schedule."""
        if self.groups.fo:
            return super().create_optimizer(model)
        if self.optimizer is None:
            self.optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=self.args.learning_rate)
        return self.optimizer

    # --- checkpoints --------------------------------------------------------------------------------
    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        if self.is_world_process_zero() and folder.is_dir() and self.method is not None:
            engine = self.method.engine  # not sharded here (accelerate's FSDP is refused): residuals are whole
            state = checkpoint.zo_state(self.method, self.zo_updates, engine.whole_residuals()
                                        if engine is not None and not self.spec.zo_on_base else None)
            checkpoint.write_atomic(folder / rundir.ZO_STATE_FILE, state)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """As ``Trainer.train``; resuming also rebuilds the base from the ZO log up to the checkpoint (the
        model must hold the original base weights, as when it was first built)."""
        folder = None
        if resume_from_checkpoint:
            folder = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True \
                else resume_from_checkpoint
            if folder is None or not (Path(folder) / rundir.ZO_STATE_FILE).is_file():
                raise HyftError(f"no HybridTrainer checkpoint to resume in {self.args.output_dir}")
        elif self.zo_log.path.is_file():
            if not self.hybrid_args.overwrite_zo_log:
                raise HyftError(f"{self.zo_log.path} is another run's ZO log: resume it (resume_from_checkpoint), "
                                "use a new output_dir, or set HybridArguments(overwrite_zo_log=True)")
            if self.is_world_process_zero():
                self.zo_log.path.unlink()
        self.method = self._build_method(resuming=folder is not None)
        if folder is not None:
            self._resume_zo(Path(folder))
        output = super().train(resume_from_checkpoint=folder, **kwargs)
        if self.method.engine is not None:
            self.method.engine.materialize()  # low-rank directions: the model holds its trained weights itself
        return output

    def _resume_zo(self, folder: Path) -> None:
        """The ZO state of ``folder``: seeds restored, θ rebuilt from the original weights and the log up to the
        checkpoint, and the log cut there. Refused when it cannot give the checkpoint's weights."""
        assert self.method is not None
        if self.zo_updates:
            raise HyftError("this HybridTrainer has already trained: resume on a fresh model that holds the "
                            "original base weights")
        self.zo_updates = checkpoint.restore_zo_state(self.method, checkpoint.read(folder / rundir.ZO_STATE_FILE))
        if self.method.engine is None:  # first-order only: the Trainer's checkpoint is the whole state
            return
        header, updates = ZOLog.read(self.zo_log.path)
        written = ZOConfig.from_header(header)
        if written != self.run_config.zo or len(updates) < self.zo_updates:
            raise HyftError(f"{self.zo_log.path} does not continue this run (its ZO config {written} against "
                            f"{self.run_config.zo}, {len(updates)} updates for a checkpoint after "
                            f"{self.zo_updates}); resume with the run's own HybridArguments")
        if self.spec.zo_on_base:  # θ is not in the Trainer's checkpoint
            for u in updates[:self.zo_updates]:
                self.method.engine.update(u)
        self.comm.barrier()
        if self.is_world_process_zero():  # lines after the checkpoint belong to steps that will run again
            lines = self.zo_log.path.read_text().splitlines(keepends=True)
            rundir.atomic_write_text(self.zo_log.path, "".join(lines[:1 + self.zo_updates]))


def _model_name(model: nn.Module) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "_name_or_path", "") or "user model"
