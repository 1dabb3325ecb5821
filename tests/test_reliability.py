"""Everyday use: custom tasks from YAML, export to plain transformers/peft, and clean errors on bad input
(fuzzed), never a crash."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from hyft.cli import main
from hyft.config import RunConfig
from hyft.errors import HyftError
from hyft.models import load_model
from hyft.tasks import get_task, sample_splits
from hyft.tasks.evaluate import evaluate
from hyft.tasks.scoring import candidate_scores, encode
from hyft.training.loop import Trainer

REVIEWS = [("a wonderful film", 1), ("a boring mess", 0), ("it was great fun", 1), ("terrible acting", 0)] * 6


def write_task(tmp_path: Path, spec: dict, rows: list[dict], fmt: str = "jsonl") -> Path:
    for split in ("train", "test"):
        path = tmp_path / f"{split}.{fmt}"
        if fmt == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            sep = "\t" if fmt == "tsv" else ","
            header = list(rows[0])
            path.write_text(sep.join(header) + "\n" + "".join(sep.join(str(r[h]) for h in header) + "\n" for r in rows))
    task = tmp_path / "task.yaml"
    task.write_text(yaml.safe_dump({"train": f"train.{fmt}", "test": f"test.{fmt}", **spec}))
    return task


SENTIMENT = {"name": "reviews", "template": "Review: {text} It was", "label_field": "label",
             "candidates": {"0": " terrible", "1": " great"}}


def test_custom_task_from_yaml_and_jsonl_trains_end_to_end(tiny_dir, tmp_path, capsys):
    task = write_task(tmp_path, SENTIMENT, [{"text": t, "label": y} for t, y in REVIEWS])
    examples = get_task(str(task)).read("train")
    assert examples[0].pairs() == [("Review: a wonderful film It was", " terrible"),
                                   ("Review: a wonderful film It was", " great")]
    assert [e.gold for e in examples[:4]] == [1, 0, 1, 0]
    code = main(["train", "--model", tiny_dir, "--task", str(task), "--method", "fo-peft", "--num-train", "12",
                 "--num-dev", "4", "--num-test", "8", "--steps", "3", "--batch-size", "4", "--no-progress",
                 "--out", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "results.json").read_text())["n_test"] == 8


@pytest.mark.parametrize("fmt", ["tsv", "csv"])
def test_custom_task_with_candidate_fields(tmp_path, fmt):
    rows = [{"q": "the sky is", "a": " blue", "b": " green", "ans": "A"},
            {"q": "grass is", "a": " red", "b": " green", "ans": "B"}]
    spec = {"template": "{q}", "label_field": "ans", "candidate_fields": ["a", "b"], "label_map": {"A": 0, "B": 1}}
    examples = get_task(str(write_task(tmp_path, spec, rows, fmt))).read("train")
    assert examples[1].pairs() == [("grass is", " red"), ("grass is", " green")] and examples[1].gold == 1


@pytest.mark.parametrize(
    "spec,rows,message",
    [
        ({**SENTIMENT, "templat": "x"}, [{"text": "a", "label": 1}], "unknown key"),
        ({k: v for k, v in SENTIMENT.items() if k != "template"}, [{"text": "a", "label": 1}],
         "'template' is required"),
        ({**SENTIMENT, "candidate_fields": ["a", "b"]}, [{"text": "a", "label": 1}], "exactly one of"),
        (SENTIMENT, [{"text": "a", "label": 1}, {"txt": "b", "label": 0}], r"train.jsonl:2: .*template field 'text'"),
        (SENTIMENT, [{"text": "a", "label": 7}], r"train.jsonl:1: .*label 7 is not one of"),
        ({**SENTIMENT, "candidates": {"0": " x"}}, [{"text": "a", "label": 0}], "at least two"),
    ],
)
def test_malformed_custom_tasks_get_clear_errors(tmp_path, spec, rows, message):
    task = write_task(tmp_path, spec, rows)
    with pytest.raises(HyftError, match=message):
        get_task(str(task)).read("train")


def test_missing_task_file(tmp_path):
    with pytest.raises(HyftError, match="task file not found"):
        get_task(str(tmp_path / "nope.yaml"))


@pytest.fixture(scope="module")
def hybrid_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    config = RunConfig(model=tiny_dir, task="sst2", method="hybrid", num_train=16, num_dev=8, num_test=16,
                       steps=6, batch_size=4, eval_every=3, lr_fo=0.5, lr_zo=2e-3, zero_shot=False)
    trainer = Trainer(config, out, progress=False)
    results = trainer.run()
    return out, trainer, results, config


def test_export_merged_gives_the_reported_test_accuracy(hybrid_run, tmp_path, capsys):
    out, _, results, config = hybrid_run
    assert main(["export", str(out), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    model, tokenizer = load_model(str(tmp_path / "merged"))  # a plain transformers directory
    assert not hasattr(model, "peft_config")
    test = sample_splits(get_task("sst2"), config.seed, config.num_train, config.num_dev, config.num_test).test
    assert evaluate(model, tokenizer, test, progress=False).accuracy == results["test_accuracy"]


def test_export_base_plus_adapter_loads_with_plain_peft(hybrid_run, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, trainer, results, _ = hybrid_run
    assert main(["export", str(out), "--out", str(tmp_path / "exp")]) == 0
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "exp" / "base"),
                                       tmp_path / "exp")
    test = sample_splits(get_task("sst2"), 0, 16, 8, 16).test
    batch = encode(trainer.tokenizer, test)
    with torch.no_grad():
        assert torch.equal(candidate_scores(loaded.eval(), batch), candidate_scores(trainer.model.eval(), batch))
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "exp"), "--task", "sst2", "--num-test", "16",
                 "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == results["test_accuracy"]


def test_export_of_unfinished_run_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    RunConfig().to_yaml(tmp_path / "run" / "config.yaml")
    with pytest.raises(HyftError, match="has not finished"):
        from hyft.tools.export import export

        export(tmp_path / "run", tmp_path / "out")


# --- fuzzing: random bad input must give HyftError (exit 2), never another exception ----------------------
VALID = RunConfig().to_dict()
ODD_VALUES = [-1, 0, 1e30, float("nan"), "abc", "", None, [], {}, True, [1, 2], "-1", 3.5, -0.0]


def test_fuzzed_configs_raise_only_hyft_errors():
    rng = random.Random(0)
    for _ in range(400):
        data = dict(VALID)
        for _ in range(rng.randint(1, 3)):
            key = rng.choice([*VALID, "unknown_key", "lr"])
            data[key] = rng.choice(ODD_VALUES)
        with contextlib.suppress(HyftError):
            RunConfig.from_dict(data).validate()


def test_fuzzed_data_files_raise_only_hyft_errors(tmp_path):
    rng = random.Random(1)
    good = [json.dumps({"text": "t", "target": {"span1_text": "a", "span2_text": "b"}, "label": True})] * 3
    pieces = ['{"text": 1}', "[]", "null", '{"target": "x"}', "{", "\x00\xff", '{"label": "maybe"}', "42", '"s"']
    for i in range(150):
        lines = list(good)
        lines.insert(rng.randrange(len(lines) + 1), rng.choice(pieces))
        task = tmp_path / f"t{i}.yaml"
        (tmp_path / f"d{i}.jsonl").write_text("\n".join(lines) + "\n")
        spec = {"train": f"d{i}.jsonl", "test": f"d{i}.jsonl", "template": "{text}", "label_field": "label",
                "candidates": {"True": " yes", "False": " no"}}
        task.write_text(yaml.safe_dump(spec))
        try:
            get_task(str(task)).read("train")
        except HyftError as err:
            assert f"d{i}.jsonl" in str(err)
    for i, text in enumerate(["sentence\tlabel\nok \t1\n", "sentence\tlabel\nok \tx\n", "label\n1\n", "",
                              "sentence\tlabel\na\tb\tc\n", "\x00"]):
        path = tmp_path / f"s{i}.tsv"
        path.write_text(text)
        task = get_task("sst2")
        task.files = {"train": str(path), "validation": str(path)}
        with contextlib.suppress(HyftError):
            task.read("train")


@pytest.mark.parametrize("text", ["a: [", "- 1\n- 2\n", "steps: abc\n", "lr_fo: -3\n", "bogus: 1\n", "eps: 0\n",
                                  "lora_targets: 5\n", "method: nope\n"])
def test_bad_yaml_configs_exit_2_without_traceback(tmp_path, capsys, text):
    (tmp_path / "c.yaml").write_text(text)
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hyft: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1
