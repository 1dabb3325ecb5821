"""Prompt rendering for every task, the MeZO sampling protocol, and clear errors on malformed files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hyft.errors import HyftError
from hyft.tasks import TASKS, get_task, sample_splits
from hyft.tasks.glue import SST2
from hyft.tasks.superglue import CB, COPA, WSC
from hyft.tasks.winogrande import WinoGrande


def test_sst2_prompt_strips_the_glue_trailing_space():
    ex = SST2().render({"sentence": "a gorgeous , witty film ", "label": "1"})
    assert ex.pairs() == [("a gorgeous , witty film It was", " terrible"), ("a gorgeous , witty film It was", " great")]
    assert ex.gold == 1


def test_wsc_prompt_asks_about_the_pronoun():
    row = {"text": "Mark told Pete many lies about himself. He should have been more truthful.",
           "target": {"span1_text": "Mark", "span2_text": "He", "span1_index": 0, "span2_index": 7},
           "label": "true"}
    ex = WSC().render(row)
    context = ex.pairs()[0][0]
    assert context == (
        "Mark told Pete many lies about himself. He should have been more truthful.\n"
        'Question: In the passage above, does the pronoun "He" refer to Mark?\nAnswer:'
    )
    assert ex.candidates == (" No", " Yes") and ex.gold == 1
    assert WSC().render({**row, "label": False}).gold == 0


def test_winogrande_fills_the_blank_and_scores_the_shared_continuation():
    row = {"sentence": "The trophy doesn't fit into the suitcase because _ is too large.",
           "option1": "the trophy", "option2": "the suitcase", "answer": "1"}
    ex = WinoGrande().render(row)
    assert ex.pairs() == [
        ("The trophy doesn't fit into the suitcase because the trophy", " is too large."),
        ("The trophy doesn't fit into the suitcase because the suitcase", " is too large."),
    ]
    assert ex.gold == 0


@pytest.mark.parametrize("name,train,dev,test", [("sst2", 1000, 500, 872), ("wsc", 416, 138, 104),
                                                  ("winogrande", 1000, 500, 1000), ("cb", 188, 62, 56),
                                                  ("copa", 300, 100, 100)])
def test_sampling_sizes_and_disjointness(name, train, dev, test):
    splits = sample_splits(get_task(name), seed=0)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (train, dev, test)
    # Disjoint by row position in the source file (the files hold a few duplicate rows).
    assert not {id(e) for e in splits.train} & {id(e) for e in splits.dev}
    if name in ("wsc", "cb", "copa"):  # small files: dev is capped at a quarter, with a note
        assert len(splits.notes) == 2 and "dev capped" in splits.notes[0]
    else:
        assert not splits.notes


def test_cb_prompt_is_mezos_three_way_question():
    row = {"premise": "It was a complex language. Not written down but handed down.",
           "hypothesis": "the language was peeled down", "label": "neutral"}
    ex = CB().render(row)
    assert ex.pairs()[0] == ('Suppose It was a complex language. Not written down but handed down. '
                             'Can we infer that "the language was peeled down"? Yes, No, or Maybe?\n', "Yes")
    assert ex.candidates == ("Yes", "No", "Maybe") and ex.gold == 2
    assert CB().render({**row, "label": "contradiction"}).gold == 1
    with pytest.raises(ValueError):
        CB().render({**row, "label": "maybe"})


def test_copa_scores_each_choice_as_its_own_continuation():
    row = {"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
           "choice2": "The grass was cut.", "question": "cause", "label": 0}
    ex = COPA().render(row)
    assert ex.pairs() == [("My body cast a shadow over the grass because", " the sun was rising."),
                          ("My body cast a shadow over the grass because", " the grass was cut.")]
    assert ex.gold == 0
    effect = COPA().render({**row, "question": "effect", "label": 1})
    assert effect.pairs()[0][0].endswith("grass so") and effect.gold == 1


def test_sampling_is_seeded():
    a, b, c = (sample_splits(get_task("sst2"), seed=s) for s in (0, 0, 1))
    assert a.train == b.train and a.dev == b.dev and a.test == b.test
    assert a.train != c.train


def test_sampled_splits_are_disjoint_by_index():
    task = get_task("wsc")
    source = task.read("train")
    splits = sample_splits(task, seed=3, reader=lambda split: source if split == "train" else task.read(split))
    train_ids = {id(e) for e in splits.train}
    dev_ids = {id(e) for e in splits.dev}
    assert not train_ids & dev_ids and len(train_ids | dev_ids) == len(source)


def test_unknown_task_lists_known_ones():
    with pytest.raises(HyftError, match="known tasks: sst2, cb, copa, wsc, winogrande"):
        get_task("mnli")


def test_registry_has_the_built_in_tasks():
    assert set(TASKS) == {"sst2", "cb", "copa", "wsc", "winogrande", "squad", "alpaca"}


def _task_on(cls, tmp_path: Path, train_text: str):
    name = "train.tsv" if cls is SST2 else "train.jsonl"
    (tmp_path / name).write_text(train_text)
    task = cls()
    task.files = {"train": str(tmp_path / name), "validation": str(tmp_path / name)}
    return task


@pytest.mark.parametrize(
    "cls,text,message",
    [
        (SST2, "sentence\tlabel\ngood \t1\nbad \t7\n", r"train.tsv:3: malformed sst2 row .*label must be 0 or 1"),
        (SST2, "sentence\tlabel\ngood \t1\nno label here\n", r"train.tsv:3: expected 2 fields, found 1"),
        (SST2, "text\tlabel\ngood \t1\n", r"train.tsv:1: header .* lacks the columns"),
        (WSC, '{"text": "a", "target": {"span1_text": "x", "span2_text": "y"}, "label": true}\n{"text": "b"\n',
         r"train.jsonl:2: not valid JSON"),
        (WSC, '{"text": "a", "target": {"span1_text": "x"}, "label": true}\n',
         r"train.jsonl:1: malformed wsc row \(KeyError"),
        (WSC, '{"text": "a", "target": {"span1_text": "x", "span2_text": "y"}, "label": "maybe"}\n',
         r"train.jsonl:1: malformed wsc row .*true or false"),
        (WinoGrande, '{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}\n',
         r"train.jsonl:1: malformed winogrande row .*one '_' blank"),
        (WinoGrande, '[1, 2]\n', r"train.jsonl:1: expected a JSON object"),
        (WinoGrande, "\n\n", r"train.jsonl: no examples found"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, cls, text, message):
    task = _task_on(cls, tmp_path, text)
    with pytest.raises(HyftError, match=message):
        task.read("train")


def test_missing_data_file_is_named(tmp_path):
    task = WSC()
    task.files = {"train": str(tmp_path / "nope.jsonl"), "validation": str(tmp_path / "nope.jsonl")}
    with pytest.raises(HyftError, match="data file not found: .*nope.jsonl"):
        task.read("train")


def test_vendored_files_have_expected_row_counts():
    counts = {"sst2": (67349, 872), "wsc": (554, 104), "winogrande": (10234, 1267)}
    for name, (n_train, n_val) in counts.items():
        task = get_task(name)
        assert len(task.read("train")) == n_train
        assert len(task.read("validation")) == n_val


def test_wsc_labels_parse_strings_and_booleans(tmp_path):
    rows = [{"text": "t", "target": {"span1_text": "a", "span2_text": "b"}, "label": v} for v in (True, "false")]
    task = _task_on(WSC, tmp_path, "".join(json.dumps(r) + "\n" for r in rows))
    assert [e.gold for e in task.read("train")] == [1, 0]
