"""Rebuild a fine-tuned base model from the original weights and a run's ZO log (seeds + coefficients),
starting from the run's nearest base snapshot when one is given, on any device."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hyft import rundir
from hyft.engine import masks
from hyft.engine.factory import make_engine
from hyft.engine.zo import ZOLog, canonical_name, select_params
from hyft.engine.zoconfig import ZOConfig
from hyft.errors import HyftError
from hyft.methods import METHODS
from hyft.models import load_model
from hyft.training.snapshots import BaseSnapshots, check_device, rebuild


def replay(model_name: str, log_path: str | Path, out: str | Path | None = None, upto: int | None = None,
           dtype: str | None = None, device: str = "cpu", snapshots: str | Path | None = None,
           log=print) -> nn.Module:
    """Apply the first ``upto`` (default: all) logged updates to ``model_name`` and save it to ``out``.

    ``snapshots``: a run's ``snapshots/`` directory; the nearest one at or below ``upto`` is the start.
    """
    log_path = Path(log_path)
    if not log_path.is_file():
        raise HyftError(f"ZO log not found: {log_path}")
    try:
        header, updates = ZOLog.read(log_path)
    except (ValueError, TypeError, KeyError) as err:
        raise HyftError(f"{log_path}: not a readable hyft ZO log ({err})") from err
    if header["method"] not in METHODS or not METHODS[header["method"]].zo_on_base:
        raise HyftError(f"{log_path}: a {header['method']} log updates PEFT weights, not the base model; "
                        "use the run's adapter/ instead")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HyftError("device cuda requested but CUDA is not available; use --device cpu")
    dtype = dtype or header["dtype"]
    if dtype != header["dtype"]:
        raise HyftError(f"{log_path} was trained in {header['dtype']}; replaying it in {dtype} would not give the "
                        "trained weights (rounding differs); cast the replayed model afterwards instead")
    model, tokenizer = load_model(model_name, dtype, device)
    params = select_params(model, header["zo_params"])
    names = [canonical_name(n) for n, _ in params]
    numel = sum(p.numel() for _, p in params)
    if numel != header["numel"] or names[:1] != header["first"] or names[-1:] != header["last"]:
        raise HyftError(f"{log_path} was written for a different model ({header['model']!r}, "
                        f"{header['numel']:,} ZO weights); {model_name!r} has {numel:,}")
    mask = masks.load(log_path.parent / rundir.MASK_FILE, params) if header.get("zo_mask") else None
    engine = make_engine(model, params, ZOConfig.from_header(header), mask)
    check_device(header, torch.device(device), log)
    upto = len(updates) if upto is None else min(upto, len(updates))
    store = BaseSnapshots(Path(snapshots) if snapshots is not None else log_path.parent / rundir.SNAPSHOTS)
    rebuild(engine, store, updates, upto, original=None)  # the model was just loaded: original weights
    engine.materialize()  # low-rank directions: the pending updates into the weights, as at the end of a run
    if out is not None:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return model



def base_movement(run_dir: str | Path, log=print) -> float:
    """How far a run's ZO updates moved the base at its best-dev state: Σ|θ − θ₀| / Σ|θ₀| over the ZO-trained
    weights (mean |Δθ| / mean |θ|), rebuilt from the run's nearest snapshot and its log."""
    import json

    from hyft.config import RunConfig
    from hyft.rundir import RunDir

    run = RunDir.existing(run_dir)
    config = RunConfig.from_yaml(run.config)
    results = json.loads(run.results.read_text())
    if not config.zo_on_base:
        raise HyftError(f"{run_dir}: a {config.method} run does not train the base by ZO")
    tuned = replay(config.model, run.zo_log, upto=results["zo_log_best_index"], dtype=config.dtype, log=log)
    original, _ = load_model(config.model, config.dtype)
    before = dict(select_params(original, config.zo_params))
    moved = total = 0.0
    for name, p in select_params(tuned, config.zo_params):
        moved += float((p.detach().double() - before[name].detach().double()).abs().sum())
        total += float(before[name].detach().double().abs().sum())
    return moved / total
