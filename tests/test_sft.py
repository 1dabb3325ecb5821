"""Generative tasks: TRL SFT formats, the loss on completion tokens only, chat templates, the SQuAD article
split, and the LM and generation metrics through the same evaluation code the trainer uses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hyft.tasks import get_task, sample_splits, sft
from hyft.tasks.base import Chat, Example
from hyft.tasks.evaluate import evaluate_generation, evaluate_lm, evaluate_task
from hyft.tasks.generation import generate
from hyft.tasks.metrics import exact_match, f1
from hyft.tasks.scoring import completion_ids, context_ids, encode, lm_loss, render_chat

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize(("row", "context", "completion"), [
    ({"prompt": "2 + 2 =", "completion": " 4"}, "2 + 2 =", " 4"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
     Chat((("user", "hi"),)), "hello"),
    ({"text": "the quick brown fox"}, "", "the quick brown fox"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]},
     Chat((("user", "q"),)), "a"),
])
def test_trl_formats_become_a_context_and_one_completion(row, context, completion):
    ex = sft.example(row)
    assert (ex.context, ex.candidates, ex.gold) == (context, (completion,), 0)


def test_a_row_in_no_trl_format_is_named():
    with pytest.raises(ValueError, match="'prompt' and 'completion', 'messages' or 'text'"):
        sft.example({"question": "q"})


def test_the_lm_loss_covers_completion_tokens_only(tokenizer):
    """The loss of a (prompt, completion) example is the mean cross-entropy of the completion's tokens,
    computed here by hand from the logits; prompt tokens never enter it."""
    from tests.conftest import tiny_model

    model = tiny_model("llama", len(tokenizer))
    examples = [Example("it was a wonderful film . it was", (" great great",), 0),
                Example("Question: does the pronoun refer to the man? Answer:", (" Yes",), 0)]
    batch = encode(tokenizer, examples, gold_only=True, padding_side="right")
    got = lm_loss(model, batch).item()
    losses = []
    for ex in examples:
        ctx = context_ids(tokenizer, ex.context)
        cont = completion_ids(tokenizer, ex.context, ex.candidates[0])
        ids = torch.tensor([ctx + cont])
        logits = model(ids).logits[0, len(ctx) - 1: -1]
        losses.append(F.cross_entropy(logits, torch.tensor(cont), reduction="none"))
    assert got == pytest.approx(torch.cat(losses).mean().item(), rel=1e-5)
    assert batch.target_mask.sum().item() == sum(len(x) for x in losses)


def test_chat_completions_end_with_the_templates_end_of_turn(tokenizer):
    tok = tokenizer
    tok.chat_template = TEMPLATE
    try:
        chat = Chat((("user", "hi"),))
        prompt = render_chat(tok, chat)
        assert prompt.endswith("<|im_start|>assistant\n")
        tail = tok.decode(completion_ids(tok, chat, "hello"))
        assert tail == "hello<|im_end|>\n"  # the model learns to close its turn
    finally:
        tok.chat_template = None
    assert render_chat(tok, chat).endswith("user: hi\nassistant:")  # no template: role lines


def test_an_empty_context_still_predicts_the_first_token(tokenizer):
    assert context_ids(tokenizer, "")  # BOS, or EOS when the tokenizer has no BOS


def test_squad_splits_by_article_and_alpaca_has_disjoint_held_out_data():
    squad = get_task("squad")
    train, test = squad.read("train"), squad.read("validation")
    assert (len(train), len(test)) == (3199, 801)
    titles = lambda exs: {ex.context.split("\n")[0] for ex in exs}  # noqa: E731  "Title: ..."
    assert not titles(train) & titles(test)  # no article (so no context) in both
    assert all(ex.context.endswith("\nAnswer:") and ex.answers for ex in test)
    assert squad.kind == "generate" and get_task("alpaca").kind == "lm"
    alpaca = get_task("alpaca")
    a_train, a_test = alpaca.read("train"), alpaca.read("validation")
    assert (len(a_train), len(a_test)) == (4997, 500)  # 3 training rows have an empty output
    assert not {ex.context for ex in a_train} & {ex.context for ex in a_test}
    splits = sample_splits(squad, 0, 100, 20, 50)
    assert len(splits.test) == 50 and not titles(splits.train) & titles(splits.test)


def test_held_out_loss_is_token_weighted_over_batches(tokenizer):
    from tests.conftest import tiny_model

    model = tiny_model("llama", len(tokenizer))
    examples = [Example("a", (" great terrible great",), 0), Example("the quick brown fox", (" No",), 0),
                Example(Chat((("user", "hi"),)), ("Yes Yes",), 0)]
    one = evaluate_lm(model, tokenizer, examples, batch_size=3, progress=False)
    split = evaluate_lm(model, tokenizer, examples, batch_size=1, progress=False)
    assert one.metrics["loss"] == pytest.approx(split.metrics["loss"], rel=1e-6)
    assert one.metrics["perplexity"] == pytest.approx(math.exp(one.metrics["loss"]))
    assert one.score == -one.metrics["loss"]  # best-dev selection maximises minus the loss


def test_generation_metrics_are_squads_over_every_gold_answer(tokenizer):
    from tests.conftest import tiny_model

    model = tiny_model("llama", len(tokenizer))
    examples = [Example(p, (" x",), 0, answers=a) for p, a in
                [("the quick brown", ("fox", "a fox")), ("it was a", ("great", "wonderful film"))]]
    result = evaluate_generation(model, tokenizer, examples, batch_size=2, max_new_tokens=4, progress=False)
    answers = generate(model, tokenizer, [ex.context for ex in examples], max_new_tokens=4, batch_size=1)
    expected_f1 = sum(f1(a, ex.answers) for a, ex in zip(answers, examples, strict=True)) / 2
    expected_em = sum(exact_match(a, ex.answers) for a, ex in zip(answers, examples, strict=True)) / 2
    assert result.metrics == pytest.approx({"f1": expected_f1, "exact_match": expected_em})
    assert result.predictions == [a.strip() for a in answers]


def test_custom_generate_and_sft_tasks(tmp_path, tokenizer):
    import json

    rows = [{"question": f"q{i}", "answers": [f"a{i}", "b"]} for i in range(8)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "qa.yaml").write_text("kind: generate\ntrain: qa.jsonl\ntest: qa.jsonl\n"
                                      "template: \"Question: {question}\\nAnswer:\"\nanswer_field: answers\n")
    task = get_task(str(tmp_path / "qa.yaml"))
    ex = task.read("train")[0]
    assert (task.kind, ex.context, ex.candidates, ex.answers) == ("generate", "Question: q0\nAnswer:", (" a0\n",),
                                                                  ("a0", "b"))
    trl = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 4
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trl))
    (tmp_path / "chat.yaml").write_text("kind: sft\ntrain: chat.jsonl\ntest: chat.jsonl\n")
    chat = get_task(str(tmp_path / "chat.yaml"))
    assert chat.kind == "lm" and chat.read("train")[0].context == Chat((("user", "hi"),))
    from tests.conftest import tiny_model

    result = evaluate_task(tiny_model("llama", len(tokenizer)), tokenizer, chat, chat.read("validation"),
                           progress=False)
    assert set(result.metrics) == {"loss", "perplexity"}


def test_hybrid_trainer_sft_example_on_trl_rows(tiny_dir, tmp_path):
    """The README's SFT example on a tiny model: TRL messages and prompt/completion rows, labels -100 on the
    prompt, and the hybrid step lowers the completion loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    import hyft

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    rows = [{"messages": [{"role": "user", "content": "it was a wonderful film"},
                          {"role": "assistant", "content": "great"}]},
            {"prompt": "a boring mess . It was", "completion": " terrible"}] * 8
    features = hyft.sft_features(rows, tok, max_length=64)
    first = features[1]
    prompt = len(tok("a boring mess . It was").input_ids)
    assert first["labels"][:prompt] == [-100] * prompt and first["labels"][prompt:] == first["input_ids"][prompt:]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4,
                             learning_rate=5e-3, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                             save_strategy="no")
    trainer = hyft.HybridTrainer(model=model, args=args, train_dataset=features,
                                 data_collator=hyft.sft_collator(tok),
                                 hybrid_args=hyft.HybridArguments(lr_zo=1e-3, eps=1e-2))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


def test_training_on_a_generation_task_selects_and_plots_by_f1(tiny_dir, tmp_path):
    """`hyft train` on a QA-by-generation task: dev rows, best-dev selection, results and the dev plot use F1."""
    import json

    from hyft.cli import main

    rows = [{"question": f"q{i}", "answers": [f"a{i}"]} for i in range(16)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "qa.yaml").write_text("kind: generate\ntrain: qa.jsonl\ntest: qa.jsonl\n"
                                      "template: \"Question: {question}\\nAnswer:\"\nanswer_field: answers\n")
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_dir, "--task", str(tmp_path / "qa.yaml"), "--method", "hybrid",
                 "--num-train", "8", "--num-dev", "4", "--num-test", "4", "--steps", "2", "--batch-size", "4",
                 "--eval-every", "2", "--no-zero-shot", "--no-progress", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "f1" and {"test_f1", "test_exact_match", "best_dev_f1"} <= set(results)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "dev_f1" in line]
    assert [r["step"] for r in evals] == [2]
    assert {p.name for p in (out / "plots").iterdir()} == {"loss.png", "dev_f1.png", "grad_norm.png"}
