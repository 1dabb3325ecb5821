"""Export a finished run to the ecosystem: a standard Hugging Face model directory (merged), or the
fine-tuned base plus a PEFT adapter, loadable with plain transformers and peft."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from peft import PeftModel
from transformers import AutoTokenizer

from hyft.config import RunConfig
from hyft.errors import HyftError
from hyft.models import load_model, model_dir
from hyft.rundir import RunDir
from hyft.tools.replay import replay


def export(run_dir: str | Path, out: str | Path, merge: bool = False) -> Path:
    """Write the run's best-dev model to ``out``.

    ``merge``: one model directory with the PEFT weights folded into the (ZO-tuned) base (LoRA, IA3, LoHa,
    LoKr, ...; prompt learning cannot merge). Otherwise ``out/base`` holds the tuned base and ``out`` the
    adapter, whose config points at ``out/base``: ``PeftModel.from_pretrained`` loads it.
    """
    run = RunDir.existing(run_dir)
    if not run.results.is_file():
        raise HyftError(f"{run_dir} has not finished (no results.json); resume it with hyft train --resume")
    config = RunConfig.from_yaml(run.config)
    results = json.loads(run.results.read_text())
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise HyftError(f"export directory {out} exists and is not empty")
    tokenizer = AutoTokenizer.from_pretrained(model_dir(config.model))
    if config.spec.fo_on_base:
        shutil.copytree(run.model, out, dirs_exist_ok=True)
        return out
    if config.zo_on_base:
        base = replay(config.model, run.zo_log, upto=results["zo_log_best_index"], dtype=config.dtype)
    else:
        base, _ = load_model(config.model, config.dtype)
    if not config.uses_peft:
        base.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return out
    if merge:
        adapter = PeftModel.from_pretrained(base, run.adapter)
        if adapter.active_peft_config.is_prompt_learning:
            raise HyftError(f"{config.peft} adds virtual tokens and cannot be merged into the weights; export "
                            "without --merge (the tuned base plus the adapter, loadable with PeftModel)")
        merged = adapter.merge_and_unload()
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return out
    base.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    shutil.copytree(run.adapter, out, dirs_exist_ok=True)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str((out / "base").resolve())
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    tokenizer.save_pretrained(out)
    return out
