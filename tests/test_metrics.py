"""SQuAD exact match and F1 on hand-worked cases (the official v1.1 normalisation and token overlap)."""

import pytest

from hyft.tasks.metrics import exact_match, f1, normalize_answer


@pytest.mark.parametrize(("text", "normal"), [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  a  cat,   an apple and THE dog. ", "cat apple and dog"),
    ("theater", "theater"),  # "the" only as a word
    ("Denver Broncos'", "denver broncos"),
    ("", ""),
])
def test_normalisation(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match_is_after_normalisation_and_best_over_answers():
    assert exact_match("the Denver Broncos", ["Denver Broncos"]) == 1.0
    assert exact_match("Broncos", ["Denver Broncos", "The Broncos"]) == 1.0  # the second gold answer
    assert exact_match("Denver", ["Denver Broncos"]) == 0.0


def test_f1_by_hand():
    # prediction "denver broncos won" vs gold "denver broncos": 2 common, P = 2/3, R = 1, F1 = 0.8
    assert f1("Denver Broncos won", ["Denver Broncos"]) == pytest.approx(0.8)
    # repeated tokens count once per occurrence: "a b b" vs "b b c" (after normalisation "b b" vs "b b c"):
    # "a" is an article and goes; common = 2, P = 2/2, R = 2/3, F1 = 0.8
    assert f1("a b b", ["b b c"]) == pytest.approx(0.8)
    # best over answers: 0 against the first; 2 common of 2 and 3 tokens against the second, F1 = 0.8
    assert f1("Santa Clara", ["Levi's Stadium", "Santa Clara, California"]) == pytest.approx(0.8)
    assert f1("nothing in common", ["Denver"]) == 0.0
    assert f1("the", ["a"]) == 0.0  # both normalise to empty: no common token, 0 in the official v1.1 script
    assert exact_match("the", ["a"]) == 1.0  # while their normalised strings are equal
    assert f1("the", ["Denver"]) == 0.0
