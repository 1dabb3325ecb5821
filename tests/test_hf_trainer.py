"""hyft.HybridTrainer inside transformers' Trainer: the loss goes down on a tiny in-memory dataset, the ZO
log replays the tuned base bitwise, and a saved checkpoint loads with plain peft (and resumes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, TrainingArguments

import hyft
from hyft.distributed import Communicator
from hyft.errors import HyftError
from hyft.integrations.hf import TokenObjective
from hyft.methods import METHODS
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
    state = torch.load(out / "checkpoint-6" / "hyft_zo_state.pt", weights_only=False)
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


def test_hybrid_trainer_under_torchrun_equals_one_process(tiny_dir, tmp_path):
    """2 ranks (gloo) of 2 examples each vs 1 process of 4, ranks holding different label-token counts: both
    ranks end with bitwise-equal θ and φ, one log of steps + 1 lines, and the losses and ZO coefficients of
    the one-process run (to rounding: per-rank sums vs one sum)."""
    from tests.test_distributed import ENV, torchrun

    steps, worker = 6, str(Path(__file__).with_name("hf_worker.py"))
    proc = subprocess.run(torchrun(worker, tiny_dir, str(tmp_path / "dp"), "2", str(steps)), capture_output=True,
                          text=True, env={**ENV, "PYTHONPATH": str(Path(__file__).parent.parent)}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = subprocess.run([sys.executable, worker, tiny_dir, str(tmp_path / "one"), "4", str(steps)],
                            capture_output=True, text=True, timeout=600,
                            env={**ENV, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert single.returncode == 0, single.stderr[-3000:]
    r0, r1, one = (json.loads((tmp_path / d / f).read_text())
                   for d, f in (("dp", "rank0.json"), ("dp", "rank1.json"), ("one", "rank0.json")))
    assert r0["theta"] == r1["theta"] and r0["phi"] == r1["phi"]  # every rank applied the same updates
    log = (tmp_path / "dp" / "zo_log.jsonl").read_text().splitlines()
    assert len(log) == steps + 1  # rank 0 alone wrote it
    dp_coefs = [json.loads(x)["coef"] for x in log[1:]]
    one_coefs = [json.loads(x)["coef"] for x in (tmp_path / "one" / "zo_log.jsonl").read_text().splitlines()[1:]]
    assert r0["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-6)
    assert dp_coefs == pytest.approx(one_coefs, rel=1e-5, abs=1e-5)
    # φ's gradient is the global token mean too (DDP's average of each rank's share): φ as one process's
    phi_dp, phi_one = torch.load(tmp_path / "dp" / "phi0.pt"), torch.load(tmp_path / "one" / "phi0.pt")
    gap = max((phi_dp[n] - phi_one[n]).abs().max().item() for n in phi_one)
    print(f"largest |2 processes - 1 process| φ gap {gap:.2e}")
    assert gap <= 1e-6


@pytest.mark.parametrize("zo", [dict(zo_mask="magnitude", zo_density=0.1), dict(zo_q=2),
                                dict(zo_dist="lowrank", zo_lazy=4),  # checkpoint-6: updates pending since step 4
                                dict(method="zo-peft", zo_dist="lowrank", zo_lazy=4)])  # A in hyft_zo_state.pt
def test_hybrid_trainer_resumes_masks_and_q_bitwise(zo, tiny_dir, tmp_path):
    """A hybrid run with a sparse mask, or with two directions per step (the separate step), resumed from
    its step-6 checkpoint on a fresh model, ends with bitwise the uninterrupted run's weights and log."""
    def run(out, resume=None):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        args = TrainingArguments(output_dir=str(out), max_steps=10, per_device_train_batch_size=4,
                                 learning_rate=5e-3, save_steps=6, report_to=[], seed=0, use_cpu=True,
                                 disable_tqdm=True, lr_scheduler_type="linear")
        t = hyft.HybridTrainer(model=model, args=args, train_dataset=dataset(tokenizer_of(tiny_dir)),
                               hybrid_args=hyft.HybridArguments(lr_zo=1e-3, eps=1e-2, **zo))
        t.train(resume_from_checkpoint=resume)
        return model

    full = run(tmp_path / "a")
    # the ZO rate follows the Trainer's linear schedule: lr_zo × (1 − step / max_steps), read before each step
    log = [json.loads(x) for x in (tmp_path / "a" / "zo_log.jsonl").read_text().splitlines()[1:]]
    assert [u["lr"] for u in log] == pytest.approx([1e-3 * (1 - u["step"] / 10) for u in log], rel=1e-9)
    resumed = run(tmp_path / "a", resume=str(tmp_path / "a" / "checkpoint-6"))
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_hybrid_trainer_accepts_every_registered_method(tiny_dir, tmp_path):
    for method in METHODS:
        model = AutoModelForCausalLM.from_pretrained(tiny_dir)
        if METHODS[method].uses_peft:
            model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        args = TrainingArguments(output_dir=str(tmp_path / method), max_steps=2, per_device_train_batch_size=4,
                                 learning_rate=1e-3, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
        t = hyft.HybridTrainer(model=model, args=args, train_dataset=dataset(tokenizer_of(tiny_dir)),
                               hybrid_args=hyft.HybridArguments(method=method, lr_zo=1e-3, eps=1e-2))
        t.train()
        assert (tmp_path / method / "zo_log.jsonl").is_file() == (METHODS[method].zo is not None), method


def test_a_fresh_run_into_a_directory_with_a_zo_log_is_refused(tiny_dir, tmp_path):
    _, t = trainer(tiny_dir, tmp_path, steps=1)
    t.train()
    _, again = trainer(tiny_dir, tmp_path, steps=1)
    with pytest.raises(HyftError, match="another run's ZO log"):
        again.train()
    _, told = trainer(tiny_dir, tmp_path, steps=1)
    told.hybrid_args.overwrite_zo_log = True
    told.train()
    assert len((tmp_path / "zo_log.jsonl").read_text().splitlines()) == 2  # replaced, not appended


def test_bf16_training_arguments_run_every_forward_of_the_step_under_autocast(tiny_dir, tmp_path):
    """TrainingArguments(bf16=True) is hyft's --autocast bfloat16: the FO pass and both SPSA points compute in
    bf16 over float32 weights, and the step still updates θ (in float32) and φ."""
    model, t = trainer(tiny_dir, tmp_path, steps=2, bf16=True)
    seen: list[torch.dtype] = []
    layer = next(m for name, m in model.named_modules() if name.endswith("mlp.down_proj"))
    layer.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    assert t.run_config.autocast == "bfloat16"
    # the method's own loss autocasts (before train(), accelerate has not wrapped the model's forward yet)
    objective = TokenObjective(t, Communicator(), wrapped=False)
    objective(objective.encode(t.data_collator(t.train_dataset[:4])))
    assert seen == [torch.bfloat16]
    seen.clear()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t.train()
    assert seen and set(seen) == {torch.bfloat16}, seen
    assert all(p.dtype == torch.float32 for p in model.parameters())
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert any("lora_" in n for n in moved) and any("lora_" not in n for n in moved)


@pytest.mark.parametrize(("kw", "hybrid", "message"), [
    (dict(gradient_accumulation_steps=2), {}, "gradient_accumulation_steps"),
    (dict(fp16=True), {}, "does not support fp16"),
    ({}, dict(method="nosuch"), "must be one of"),
    ({}, dict(zo_dist="uniform"), "zo_dist must be one of"),
])
def test_hybrid_trainer_refuses_in_one_line(kw, hybrid, message, tiny_dir, tmp_path):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)
    with pytest.raises(HyftError, match=message) as err:
        hyft.HybridTrainer(model=model, args=args, train_dataset=[], hybrid_args=hyft.HybridArguments(**hybrid))
    assert "\n" not in str(err.value)


def test_a_first_order_method_resumes_in_the_trainer(tiny_dir, tmp_path):
    """fo-peft writes no ZO log: its checkpoints still carry the method's state and resume."""
    def run(resume=None):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                 learning_rate=1e-3, save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True)
        t = hyft.HybridTrainer(model=model, args=args, train_dataset=dataset(tokenizer_of(tiny_dir)),
                               hybrid_args=hyft.HybridArguments(method="fo-peft"))
        t.train(resume_from_checkpoint=resume)
        return model

    full = run()
    again = run(resume=str(tmp_path / "checkpoint-2"))
    assert not (tmp_path / "zo_log.jsonl").exists()
    for (n, p), (_, q) in zip(full.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_load_best_model_at_end_is_refused(tiny_dir, tmp_path):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, load_best_model_at_end=True,
                             eval_strategy="steps", save_strategy="steps")
    with pytest.raises(HyftError, match="load_best_model_at_end"):
        hyft.HybridTrainer(model=model, args=args, train_dataset=[], eval_dataset=[])


def test_accelerates_fsdp_is_refused_in_one_line_pointing_at_hyft_sharding(tiny_dir, tmp_path):
    """Under a real accelerate FSDP launch (not possible in one CPU process: transformers itself refuses FSDP
    outside distributed training) the Trainer reports is_fsdp_enabled; HybridTrainer then refuses."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = hyft.HybridTrainer(model=model, args=args, train_dataset=[], hybrid_args=hyft.HybridArguments())
    trainer.is_fsdp_enabled = True
    with pytest.raises(HyftError, match="--shard fsdp") as err:
        trainer._refuse_unsupported()
    assert "\n" not in str(err.value)


def test_bf16_autocast_over_bf16_zo_weights_is_refused_in_one_line(tiny_dir, tmp_path):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=True)
    with pytest.raises(HyftError, match="bf16=True autocasts float32 weights") as err:
        hyft.HybridTrainer(model=model, args=args, train_dataset=[])
    assert "\n" not in str(err.value)
