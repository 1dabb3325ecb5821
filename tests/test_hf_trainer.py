"""hyft.HybridTrainer inside transformers' Trainer: the loss goes down on a tiny in-memory dataset, the ZO
log replays the tuned base bitwise, and a saved checkpoint loads with plain peft (and resumes)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, TrainingArguments

import hyft
from hyft.errors import HyftError
from hyft.tools.replay import replay


def dataset(tokenizer, n: int = 16) -> list[dict]:
    texts = ["the film was great fun", "a dull and boring mess", "great acting, great story", "boring"] * (n // 4)
    rows = []
    for text in texts:
        ids = tokenizer(text, padding="max_length", max_length=12, truncation=True)
        rows.append({"input_ids": ids.input_ids, "attention_mask": ids.attention_mask,
                     "labels": [t if m else -100 for t, m in zip(ids.input_ids, ids.attention_mask, strict=True)]})
    return rows


def trainer(tiny_dir, out, steps=12, **kw):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=5e-3, logging_steps=1, save_steps=6, report_to=[], seed=0,
                             lr_scheduler_type="constant", use_cpu=True, disable_tqdm=True, **kw)
    return model, hyft.HybridTrainer(model=model, args=args, train_dataset=dataset(tokenizer_of(tiny_dir)),
                                     hybrid_args=hyft.HybridArguments(lr_zo=1e-3, eps=1e-2))


def tokenizer_of(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def test_hybrid_trainer_learns_replays_and_saves(tiny_dir, tmp_path):
    out = tmp_path / "hf"
    model, t = trainer(tiny_dir, out)
    t.train()
    losses = [r["loss"] for r in t.state.log_history if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    log = [json.loads(x) for x in (out / "zo_log.jsonl").read_text().splitlines()]
    assert len(log) == 13 and all(row["coef"] != 0 for row in log[1:])

    base = replay(tiny_dir, out / "zo_log.jsonl", log=lambda *_: None)  # the original + the log
    tuned = {n.removeprefix("base_model.model.").replace(".base_layer.", "."): p
             for n, p in model.named_parameters() if "lora_" not in n}
    changed = 0
    for name, p in base.named_parameters():
        assert torch.equal(p, tuned[name]), name
        changed += not torch.equal(p, AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()[name])
    assert changed > 0  # the base was trained

    # checkpoint-6: its adapter on the base replayed to its ZO state
    state = json.loads((out / "checkpoint-6" / "zo_state.json").read_text())
    at6 = replay(tiny_dir, out / "zo_log.jsonl", upto=state["zo_updates"], log=lambda *_: None)
    loaded = PeftModel.from_pretrained(at6, out / "checkpoint-6")
    assert state["zo_updates"] == 6 and loaded.active_peft_config.r == 4


def test_hybrid_trainer_resumes_from_a_checkpoint_to_the_same_weights(tiny_dir, tmp_path):
    model, t = trainer(tiny_dir, tmp_path / "a")
    t.train()
    again, t2 = trainer(tiny_dir, tmp_path / "a")  # a fresh model with the original weights
    t2.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    for (n, p), (_, q) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n


@pytest.mark.parametrize("method", ["zo-full", "zo-peft"])
def test_zo_methods_run_in_the_trainer_and_replay(method, tiny_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    if method == "zo-peft":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                                 init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1.0,
                             logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                             lr_scheduler_type="constant")
    t = hyft.HybridTrainer(model=model, args=args, train_dataset=dataset(tokenizer_of(tiny_dir)),
                           hybrid_args=hyft.HybridArguments(method=method, lr_zo=1e-3, eps=1e-2))
    t.train()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(("lora_" in n) == (method == "zo-peft") for n in changed)  # only the ZO group moved
    assert len([r for r in t.state.log_history if "loss" in r]) == 4
    if method == "zo-full":
        base = replay(tiny_dir, tmp_path / "zo_log.jsonl", log=lambda *_: None)
        for name, p in base.named_parameters():
            assert torch.equal(p, dict(model.named_parameters())[name]), name


def test_hybrid_trainer_refuses_what_it_cannot_do(tiny_dir, tmp_path):
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(HyftError, match="peft model"):
        hyft.HybridTrainer(model=plain, args=args, train_dataset=[])
