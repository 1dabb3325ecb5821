"""Candidate log-likelihoods against a hand computation, padding invariance, and the training losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hyft.tasks.evaluate import evaluate
from hyft.tasks.scoring import accuracy, candidate_scores, classification_loss, encode, lm_loss, token_logprobs


def hand_logprob(model, tokenizer, context: str, continuation: str) -> tuple[float, int]:
    """log p(continuation | context) from one unpadded forward and a plain log_softmax."""
    ctx = tokenizer(context).input_ids
    cont = tokenizer(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids).logits[0].log_softmax(-1)
    total = sum(logp[len(ctx) + j - 1, tok].item() for j, tok in enumerate(cont))
    return total, len(cont)


def test_scores_match_hand_computation(model, tokenizer, examples):
    with torch.no_grad():
        mean = candidate_scores(model, encode(tokenizer, examples), "mean")
        total = candidate_scores(model, encode(tokenizer, examples), "sum")
    for i, ex in enumerate(examples):
        for k, (context, continuation) in enumerate(ex.pairs()):
            expected, n = hand_logprob(model, tokenizer, context, continuation)
            assert total[i, k].item() == pytest.approx(expected, abs=1e-4)
            assert mean[i, k].item() == pytest.approx(expected / n, abs=1e-4)
    assert mean.shape == (4, 3)
    assert torch.isinf(mean[0, 2]) and mean[0, 2] < 0  # ragged candidates are padded with -inf


def test_left_and_right_padding_agree(model, tokenizer, examples):
    with torch.no_grad():
        left = candidate_scores(model, encode(tokenizer, examples, padding_side="left"))
        right = candidate_scores(model, encode(tokenizer, examples, padding_side="right"))
    assert torch.allclose(left, right, atol=1e-4)


def test_left_padding_keeps_only_the_needed_logits(tokenizer, examples):
    batch = encode(tokenizer, examples, padding_side="left")
    longest = max(len(tokenizer(c, add_special_tokens=False).input_ids) for ex in examples for _, c in ex.pairs())
    assert batch.keep == longest + 1 < batch.input_ids.shape[1]
    assert encode(tokenizer, examples, padding_side="right").keep == batch.input_ids.shape[1]


def test_context_truncated_from_the_left_continuation_kept(tokenizer):
    from hyft.tasks import Example

    ex = Example("word " * 100 + "it was", (" was small.", " terrible"), 0)
    batch = encode(tokenizer, [ex], max_length=16)
    assert batch.input_ids.shape[1] == 16
    cont = tokenizer(" was small.", add_special_tokens=False).input_ids
    assert batch.input_ids[0, -len(cont):].tolist() == cont
    fast = encode(tokenizer, [Example("word " * 100 + "it was", (" great", " terrible"), 0)], max_length=16)
    assert fast.candidate_ids is not None and fast.input_ids.shape[1] == 16


def test_classification_loss_is_cross_entropy_over_candidates(model, tokenizer, examples):
    batch = encode(tokenizer, examples[:3])
    scores = candidate_scores(model, batch)
    loss = classification_loss(scores, batch.gold)
    manual = -torch.stack([scores[i].log_softmax(-1)[ex.gold] for i, ex in enumerate(examples[:3])]).mean()
    assert loss.item() == pytest.approx(manual.item(), abs=1e-6)
    loss.backward()  # differentiable end to end
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_lm_loss_is_token_mean_nll_of_gold(model, tokenizer, examples):
    batch = encode(tokenizer, examples, gold_only=True)
    assert batch.input_ids.shape[0] == len(examples)
    with torch.no_grad():
        loss = lm_loss(model, batch).item()
    pairs = [ex.pairs()[ex.gold] for ex in examples]
    totals = [hand_logprob(model, tokenizer, c, x) for c, x in pairs]
    assert loss == pytest.approx(-sum(t for t, _ in totals) / sum(n for _, n in totals), abs=1e-4)


def test_token_logprobs_count_continuation_tokens(model, tokenizer, examples):
    batch = encode(tokenizer, examples)
    with torch.no_grad():
        _, counts = token_logprobs(model, batch)
    expected = [len(tokenizer(c, add_special_tokens=False).input_ids) for ex in examples for _, c in ex.pairs()]
    assert counts.tolist() == expected


def test_evaluate_accuracy_matches_scores(model, tokenizer, examples):
    result = evaluate(model, tokenizer, examples, batch_size=2, progress=False)
    with torch.no_grad():
        scores = candidate_scores(model, encode(tokenizer, examples))
    assert result.predictions == scores.argmax(-1).tolist()
    assert result.accuracy == pytest.approx(accuracy(scores, torch.tensor([e.gold for e in examples])))
    assert result.n == 4


def test_accuracy_counts_argmax_hits():
    scores = torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, -1.0]])
    assert accuracy(scores, torch.tensor([1, 0, 1])) == pytest.approx(2 / 3)
    assert F.cross_entropy(scores, torch.tensor([1, 0, 1])).item() == pytest.approx(
        classification_loss(scores, torch.tensor([1, 0, 1])).item()
    )


def test_single_token_fast_path_matches_one_row_per_candidate(model, tokenizer):
    from hyft.tasks import Example

    words = (" great", " terrible", " No", " Yes")
    single = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) == 1]
    assert len(single) >= 2, "the test tokenizer should have single-token candidates"
    exs = [Example("it was a wonderful film . it was", tuple(single), 0),
           Example("a boring mess . It was", tuple(single[:2]), 1)]
    fast = encode(tokenizer, exs)
    assert fast.candidate_ids is not None and fast.input_ids.shape[0] == 2  # one row per example
    with torch.no_grad():
        got = candidate_scores(model, fast)
        got_right = candidate_scores(model, encode(tokenizer, exs, padding_side="right"))
    for i, ex in enumerate(exs):
        for k, (c, x) in enumerate(ex.pairs()):
            assert got[i, k].item() == pytest.approx(hand_logprob(model, tokenizer, c, x)[0], abs=1e-4)
    assert torch.allclose(got, got_right, atol=1e-4)


@pytest.mark.parametrize("name", ["copa", "cb"])
def test_built_in_task_scores_match_hand_computation(model, tokenizer, name):
    """COPA (two multi-token continuations) and CB (three answers after a newline) through the scorer."""
    from hyft.tasks import get_task

    # the three shortest, so that no context is cut at the tiny models' 256 positions
    exs = sorted(get_task(name).read("validation"), key=lambda e: len(e.pairs()[0][0]))[:3]
    with torch.no_grad():
        scores = candidate_scores(model, encode(tokenizer, exs), "mean")
    for i, ex in enumerate(exs):
        for k, (context, continuation) in enumerate(ex.pairs()):
            total, n = hand_logprob(model, tokenizer, context, continuation)
            assert scores[i, k].item() == pytest.approx(total / n, abs=1e-4)


def test_token_logprobs_in_row_chunks_are_the_whole_batch_bits(model, tokenizer, examples, monkeypatch):
    """Memory, not arithmetic: the cross-entropy's row chunks give each row's value and gradient bit for bit."""
    from hyft.tasks import scoring

    batch = encode(tokenizer, examples)  # 9 candidate rows: chunks of 4 leave a ragged last one
    results = []
    for rows in (len(batch.input_ids), 4, 1):
        monkeypatch.setattr(scoring, "CE_ROWS", rows)
        model.zero_grad()
        logp, _ = token_logprobs(model, batch)
        logp.sum().backward()
        results.append((logp.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    whole = results[0]
    assert len(batch.input_ids) > 4 and whole[1]
    for logp, grads in results[1:]:
        assert torch.equal(logp, whole[0])
        assert all(torch.equal(a, b) for a, b in zip(grads, whole[1], strict=True))
