"""Capital-word prediction (ERNIE 2.0: Sun et al., 2020, sec. 4.2.1, "Capitalization Prediction
Task") with masked LM, for encoders: ``masked`` batches with ``token_labels``.

The encoder reads the window lowercased, token by token (each token whose text has capitals is
replaced by the token whose text is the same in lower case, where the vocabulary has one: "▁The"
by "▁the", " The" by " the"), and a classifier at every position says whether the word starting
there is capitalized (its first letter upper case: label 1, lower case: 0). Scored are the tokens
that begin a word (the byte-level pre-tokenizer's boundaries, as whole-word masking uses them) with
a cased first letter, where the lowercased word shows nothing of its case: a capitalized token
without a lowercase counterpart stays as it is (its case shows), and a word whose lowercased tokens
are not how the tokenizer splits the lowercase word (" K" "ING" for " KING", where " king" is one
token) would show it by its split; neither is scored. Masked LM runs as objective=mlm on the
lowercased input (its settings; random replacements are drawn from tokens without capitals) with
the original tokens as targets, so ``val/loss`` and ``val/bpb`` score the cased text, as
objective=mlm's do. The classifier's mean cross-entropy over the step's scored words times
``token_weight`` is added to the training loss; validation reports ``val/capital_word_loss`` and
``val/capital_word_acc``. An uncased tokenizer (nothing is ever capitalized) is refused.

Differences from the paper: ERNIE 2.0 does not say how its input hides the case; here it is the
tokenizer's own lowercase tokens, so words whose lowercase form is not a token of the vocabulary
keep their case (and are left out of the task).
"""

from __future__ import annotations

import numpy as np
import torch

from lmlab.data.base import Example, check_head_weight, example_keys, head_settings
from lmlab.data.collate import IGNORE
from lmlab.data.mlm import MaskedLMDataModule
from lmlab.data.tokenizers import word_starts
from lmlab.errors import ConfigError


def case_tables(
    tokenizer, raw: list[str | None] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower, case, blank) per token id, from the tokens' raw texts
    (:meth:`lmlab.data.tokenizers.TextTokenizer.raw_texts`: "▁The" and "The" are different texts):
    ``lower[t]`` the id of the token whose text is ``t``'s in lower case (``t`` itself when it has
    no capitals or no such token exists); ``case[t]`` 1 when the first letter of ``t`` (after
    whitespace, "##") is upper case and ``lower[t]`` differs, 0 when it is lower case, -100
    otherwise (no cased letter there, a capitalized token without a lowercase counterpart, special
    and byte-fallback tokens); ``blank[t]``: ``t`` is whitespace only. ``raw``: the raw texts,
    where the caller has them already."""
    raw = tokenizer.raw_texts() if raw is None else raw
    by_text: dict[str, int] = {}
    for i, text in enumerate(raw):
        if text is not None:
            by_text.setdefault(text, i)
    lower = np.arange(len(raw), dtype=np.int64)
    case = np.full(len(raw), IGNORE, dtype=np.int64)
    blank = np.array([text is not None and not text.strip() for text in raw])
    for i, text in enumerate(raw):
        if text is None:
            continue
        if text != text.lower():
            lower[i] = by_text.get(text.lower(), i)
        first = text.lstrip().removeprefix("##")[:1]
        if first.lower() == first.upper():  # no cased letter (digits, punctuation, "", a byte)
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
        raw = tokenizer.raw_texts()
        self.lower, self.case, self.blank = case_tables(tokenizer, raw)
        if not (self.case == 1).any():
            raise ConfigError(
                "objective=capital_word: no token of this tokenizer is a capitalized word with a "
                "lowercase counterpart (an uncased tokenizer lowercases every text), so every label "
                "would be 'lowercase'; use a cased tokenizer"
            )
        super().__init__(tokenizer, train, val, seq_len=seq_len, **kwargs)
        # random replacements from tokens without capitals only: no capital in the input
        no_capital = np.array([t is not None and t == t.lower() for t in raw])
        self.random_ids = np.flatnonzero(~self.special & no_capital)
        self.starts_table = tokenizer.word_start_table()
        self._canonical: dict[tuple[int, ...], bool] = {}  # word ids -> lowercased split is own

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
        labels = np.where(at, self.case[ids], IGNORE)
        # A word lowercased token by token keeps its split (" K" "ING" -> " k" "ing" where " king"
        # is one token; "iPhone" -> "i" "phone"): a split the tokenizer never makes of lowercase
        # text would tell where capitals were, so words with a changed token are scored only where
        # their lowercased tokens are the tokenizer's own encoding of the lowercased word.
        flat = labels.reshape(-1)
        first = np.flatnonzero(starts.reshape(-1))  # every row starts with cls: words stay in rows
        word = np.cumsum(starts.reshape(-1)) - 1  # each position's word
        changed = np.bincount(word, weights=self.lower[ids].reshape(-1) != ids.reshape(-1)) > 0
        ends = np.append(first[1:], flat.size)
        tokens = ids.reshape(-1)
        for at_pos in np.flatnonzero((flat != IGNORE) & changed[word]):
            w = word[at_pos]
            if not self.own_split(tuple(tokens[first[w] : ends[w]].tolist())):
                flat[at_pos] = IGNORE
        return labels

    def own_split(self, word: tuple[int, ...]) -> bool:
        """Whether the tokenizer encodes ``word``'s text in lower case as ``word`` lowercased
        token by token (cached per word)."""
        known = self._canonical.get(word)
        if known is None:
            lowered = [int(self.lower[t]) for t in word]
            text = self.tokenizer.decode(lowered)
            known = self._canonical[word] = self.tokenizer.encode(text) == lowered
        return known

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
        return self.with_documents(
            {
                "input_ids": torch.from_numpy(inputs),
                "attention_mask": torch.from_numpy(np.arange(self.seq_len) < lengths[:, None]),
                "labels": torch.from_numpy(labels),
                "token_labels": torch.from_numpy(self._case_labels(ids)),
            },
            ids,
        )
