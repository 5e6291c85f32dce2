"""Masked language modelling (BERT-style): ``masked`` batches.

Each example packs ``seq_len - 2`` consecutive tokens of the stream (documents separated by eos) between
cls and sep. ``mask_prob`` of the non-special tokens are selected (whole words with
``whole_word=true``); of those 80% become the mask token, 10% a random token, 10% stay. Loss and
metrics count the selected positions only.
"""

from __future__ import annotations

import numpy as np
import torch

from lmlab.data.base import Example, WindowDataModule, check_document_mask, example_keys
from lmlab.data.collate import document_ids, mlm_mask
from lmlab.data.tokenizers import word_starts
from lmlab.errors import ConfigError


def cls_sep_rows(examples: list[Example], tokenizer, width: int | None = None) -> np.ndarray:
    """(B, width) int64: cls, the example's tokens, sep, then pad (``width``: the longest)."""
    width = width or max(len(ex.tokens) for ex in examples) + 2
    ids = np.full((len(examples), width), tokenizer.pad_id, dtype=np.int64)
    ids[:, 0] = tokenizer.cls_id
    if examples and all(len(ex.tokens) == width - 2 for ex in examples):  # one copy
        ids[:, 1:-1] = np.stack([ex.tokens for ex in examples])
        ids[:, -1] = tokenizer.sep_id
        return ids
    for b, ex in enumerate(examples):
        n = len(ex.tokens)
        ids[b, 1 : n + 1] = ex.tokens
        ids[b, n + 1] = tokenizer.sep_id
    return ids


class MaskedLMDataModule(WindowDataModule):
    objective, batch_kind = "mlm", "masked"

    def __init__(
        self,
        tokenizer,
        train,
        val,
        *,
        seq_len: int,
        mask_prob: float = 0.15,
        p_mask: float = 0.8,
        p_random: float = 0.1,
        whole_word: bool = False,
        document_mask: bool = False,
        **kwargs,
    ) -> None:
        self.check_settings(
            seq_len=seq_len,
            mask_prob=mask_prob,
            p_mask=p_mask,
            p_random=p_random,
            document_mask=document_mask,
        )
        self.mask_prob, self.p_mask, self.p_random = mask_prob, p_mask, p_random
        self.whole_word, self.document_mask = whole_word, document_mask
        self.special = np.zeros(tokenizer.vocab_size, dtype=bool)
        self.special[tokenizer.special_ids] = True
        self.random_ids = np.flatnonzero(~self.special)
        self.word_table = tokenizer.word_start_table() if whole_word else None
        super().__init__(tokenizer, train, val, seq_len=seq_len, **kwargs)

    @classmethod
    def check_settings(
        cls,
        *,
        seq_len: int,
        mask_prob: float,
        p_mask: float,
        p_random: float,
        document_mask: bool = False,
        **rest,
    ) -> None:
        check_document_mask(document_mask)
        if seq_len < 3:
            raise ConfigError(
                f"objective=mlm needs seq_len >= 3 (cls + tokens + sep), got {seq_len}; raise seq_len"
            )
        if not 0 < mask_prob < 1:
            raise ConfigError(f"objective.mask_prob must be in (0, 1), got {mask_prob}")
        if not (p_mask >= 0 and p_random >= 0 and p_mask + p_random <= 1):  # NaN fails too
            raise ConfigError(
                f"objective.p_mask={p_mask} and objective.p_random={p_random} must be >= 0 and "
                "sum to at most 1 (the rest stays unchanged)"
            )
        super().check_settings(**rest)

    @property
    def window_len(self) -> int:
        return self.seq_len - 2  # check_settings made sure it is at least 1

    def arrange(self, ex: Example) -> Example:
        """The example whose tokens go between cls and sep: the window itself here; objectives
        that rearrange an example's text (objective=tlm) return another. (The segment-level
        objectives, lmlab.data.sentences, build their rows from their segments instead.)"""
        return ex

    def mask_example(self, ex: Example) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels) of one example: exactly its row of any batch :meth:`make_batch` puts it
        in, without the padding."""
        ex = self.arrange(ex)
        inputs, labels, _ = self._mask(self._sequences([ex]), example_keys(self.seed, [ex]))
        return inputs[0], labels[0]

    def make_batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        examples = [self.arrange(ex) for ex in examples]
        ids = self._sequences(examples, self.seq_len)
        inputs, labels, _ = self._mask(ids, example_keys(self.seed, examples))
        lengths = np.array([len(ex.tokens) + 2 for ex in examples])
        return self.with_documents(
            {
                "input_ids": torch.from_numpy(inputs),
                "attention_mask": torch.from_numpy(np.arange(self.seq_len) < lengths[:, None]),
                "labels": torch.from_numpy(labels),
            },
            ids,
        )

    def documents_of(self, ids: np.ndarray) -> np.ndarray | None:
        """The document ids of rows ``ids`` (B, S) under ``document_mask=true``, else None: an eos
        belongs to the document it ends, cls to a row's first document, sep to its last (or, after
        an eos, to none: it then attends to itself alone)."""
        if not self.document_mask:
            return None
        return document_ids(ids, self.tokenizer.eos_id, eos_opens=False)

    def with_documents(self, batch: dict[str, torch.Tensor], ids: np.ndarray) -> dict:
        """``batch`` with the ``doc_ids`` of its rows ``ids`` under ``document_mask=true``."""
        docs = self.documents_of(ids)
        if docs is not None:
            batch["doc_ids"] = torch.from_numpy(docs)
        return batch

    def _sequences(self, examples: list[Example], width: int | None = None) -> np.ndarray:
        return cls_sep_rows(examples, self.tokenizer, width)

    def _mask(self, ids: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, ...]:
        """:func:`mlm_mask` with this objective's settings. Padding is special, so never selected."""
        starts = None
        if self.whole_word:
            # One call over the whole batch: every row starts with cls, a special token, which
            # begins a word whatever precedes it, so this equals word_starts row by row.
            flat = ids.reshape(-1)
            starts = word_starts(flat, self.word_table, self.special).reshape(ids.shape)
        return mlm_mask(
            ids,
            keys,
            special=self.special,
            mask_id=self.tokenizer.mask_id,
            random_ids=self.random_ids,
            mask_prob=self.mask_prob,
            p_mask=self.p_mask,
            p_random=self.p_random,
            word_start=starts,
        )
