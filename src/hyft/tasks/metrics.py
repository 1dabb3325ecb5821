"""Answer metrics for generated text: SQuAD's exact match and token F1, with its answer normalisation.

The normalisation is the official SQuAD v1.1 evaluation's: lower-case, drop punctuation, drop the articles
"a", "an", "the" as words, collapse white space. A prediction is scored against each gold answer and keeps
the best score (SQuAD lists several acceptable answers per question).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation, then articles, then extra white space (SQuAD's order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals some normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def _f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:  # v1.1's rule, also when both are empty (its v2.0 script scores that 1)
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers: Sequence[str]) -> float:
    """Token-overlap F1 of the normalised prediction, the best over the gold answers."""
    return max((_f1(prediction, a) for a in answers), default=0.0)
