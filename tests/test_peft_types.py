"""Every peft method through peft's own configs: each type trains with hybrid and fo-peft, resumes exactly,
exports (merged where peft can merge, adapter + tuned base otherwise) and reloads with plain peft to the
same scores; prompt learning is scored exactly (virtual tokens, padding, positions)."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from hyft.config import RunConfig
from hyft.errors import HyftError
from hyft.methods import METHODS
from hyft.methods.params import prepare
from hyft.tasks import get_task, sample_splits
from hyft.tasks.scoring import candidate_scores, encode, padding_for
from hyft.tools.export import export
from hyft.training.loop import Interrupted, Trainer
from tests.conftest import tiny_model

TYPES = ["lora", "ia3", "loha", "lokr", "prefix", "prompt"]
PROMPT_LEARNING = {"prefix", "prompt"}


def config(tiny_dir: str, peft: str, method: str, **overrides) -> RunConfig:
    values = dict(model=tiny_dir, task="sst2", method=method, peft=peft, num_train=16, num_dev=8, num_test=8,
                  steps=3, batch_size=4, eval_every=3, checkpoint_every=2, lr_fo=1e-2, lr_zo=1e-3,
                  zero_shot=False)
    return RunConfig(**{**values, **overrides})


@pytest.mark.parametrize("method", ["hybrid", "fo-peft"])
@pytest.mark.parametrize("peft", TYPES)
def test_peft_type_trains_resumes_exports_and_reloads(peft, method, tiny_dir, tmp_path, monkeypatch):
    reference = Trainer(config(tiny_dir, peft, method), tmp_path / "ref", progress=False)
    results = reference.run()
    _interrupt_and_resume(tiny_dir, peft, method, tmp_path, monkeypatch, results)
    _export_and_reload(reference, peft, tmp_path)


def _interrupt_and_resume(tiny_dir, peft, method, tmp_path, monkeypatch, results) -> None:
    out = tmp_path / "run"
    trainer = Trainer(config(tiny_dir, peft, method), out, progress=False)
    rule, real_step = METHODS[method].rule, METHODS[method].rule.step

    def stopping(self, examples, step):
        stats = real_step(self, examples, step)
        if step == 1:
            trainer._stop = signal.SIGTERM
        return stats

    monkeypatch.setattr(rule, "step", stopping)
    with pytest.raises(Interrupted):
        trainer.run()
    monkeypatch.setattr(rule, "step", real_step)
    resumed = Trainer(config(tiny_dir, peft, method), out, progress=False, resume=True).run()
    rows = lambda d: [json.loads(x).get("loss") for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(out) == rows(tmp_path / "ref") and resumed["test_accuracy"] == results["test_accuracy"]


def _export_and_reload(reference: Trainer, peft: str, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    test = sample_splits(get_task("sst2"), 0, 16, 8, 8).test
    export(tmp_path / "ref", tmp_path / "exp")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "exp" / "base"),
                                       tmp_path / "exp").eval()
    trained = reference.model.eval()
    with torch.no_grad():
        expected = candidate_scores(trained, encode(reference.tokenizer, test, padding_side=padding_for(trained)))
        got = candidate_scores(loaded, encode(reference.tokenizer, test, padding_side=padding_for(loaded)))
    assert torch.equal(got, expected)
    if peft in PROMPT_LEARNING:
        with pytest.raises(HyftError, match="cannot be merged"):
            export(tmp_path / "ref", tmp_path / "merged", merge=True)
    else:
        export(tmp_path / "ref", tmp_path / "merged", merge=True)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        with torch.no_grad():
            assert torch.allclose(candidate_scores(merged, encode(reference.tokenizer, test)), expected, atol=1e-4)


@pytest.mark.parametrize("peft", sorted(PROMPT_LEARNING))
def test_prompt_learning_scores_equal_an_unpadded_hand_computation(peft, tokenizer, examples):
    """Virtual tokens before every row, right padding, no position ids passed: each candidate's score is
    log p(continuation | virtual tokens + context) of one unpadded forward."""
    model, groups = prepare(tiny_model("llama", len(tokenizer)), RunConfig(method="fo-peft", peft=peft))
    with torch.no_grad():
        for _, p in groups.fo:
            p.normal_(0, 0.5)  # a trained-looking prompt, not peft's initialisation
    model.eval()
    assert padding_for(model) == "right"
    with torch.no_grad():
        scores = candidate_scores(model, encode(tokenizer, examples, padding_side="right"), "sum")
        for i, ex in enumerate(examples):
            for k, (context, continuation) in enumerate(ex.pairs()):
                ctx = tokenizer(context).input_ids
                cont = tokenizer(continuation, add_special_tokens=False).input_ids
                logits = model(input_ids=torch.tensor([ctx + cont])).logits[0, -(len(ctx) + len(cont)):]
                logp = logits.log_softmax(-1)
                hand = sum(logp[len(ctx) + j - 1, t].item() for j, t in enumerate(cont))
                assert scores[i, k].item() == pytest.approx(hand, abs=1e-4)
    with pytest.raises(ValueError, match="right-padded"):
        candidate_scores(model, encode(tokenizer, examples, padding_side="left"))


def test_peft_config_file_fields_and_errors(tmp_path, tokenizer):
    dora = tmp_path / "dora.yaml"
    dora.write_text("use_dora: true\nr: 4\n")
    model, _ = prepare(tiny_model("llama", len(tokenizer)),
                       RunConfig(method="fo-peft", peft="lora", peft_config=str(dora)))
    assert model.active_peft_config.use_dora and model.active_peft_config.r == 4
    with pytest.raises(HyftError, match="DoRA"):  # ZO on the base cannot perturb what DoRA reads
        prepared, g = prepare(tiny_model("llama", len(tokenizer)),
                              RunConfig(method="hybrid", peft="lora", peft_config=str(dora)))
        METHODS["hybrid"].rule(prepared, g, None, RunConfig(method="hybrid"), total=1)  # type: ignore[arg-type]
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_field: 3\n")
    with pytest.raises(HyftError, match="bad lora config"):
        prepare(tiny_model("llama", len(tokenizer)), RunConfig(method="fo-peft", peft_config=str(bad)))
    with pytest.raises(HyftError, match="unknown peft method 'lorra'"):
        prepare(tiny_model("llama", len(tokenizer)), RunConfig(method="fo-peft", peft="lorra"))


@pytest.mark.parametrize("peft", ["ia3", "prompt"])
def test_zo_peft_trains_other_peft_types(peft, tiny_dir, tmp_path):
    """ZO on the adapter, in place: the perturbation reaches what peft's layers read (IA3's vectors live in
    a ParameterDict the layer reads itself; the prompt encoder's embedding)."""
    def adapter(lr: float, out: str) -> dict[str, torch.Tensor]:
        t = Trainer(config(tiny_dir, peft, "zo-peft", steps=2, lr_zo=lr, eps=1e-2), tmp_path / out, progress=False)
        t.run()
        return {n: p.detach().clone() for n, p in t.model.named_parameters() if "ia3_" in n or "prompt_encoder" in n}

    trained, untouched = adapter(1e-1, "run"), adapter(0.0, "zero")  # same seed: same initial adapter
    assert trained and any(not torch.equal(p, untouched[n]) for n, p in trained.items())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["zo_coef"] != 0 for r in rows if "zo_coef" in r)  # the perturbation changed the loss
