"""Attach the PEFT module and split parameters once into the ZO group θ and the FO group φ."""

from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig, get_peft_model
from torch import nn

from hyft.config import RunConfig
from hyft.zo import select_params

NamedParams = list[tuple[str, nn.Parameter]]


@dataclass
class ParamGroups:
    """θ: parameters updated from SPSA estimates (no grad, no optimizer state); φ: trained by backprop."""

    zo: NamedParams
    fo: NamedParams

    def describe(self) -> str:
        count = lambda group: sum(p.numel() for _, p in group)  # noqa: E731
        return (f"ZO group θ: {count(self.zo):,} weights in {len(self.zo)} tensors; "
                f"FO group φ: {count(self.fo):,} weights")


def lora_config(config: RunConfig) -> LoraConfig:
    targets = config.lora_targets
    if targets is not None and len(targets) == 1 and targets[0] == "all-linear":
        targets = "all-linear"
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


def prepare(model: nn.Module, config: RunConfig) -> tuple[nn.Module, ParamGroups]:
    """Wrap ``model`` with LoRA when the method trains one, set requires_grad, and return the two groups
    as the method's spec names them (``--zo-params`` filters a ZO group on the base)."""
    spec = config.spec
    if spec.uses_peft:
        model = get_peft_model(model, lora_config(config))
        chosen = {"peft": select_params(model, trainable=True),
                  "base": select_params(model, config.zo_params if spec.zo == "base" else None, trainable=False)}
    else:
        chosen = {"base": select_params(model, config.zo_params if spec.zo == "base" else None)}
    groups = ParamGroups(zo=chosen[spec.zo] if spec.zo else [], fo=chosen[spec.fo] if spec.fo else [])
    fo_ids = {id(p) for _, p in groups.fo}
    for p in model.parameters():
        p.requires_grad_(id(p) in fo_ids)
    return model, groups
