"""Shared fixtures: a small byte-level BPE tokenizer and tiny random configs of real architectures."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: tests never touch the hub

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
)

from hyft.tasks import Example

CORPUS = [
    "it was great , a wonderful film . it was terrible , a boring mess .",
    "Question: In the passage above, does the pronoun refer to the man? Answer: Yes No",
    "James put the book on the shelf because the space was small and the book was big.",
    "the quick brown fox jumps over the lazy dog 0123456789",
    " great great terrible terrible Yes Yes No No" * 3,
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def tiny_model(arch: str, vocab_size: int, seed: int = 0, tied: bool = True, dropout: float = 0.0) -> torch.nn.Module:
    """A 2-layer random model of a real architecture; Llama ties its embeddings like SmolLM2 unless
    ``tied=False`` (Llama-2/3, Qwen, Mistral); ``dropout`` for OPT (MeZO's model family)."""
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
        )
        model = LlamaForCausalLM(config)
    elif arch == "opt":
        config = OPTConfig(
            vocab_size=vocab_size, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=32, max_position_embeddings=256, dropout=dropout, attention_dropout=dropout,
        )
        model = OPTForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(arch)
    return model.eval()


ARCHS = ["llama", "opt", "gpt2"]


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(params=ARCHS)
def model(request, tokenizer) -> torch.nn.Module:
    return tiny_model(request.param, len(tokenizer))


@pytest.fixture
def examples() -> list[Example]:
    return [
        Example("it was a wonderful film . it was", (" great", " terrible"), 0),
        Example("a boring mess . It was", (" terrible", " great"), 0),
        Example(("the space", "the book"), (" was small.", " was small."), 1),
        Example("Question: does the pronoun refer to the man? Answer:", (" No", " Yes", " Maybe so"), 2),
    ]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """A tiny random Llama with the test tokenizer, saved as a model directory that load_model reads."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer()
    tiny_model("llama", len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def stop_after(monkeypatch: pytest.MonkeyPatch, trainer, steps: int) -> None:
    """Run ``trainer`` until ``steps`` steps are done, then stop it as SIGTERM does (it checkpoints first)."""
    import signal

    from hyft.training.loop import Interrupted, Trainer

    real_step = Trainer._step

    def stopping_step(self, run):
        stats = real_step(self, run)
        if run.state.step == steps:
            self._stop = signal.SIGTERM  # as the signal handler does
        return stats

    monkeypatch.setattr(Trainer, "_step", stopping_step)
    with pytest.raises(Interrupted):
        trainer.run()
    monkeypatch.setattr(Trainer, "_step", real_step)
