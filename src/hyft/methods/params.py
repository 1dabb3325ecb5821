"""Attach the PEFT module and split parameters once into the ZO group θ and the FO group φ."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peft import PEFT_TYPE_TO_CONFIG_MAPPING, PeftConfig, get_peft_model
from torch import nn

from hyft.engine.zo import select_params
from hyft.errors import HyftError
from hyft.files import read_mapping

if TYPE_CHECKING:
    from hyft.config import RunConfig

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


PEFT_ALIASES = {"prefix": "prefix_tuning", "prompt": "prompt_tuning"}
VIRTUAL_TOKENS = 10  # prompt learning's num_virtual_tokens when the config file does not set it


def peft_config(config: RunConfig) -> PeftConfig:
    """The PEFT module of a run, built with peft's own config class for ``--peft`` (LoRA takes the
    ``lora_*`` flags), then the fields of ``--peft-config``; a field peft rejects is a one-line error."""
    name = PEFT_ALIASES.get(config.peft, config.peft)
    known = {t.value.lower(): t for t in PEFT_TYPE_TO_CONFIG_MAPPING}
    if name not in known:
        raise HyftError(f"unknown peft method {config.peft!r}; peft has {', '.join(sorted(known))} "
                        "(aliases: prefix, prompt)")
    cls = PEFT_TYPE_TO_CONFIG_MAPPING[known[name]]
    values: dict[str, Any] = {"task_type": "CAUSAL_LM"}
    if name == "lora":
        targets = config.lora_targets
        if targets is not None and len(targets) == 1 and targets[0] == "all-linear":
            targets = "all-linear"
        values.update(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets)
    if "num_virtual_tokens" in {f.name for f in dataclasses.fields(cls)}:
        values["num_virtual_tokens"] = VIRTUAL_TOKENS
    if config.peft_config:
        given = read_mapping(config.peft_config, "peft config", "expected a mapping of peft config fields")
        for key, value in given.items():
            problem = _field_type_problem(cls, key, value)
            if problem:
                raise HyftError(f"bad {name} config in {config.peft_config}: {problem}")
        values.update(given)
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise HyftError(f"bad {name} config: {' '.join(str(err).split())}") from err


_SIMPLE = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def _field_type_problem(cls: type, key: str, value: Any) -> str | None:
    """``key: value`` against the peft config class's annotation, for the simple types (int, float, bool, str,
    optionally None) that peft itself does not check: "r must be int, got 'eight'"; None when it fits."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation peft's module cannot resolve: leave the check to peft
        return None
    if key not in hints:
        return None  # peft's own constructor names unknown fields
    kinds = typing.get_args(hints[key]) if typing.get_origin(hints[key]) in (typing.Union, types.UnionType) \
        else (hints[key],)
    if value is None and type(None) in kinds:
        return None
    simple = [k for k in kinds if k in _SIMPLE]
    if not simple or len(simple) != len([k for k in kinds if k is not type(None)]):
        return None  # a richer type (lists, dicts, literals): left to peft
    ok = any(isinstance(value, _SIMPLE[k]) and not (k is not bool and isinstance(value, bool)) for k in simple)
    return None if ok else f"{key} must be {' or '.join(k.__name__ for k in simple)}, got {value!r}"


def prepare(model: nn.Module, config: RunConfig) -> tuple[nn.Module, ParamGroups]:
    """Wrap ``model`` with the PEFT module when the method trains one, then split it into the method's
    two groups (:func:`split_groups`)."""
    spec = config.spec
    if spec.uses_peft:
        module = peft_config(config)
        try:
            model = get_peft_model(model, module)
        except (ValueError, TypeError, KeyError) as err:
            raise HyftError(f"peft cannot attach {module.peft_type.value.lower()} to this model: "
                            f"{' '.join(str(err).split())}") from err
    return model, split_groups(model, spec, config.zo_params)


def split_groups(model: nn.Module, spec: Any, zo_params: str | None = None) -> ParamGroups:
    """The two groups as the method's spec names them ("peft": the adapter's trainable weights, "base": the
    model's own; ``zo_params`` filters a ZO group on the base), with requires_grad set on φ alone."""
    if spec.uses_peft:
        if not hasattr(model, "peft_config"):
            raise HyftError("this method trains a peft model: wrap yours with peft.get_peft_model first")
        # prompt learning wraps the model without a tuner layer (names "base_model.<name>"): take the base's
        # own names there, so that directions, logs and snapshots name tensors as the plain model does
        base = model.get_base_model() if model.active_peft_config.is_prompt_learning else model
        chosen = {"peft": select_params(model, trainable=True),
                  "base": select_params(base, zo_params if spec.zo == "base" else None, trainable=False)}
    else:
        chosen = {"base": select_params(model, zo_params if spec.zo == "base" else None)}
    groups = ParamGroups(zo=chosen[spec.zo] if spec.zo else [], fo=chosen[spec.fo] if spec.fo else [])
    fo_ids = {id(p) for _, p in groups.fo}
    for p in model.parameters():
        p.requires_grad_(id(p) in fo_ids)
    return groups
