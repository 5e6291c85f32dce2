"""Masked language modelling (BERT-style): ``masked`` batches.

Each example packs ``seq_len - 2`` consecutive tokens of the stream (documents separated by eos) between
cls and sep. ``mask_prob`` of the non-special tokens are selected (whole words with
``whole_word=true``); of those 80% become the mask token, 10% a random token, 10% stay. Loss and
metrics count the selected positions only.
"""

from __future__ import annotations

import numpy as np
import torch

from lmlab.data.base import Example, WindowDataModule, example_rng
from lmlab.data.collate import IGNORE, mlm_mask
from lmlab.data.tokenizers import word_starts
from lmlab.errors import ConfigError


class MaskedLMDataModule(WindowDataModule):
    batch_kind = "masked"

    def __init__(
        self,
        tokenizer,
        train,
        val,
        *,
        mask_prob: float = 0.15,
        p_mask: float = 0.8,
        p_random: float = 0.1,
        whole_word: bool = False,
        **kwargs,
    ) -> None:
        if not 0 < mask_prob < 1:
            raise ConfigError(f"objective.mask_prob must be in (0, 1), got {mask_prob}")
        if p_mask < 0 or p_random < 0 or p_mask + p_random > 1:
            raise ConfigError(
                f"objective.p_mask={p_mask} and objective.p_random={p_random} must be >= 0 and "
                "sum to at most 1 (the rest stays unchanged)"
            )
        self.mask_prob, self.p_mask, self.p_random = mask_prob, p_mask, p_random
        self.whole_word = whole_word
        self.special = np.zeros(tokenizer.vocab_size, dtype=bool)
        self.special[tokenizer.special_ids] = True
        self.random_ids = np.flatnonzero(~self.special)
        self.word_table = tokenizer.word_start_table() if whole_word else None
        super().__init__(tokenizer, train, val, **kwargs)

    @property
    def window_len(self) -> int:
        if self.seq_len < 3:
            raise ConfigError(
                f"objective=mlm needs seq_len >= 3 (cls + tokens + sep), got {self.seq_len}"
            )
        return self.seq_len - 2

    def mask_example(self, ex: Example) -> tuple[np.ndarray, np.ndarray]:
        tok = self.tokenizer
        ids = np.concatenate(([tok.cls_id], ex.tokens, [tok.sep_id]))
        starts = word_starts(ids, self.word_table, self.special) if self.whole_word else None
        inputs, labels, _ = mlm_mask(
            ids,
            example_rng(self.seed, ex),
            special=self.special,
            mask_id=tok.mask_id,
            random_ids=self.random_ids,
            mask_prob=self.mask_prob,
            p_mask=self.p_mask,
            p_random=self.p_random,
            word_start=starts,
        )
        return inputs, labels

    def make_batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        B, S = len(examples), self.seq_len
        input_ids = np.full((B, S), self.tokenizer.pad_id, dtype=np.int64)
        labels = np.full((B, S), IGNORE, dtype=np.int64)
        attention_mask = np.zeros((B, S), dtype=bool)
        for b, ex in enumerate(examples):
            inputs, lab = self.mask_example(ex)
            n = len(inputs)
            input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = inputs, lab, True
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
        }
