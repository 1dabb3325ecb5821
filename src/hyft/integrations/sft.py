"""TRL-format SFT rows for ``HybridTrainer`` (or any ``transformers.Trainer``): tokenised with the same code
as hyft's own trainer (chat template for ``messages``, the completion never cut), with labels -100 on every
prompt token, so the loss is the completion's alone.

    features = hyft.sft_features(rows, tokenizer, max_length=512)    # rows: prompt/completion, messages, text
    trainer = hyft.HybridTrainer(model=model, args=args, train_dataset=features,
                                 data_collator=hyft.sft_collator(tokenizer), hybrid_args=...)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from hyft.tasks import sft
from hyft.tasks.scoring import completion_ids, context_ids


def sft_features(rows: Iterable[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, max_length: int = 512
                 ) -> list[dict[str, list[int]]]:
    """input_ids, attention_mask and labels (the completion's tokens; -100 on the prompt) per row; a prompt
    too long for ``max_length`` loses its first tokens."""
    features = []
    for row in rows:
        ex = sft.example(row)
        completion = completion_ids(tokenizer, ex.context, ex.candidates[0])
        prompt = context_ids(tokenizer, ex.context)[-max(max_length - len(completion), 1):]
        ids = prompt + completion
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": [-100] * len(prompt) + completion})
    return features


def sft_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """Pads input_ids with the pad token and labels with -100 (transformers' own collator)."""
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
