"""Capital-word prediction (ERNIE 2.0: Sun et al., 2020, sec. 4.2.1, "Capitalization Prediction
Task") with masked LM, for encoders: ``masked`` batches with ``token_labels``.

The encoder reads the window lowercased, token by token (each token whose text has capitals is
replaced by the token spelling its lowercase text, where the vocabulary has one), and a classifier at
every position says whether the word starting there is capitalized (its first letter upper case:
label 1, lower case: 0). Scored are the tokens that begin a word (the byte-level pre-tokenizer's
boundaries, as whole-word masking uses them) with a cased first letter and a lowercase counterpart;
a capitalized token without one stays as it is in the input, so it is not scored (its case shows).
Masked LM runs as objective=mlm on the lowercased input (its settings; random replacements are
drawn from tokens that are their own lowercase) with the original tokens as targets, so
``val/loss`` and ``val/bpb`` score the cased text, as objective=mlm's do. The classifier's mean
cross-entropy times ``token_weight`` is added to the training loss; validation reports
``val/capital_word_loss`` and ``val/capital_word_acc``.

Differences from the paper: ERNIE 2.0 does not say how its input hides the case; here it is the
tokenizer's own lowercase tokens, so words whose lowercase form is not a token of the vocabulary
keep their case (and are left out of the task).
"""

from __future__ import annotations

import numpy as np
import torch

from lmlab.data.base import Example, check_head_weight, example_keys, head_settings
from lmlab.data.collate import IGNORE
from lmlab.data.denoise import token_texts
from lmlab.data.mlm import MaskedLMDataModule
from lmlab.data.tokenizers import word_starts


def case_tables(tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower, case, blank) per token id: ``lower[t]`` the id of the token spelling ``t``'s text in
    lower case (``t`` itself when it has no capitals or no such token exists); ``case[t]`` 1 when
    the first non-space character of ``t`` is an upper-case letter and ``lower[t]`` differs, 0 when
    it is a lower-case letter, -100 otherwise (no cased letter there, a capitalized token without a
    lowercase counterpart, a special token); ``blank[t]``: ``t`` is whitespace only."""
    texts = token_texts(tokenizer)
    special = set(tokenizer.special_ids)
    by_text: dict[str, int] = {}
    for i, text in enumerate(texts):
        if i not in special:
            by_text.setdefault(text, i)
    lower = np.arange(len(texts), dtype=np.int64)
    case = np.full(len(texts), IGNORE, dtype=np.int64)
    blank = np.array([not t.strip() and i not in special for i, t in enumerate(texts)])
    for i, text in enumerate(texts):
        if i in special:
            continue
        if text != text.lower():
            lower[i] = by_text.get(text.lower(), i)
        first = text.lstrip()[:1]
        if first.lower() == first.upper():  # no cased letter (digits, punctuation, "", "�")
            continue
        if first.isupper():
            if lower[i] != i:
                case[i] = 1
        else:
            case[i] = 0
    return lower, case, blank


class CapitalWordDataModule(MaskedLMDataModule):
    objective = "capital_word"
    label_names = ("lowercase", "capitalized")

    def __init__(
        self,
        tokenizer,
        train,
        val,
        *,
        seq_len: int,
        token_weight: float = 1.0,
        **kwargs,  # mask_prob, p_mask, p_random, whole_word: see MaskedLMDataModule
    ) -> None:
        check_head_weight("token_weight", token_weight)
        self.token_weight = float(token_weight)
        self.lower, self.case, self.blank = case_tables(tokenizer)
        super().__init__(tokenizer, train, val, seq_len=seq_len, **kwargs)
        # random replacements from the lowercase vocabulary only: no capital in the input
        self.random_ids = np.flatnonzero(~self.special & (self.lower == np.arange(len(self.lower))))
        self.starts_table = tokenizer.word_start_table()

    @classmethod
    def check_settings(cls, *, token_weight: float = 1.0, **rest) -> None:
        check_head_weight("token_weight", token_weight)
        super().check_settings(**rest)

    def model_settings(self) -> dict:
        return head_settings("token", self.objective, len(self.label_names), self.token_weight)

    def _case_labels(self, ids: np.ndarray) -> np.ndarray:
        """(B, S) labels: the case of the word that starts at each position, -100 elsewhere. A
        word whose first token is whitespace only (a lone space, which attaches to the word after
        it) is labelled at its next token."""
        starts = word_starts(ids.reshape(-1), self.starts_table, self.special).reshape(ids.shape)
        blank = self.blank[ids]
        at = starts & ~blank
        at[:, 1:] |= starts[:, :-1] & blank[:, :-1]
        return np.where(at, self.case[ids], IGNORE)

    def _lowercased(self, ids: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, MLM labels): the lowercased ids masked as objective=mlm masks, the original
        ids as the targets of the selected positions."""
        inputs, _, selected = self._mask(self.lower[ids], keys)
        return inputs, np.where(selected, ids, IGNORE)

    def mask_example(self, ex: Example) -> tuple[np.ndarray, np.ndarray]:
        inputs, labels = self._lowercased(self._sequences([ex]), example_keys(self.seed, [ex]))
        return inputs[0], labels[0]

    def original_ids(self, ex: Example) -> np.ndarray:
        """The example's ids before lowercasing and masking (cls, tokens, sep)."""
        return self._sequences([ex])[0]

    def token_labels_of(self, ex: Example) -> np.ndarray:
        """The example's case labels, aligned with :meth:`mask_example`'s inputs."""
        return self._case_labels(self._sequences([ex]))[0]

    def show_predicted(
        self, inputs: np.ndarray, capitalized: torch.Tensor, labels: np.ndarray
    ) -> str:
        """The input's text (without cls / sep) with a capital where the model predicts one at a
        scored word start (``labels`` other than -100)."""
        out = []
        rows = zip(inputs[1:-1].tolist(), capitalized[1:-1].tolist(), labels[1:-1], strict=True)
        for token, up, label in rows:
            text = self.tokenizer.decode([token])
            if up and label != IGNORE and self.case[token] == 0:
                i = len(text) - len(text.lstrip())
                text = text[:i] + text[i : i + 1].upper() + text[i + 1 :]
            out.append(text)
        return "".join(out)

    def make_batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        ids = self._sequences(examples, self.seq_len)
        inputs, labels = self._lowercased(ids, example_keys(self.seed, examples))
        lengths = np.array([len(ex.tokens) + 2 for ex in examples])
        return {
            "input_ids": torch.from_numpy(inputs),
            "attention_mask": torch.from_numpy(np.arange(self.seq_len) < lengths[:, None]),
            "labels": torch.from_numpy(labels),
            "token_labels": torch.from_numpy(self._case_labels(ids)),
        }
