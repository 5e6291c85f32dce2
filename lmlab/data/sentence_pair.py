"""Sentence-pair objectives for encoders: masked LM plus a two-way classification of a pair of text
segments, read at the cls position (``masked`` batches with ``sentence_labels``).

- ``sop``, sentence order prediction (ALBERT: Lan et al., 2020, sec. 4.2): two consecutive segments
  of one document, in their order (label 0) or swapped (1). Both segments always come from the same
  document, so the task is about order and coherence, not about topic.
- ``nsp``, next sentence prediction (BERT: Devlin et al., 2019, sec. 3.1, "Task #2"): segment A,
  then either the text that follows it (0, IsNext) or as many tokens of another document (1,
  NotNext).

An example is made from a window of ``seq_len - 3`` tokens: its longest stretch without a document end
(the whole window when that stretch is shorter than two tokens), less the partial sentences the
window's edges cut (a sentence ends after a token whose text ends with ". ! ?", and at a document's
end), is cut in two after one of its sentence ends, chosen uniformly: A and B are whole sentences,
so neither where a segment starts or ends nor which one is longer tells the label. Text with fewer
than two whole sentences is cut at a uniformly random point instead. NotNext segments are whole
sentences too, from a random sentence start of the other document, as many as fit where B's
sentences had room. The input is ``cls A sep B sep``, padded to ``seq_len``, and masked as
objective=mlm masks (its settings, over the tokens of A and B). Every draw comes from (seed, epoch,
window start): batches are reproducible, and validation pairs are the same at every validation.

The masked-LM loss is reported as objective=mlm's (``train/loss``, ``val/loss``, ``val/bpb``, so
runs compare with plain MLM runs); the pair's cross-entropy times ``sentence_weight`` is added to the
training loss (BERT and ALBERT add it with weight 1), and validation reports ``val/<objective>_loss``
and ``val/<objective>_acc`` (a chance-level classifier: log 2 = 0.693 and 0.5).

Differences from the papers: BERT and ALBERT fill each example with whole sentences up to a length
drawn per example (10% of them shorter) and then truncate the longer segment at a random end, which
can cut a sentence; here examples are as long as a window's whole sentences, and none is cut. No
segment (token type) embeddings: the sep token marks the boundary, as in RoBERTa and ModernBERT,
which dropped them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lmlab.data.base import Example, example_keys, example_rng
from lmlab.data.collate import IGNORE
from lmlab.data.denoise import sentence_end_table, token_texts
from lmlab.data.mlm import MaskedLMDataModule
from lmlab.errors import ConfigError

# NotNext text: sentence starts tried before one whose first sentence fits B's room (BERT draws
# its random document up to 10 times)
OTHER_TRIES = 10


def longest_run(tokens: np.ndarray, stop_id: int) -> tuple[int, int]:
    """(start, end) of the longest stretch of ``tokens`` without ``stop_id`` (the first of equally
    long ones)."""
    stops = np.flatnonzero(tokens == stop_id)
    starts = np.concatenate([[0], stops + 1])
    ends = np.concatenate([stops, [len(tokens)]])
    i = int(np.argmax(ends - starts))
    return int(starts[i]), int(ends[i])


def cut_point(tokens: np.ndarray, is_end: np.ndarray, rng: np.random.Generator) -> int:
    """Where to cut ``tokens`` (at least two) into two non-empty segments: after a sentence end
    (``is_end`` per token id), uniformly among those before the last token, else anywhere."""
    after_end = np.flatnonzero(is_end[tokens[:-1]]) + 1
    if len(after_end):
        return int(rng.choice(after_end))
    return int(rng.integers(1, len(tokens)))


def strip_blank(tokens: np.ndarray, is_blank: np.ndarray) -> np.ndarray:
    """``tokens`` without the whitespace-only tokens (``is_blank`` per id) at their end."""
    kept = np.flatnonzero(~is_blank[tokens])
    return tokens[: kept[-1] + 1] if len(kept) else tokens[:0]


def whole_sentences(tokens: np.ndarray, is_end: np.ndarray, complete: bool) -> np.ndarray:
    """``tokens`` up to their last sentence end (all of them when ``complete``: they end where a
    document does, or when they hold no sentence end)."""
    stops = np.flatnonzero(is_end[tokens])
    return tokens if complete or not len(stops) else tokens[: stops[-1] + 1]


class SentencePairDataModule(MaskedLMDataModule):
    """Shared by the pair objectives; a subclass defines :meth:`second_segment` and
    ``label_names``."""

    label_names: tuple[str, ...] = ()

    def __init__(
        self,
        tokenizer,
        train,
        val,
        *,
        seq_len: int,
        sentence_weight: float = 1.0,
        **kwargs,  # mask_prob, p_mask, p_random, whole_word: see MaskedLMDataModule
    ) -> None:
        self.check_weight(sentence_weight)
        self.sentence_weight = float(sentence_weight)
        texts = token_texts(tokenizer)  # every token decoded once
        self.is_end = sentence_end_table(tokenizer, texts)
        self.is_blank = np.array([not t.strip() for t in texts], dtype=bool)
        self.is_blank[tokenizer.special_ids] = False
        super().__init__(tokenizer, train, val, seq_len=seq_len, **kwargs)

    @classmethod
    def check_settings(cls, *, seq_len: int, sentence_weight: float = 1.0, **rest) -> None:
        if seq_len < 5:
            raise ConfigError(
                f"objective={cls.objective} needs seq_len >= 5 (cls, two segments of at least one "
                f"token, two sep), got {seq_len}; raise seq_len"
            )
        cls.check_weight(sentence_weight)
        super().check_settings(seq_len=seq_len, **rest)

    @classmethod
    def check_weight(cls, weight) -> None:
        if isinstance(weight, bool) or not (
            isinstance(weight, int | float) and 0 <= weight < math.inf
        ):
            raise ConfigError(
                f"objective.sentence_weight={weight!r} must be a finite number >= 0 (the weight of "
                "the pair's loss in the training loss; 0 trains the masked LM only)"
            )

    def model_settings(self) -> dict:
        return {
            "sentence_task": self.objective,
            "sentence_classes": len(self.label_names),
            "sentence_weight": self.sentence_weight,
        }

    @property
    def window_len(self) -> int:
        return self.seq_len - 3  # cls, sep, sep

    # -- pairs ----------------------------------------------------------------------------------
    def pair(self, ex: Example) -> tuple[np.ndarray, np.ndarray, int]:
        """(segment A, segment B, label) of one example, reproducible from (seed, epoch, start)."""
        rng = example_rng(self.seed, ex)
        start, end = longest_run(ex.tokens, self.tokenizer.eos_id)
        if end - start < 2:
            start, end = 0, len(ex.tokens)  # no document text of two tokens: the window as it is
        text = ex.tokens[start:end]
        stripped = strip_blank(text, self.is_blank)  # no whitespace-only sentence at its end
        text = stripped if len(stripped) >= 2 else text
        if len(text) < 2:  # a validation split's last window can be one token: no pair to score
            return text, text[:0], IGNORE
        # sentence starts: after an end, and where the stretch follows a document end; the
        # partial sentences at the window's edges are left out
        after_end = np.flatnonzero(self.is_end[text]) + 1
        first = 0 if start > 0 or not len(after_end) else int(after_end[0])
        last = len(text) if end < len(ex.tokens) or not len(after_end) else int(after_end[-1])
        cuts = after_end[(after_end > first) & (after_end < last)]
        whole = len(cuts) > 0
        if whole:
            k = int(rng.choice(cuts))
        else:  # under two whole sentences: the whole stretch, cut anywhere
            first, last, k = 0, len(text), cut_point(text, self.is_end, rng)
        a, b = text[first:k], text[k:last]
        return self.second_segment(ex, start + first, a, b, len(text) - k, whole, rng)

    def second_segment(
        self,
        ex: Example,
        start: int,
        a: np.ndarray,
        b: np.ndarray,
        room: int,
        whole: bool,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """(first segment, second segment, label) from the consecutive text ``a`` + ``b``, which
        starts ``start`` tokens into the window; ``room``: the tokens B had (it and the partial
        sentence left out after it); ``whole``: A and B are whole sentences (else the stretch was
        cut anywhere)."""
        raise NotImplementedError

    def sentence_label(self, ex: Example) -> int:
        return self.pair(ex)[2]

    def _pair_ids(self, pairs: list[tuple], width: int | None = None) -> np.ndarray:
        """(B, width) int64: cls A sep B sep, then pad (``width``: the longest)."""
        tok = self.tokenizer
        width = width or max(len(a) + len(b) for a, b, _ in pairs) + 3
        ids = np.full((len(pairs), width), tok.pad_id, dtype=np.int64)
        ids[:, 0] = tok.cls_id
        for row, (a, b, _) in zip(ids, pairs, strict=True):
            n = len(a)
            row[1 : n + 1] = a
            row[n + 1] = tok.sep_id
            row[n + 2 : n + 2 + len(b)] = b
            row[n + 2 + len(b)] = tok.sep_id
        return ids

    def mask_example(self, ex: Example) -> tuple[np.ndarray, np.ndarray]:
        inputs, labels, _ = self._mask(
            self._pair_ids([self.pair(ex)]), example_keys(self.seed, [ex])
        )
        return inputs[0], labels[0]

    def make_batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        pairs = [self.pair(ex) for ex in examples]
        inputs, labels, _ = self._mask(
            self._pair_ids(pairs, self.seq_len), example_keys(self.seed, examples)
        )
        lengths = np.array([len(a) + len(b) + 3 for a, b, _ in pairs])
        return {
            "input_ids": torch.from_numpy(inputs),
            "attention_mask": torch.from_numpy(np.arange(self.seq_len) < lengths[:, None]),
            "labels": torch.from_numpy(labels),
            "sentence_labels": torch.tensor([y for _, _, y in pairs], dtype=torch.int64),
        }


class SentenceOrderDataModule(SentencePairDataModule):
    """ALBERT's sentence order prediction: the two segments in order (0) or swapped (1)."""

    objective = "sop"
    label_names = ("in order", "swapped")

    def second_segment(self, ex, start, a, b, room, whole, rng):
        return (b, a, 1) if rng.random() < 0.5 else (a, b, 0)


class NextSentenceDataModule(SentencePairDataModule):
    """BERT's next sentence prediction: A and the text after it (0) or another document's (1).

    The other text starts at a sentence start (the first after a uniformly random position, or the
    document's start) of a uniformly random other document of the same split and holds as many of
    its whole sentences as fit in ``len(B)`` tokens plus the partial sentence left out after B (the
    room B's sentences had); where a first sentence is longer than that, another start is drawn
    (up to :data:`OTHER_TRIES` in all, then the last is cut). Where A and B are not whole
    sentences (text with fewer than two), it fills B's room, as B did. In a split of one document
    the other text comes from a random position whose tokens do not overlap the example's window
    (the split must then hold at least three windows)."""

    objective = "nsp"
    label_names = ("is next", "not next")

    def check(self) -> None:
        super().check()
        for split, store in (("training", self.train_store), ("validation", self.val_store)):
            if store is not None and store.n_docs == 1 and len(store) - 1 < 3 * self.window_len:
                raise ConfigError(
                    f"objective=nsp draws its NotNext segments from other documents, or in a split "
                    f"of one document from text away from the example: the {split} split is one "
                    f"document of {len(store) - 1} tokens, under 3 windows of {self.window_len}; "
                    "add text or documents, lower seq_len, or use objective=sop"
                )

    def second_segment(self, ex, start, a, b, room, whole, rng):
        if rng.random() < 0.5:
            return a, b, 0
        return a, self.other_text(ex, start, room, whole, rng), 1

    def other_text(
        self, ex: Example, start: int, room: int, whole: bool, rng: np.random.Generator
    ) -> np.ndarray:
        """At most ``room`` tokens of text unrelated to the example's, which begins ``start``
        tokens into its window (see the class docstring), from a sentence start; ``whole``: cut
        after its last whole sentence, as B was (else ``room`` tokens, as B filled the rest of its
        stretch); never eos."""
        store = ex.store
        if store is None:
            raise ValueError("objective=nsp needs the example's token store (Example.store)")
        offsets = store.offsets
        if store.n_docs >= 2:
            doc = int(np.searchsorted(offsets, ex.start + start, side="right")) - 1
            other = int(rng.integers(store.n_docs - 1))
            other += other >= doc
            lo, hi = int(offsets[other]), int(offsets[other + 1]) - 1  # its eos left out
            ends_document = True
        else:  # one document: a region before the window or after it
            end = len(store) - 1  # the document's eos
            before = ex.start  # positions [0, ex.start) and [window end, end)
            after = max(0, end - (ex.start + self.window_len))
            pick = int(rng.integers(before + after))  # check() made the sum positive
            lo, hi = (0, ex.start) if pick < before else (ex.start + self.window_len, end)
            ends_document = hi == end
        for _ in range(OTHER_TRIES):
            p = lo + int(rng.integers(max(1, hi - lo)))
            # the first sentence start from p: after the next sentence end (the region's start
            # itself where it has none before its end)
            ahead = np.asarray(store.tokens[p : min(hi, p + 2 * self.window_len)], dtype=np.int64)
            stops = np.flatnonzero(self.is_end[ahead])
            first = p + int(stops[0]) + 1 if p > lo and len(stops) and p + stops[0] + 1 < hi else lo
            tokens = np.asarray(store.tokens[first : min(hi, first + room)], dtype=np.int64)
            complete = not whole or (ends_document and first + room >= hi)
            text = strip_blank(whole_sentences(tokens, self.is_end, complete), self.is_blank)
            if len(text) and (complete or self.is_end[text[-1]]):
                return text
        return text  # no sentence that fits found: the last try's, cut at B's room
