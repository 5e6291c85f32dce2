"""Sentence-level objectives for encoders: masked LM plus a classification of the input's text
segments, read at the cls position (``masked`` batches with ``sentence_labels``).

- ``sop``, sentence order prediction (ALBERT: Lan et al., 2020, sec. 4.2): two consecutive segments
  of one document, in their order (label 0) or swapped (1). Both segments always come from the same
  document, so the task is about order and coherence, not about topic.
- ``nsp``, next sentence prediction (BERT: Devlin et al., 2019, sec. 3.1, "Task #2"): segment A,
  then either the text that follows it (0, IsNext) or text of another document (1, NotNext).
- ``sentence_distance`` (ERNIE 2.0: Sun et al., 2020, sec. 4.2.2, "Sentence Distance Task"):
  segment A, then the text that follows it (0), text of the same document away from A (1), or
  text of another document (2).
- ``deshuffle``, sentence reordering (ERNIE 2.0, sec. 4.2.2, "Sentence Reordering Task"): the text
  cut into n segments, n uniform in 1..``max_segments``, which are shuffled; the label says which
  of the sum over n of n! orders they are in (9 classes for 3 segments).

An example is made from a window of ``seq_len - 1 - max_segments`` tokens (room for cls and a sep
after every segment). Its longest stretch without a document end, less the partial sentences at the
stretch's edges (a sentence ends after a token whose text ends with ". ! ?"; a document's first
sentence counts as partial too, as its start lacks the whitespace other sentence starts have), is
cut after some of its sentence ends, chosen uniformly: every segment is whole sentences, so neither
where a segment starts or ends nor which one is longer tells the label. A window with fewer than
two whole sentences is not scored (label -100; the masked LM still trains on it): cut anywhere
else, the junction of two segments (a word or phrase running on across it) and the count of
sentence ends told the label. At seq_len=64 that is about half of the bundled corpus's windows, at
256 a few percent. Segments from elsewhere (NotNext, distant, other document) are whole sentences
too, from a sentence start drawn uniformly among those whose first sentence fits where B had room
(B and the partial sentence after it), as many as fit there; where no other text has such a
sentence, the example is not scored either (a cut sentence would give it away). The input is
``cls S1 sep S2 sep ...``, padded to ``seq_len``, and masked as objective=mlm masks (its settings,
over the segments' tokens). Every draw comes from (seed, epoch, window start): batches are
reproducible, and validation examples are the same at every validation. A cue left: text from
elsewhere fills B's room differently than B does: it ends where its document does. On the bundled
corpus (documents of many windows) NotNext's B is 3% longer on average, and a table of B's length
alone guesses nsp right 51% of the time (of both segments' lengths, 52%); on short documents the
cue grows (documents of 300-600 tokens at seq_len=256: NotNext's B 22% shorter, the table right
54% of the time), as in BERT's construction, whose text from elsewhere also stops at the end of
its document.

The masked-LM loss is reported as objective=mlm's (``train/loss``, ``val/loss``, ``val/bpb``, so
runs compare with plain MLM runs); the classifier's cross-entropy times ``sentence_weight`` is added
to the training loss (the papers add it with weight 1), and validation reports
``val/<objective>_loss`` and ``val/<objective>_acc``.

Differences from the papers: BERT and ALBERT fill each example with whole sentences up to a length
drawn per example (10% of them shorter) and then truncate the longer segment at a random end, which
can cut a sentence; here examples are as long as a window's whole sentences, and none is cut. No
segment (token type) embeddings: the sep token marks the boundaries, as in RoBERTa and ModernBERT,
which dropped them. ERNIE 2.0 trains its tasks continually and on their own data; here each is one
objective over the run's text, with the labels drawn uniformly (among those an example allows:
``sentence_distance`` in a one-document split has no label 2, and a document with no text outside
the window no label 1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import pairwise, permutations

import numpy as np
import torch

from lmlab.data.base import Example, check_head_weight, example_keys, example_rng, head_settings
from lmlab.data.collate import IGNORE
from lmlab.data.denoise import sentence_end_table
from lmlab.data.mlm import MaskedLMDataModule
from lmlab.data.store import TokenStore
from lmlab.errors import ConfigError

log = logging.getLogger(__name__)

# Text from elsewhere is drawn from a stretch of at most this many tokens of its region (a document
# can be millions of tokens; its sentence ends are found in that stretch only)
REGION_TOKENS = 1 << 16
# Validation windows looked at for whole sentences before any training
CHECKED_WINDOWS = 64
# Other documents drawn for text from elsewhere before the example is left unscored (BERT draws its
# random document up to 10 times)
OTHER_TRIES = 10


def longest_run(tokens: np.ndarray, stop_id: int) -> tuple[int, int]:
    """(start, end) of the longest stretch of ``tokens`` without ``stop_id`` (the first of equally
    long ones)."""
    stops = np.flatnonzero(tokens == stop_id)
    starts = np.concatenate([[0], stops + 1])
    ends = np.concatenate([stops, [len(tokens)]])
    i = int(np.argmax(ends - starts))
    return int(starts[i]), int(ends[i])


@dataclass
class Stretch:
    """An example's document text and where it may be cut."""

    text: np.ndarray  # the longest stretch of the window without a document end
    start: int  # its offset in the window
    first: int  # text[first:last]: its whole sentences
    last: int
    cuts: np.ndarray  # where text[first:last] may be cut (offsets into text): its sentence ends


class SegmentTaskDataModule(MaskedLMDataModule):
    """Masked LM over ``cls S1 sep S2 sep ...`` plus a classifier of the segments at cls (the
    encoder's sentence head); a subclass defines ``label_names`` and :meth:`segments`."""

    label_names: tuple[str, ...] = ()
    max_segments = 2  # segments of an input, each followed by a sep

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
        check_head_weight("sentence_weight", sentence_weight)
        self.check_length(seq_len, self.max_segments)
        self.sentence_weight = float(sentence_weight)
        super().__init__(tokenizer, train, val, seq_len=seq_len, **kwargs)

    @classmethod
    def check_settings(
        cls,
        *,
        seq_len: int,
        sentence_weight: float = 1.0,
        max_segments: int | None = None,
        **rest,
    ) -> None:
        """``max_segments``: deshuffle's setting (None: the class's count, as in the constructor's
        call, which checks the instance's own count too)."""
        cls.check_length(seq_len, max_segments or cls.max_segments)
        check_head_weight("sentence_weight", sentence_weight)
        if rest.get("document_mask"):
            raise ConfigError(
                f"objective={cls.objective} builds each input from its own segments (some, by "
                "design, from other documents), not from packed windows: document masks do not "
                "apply; leave objective.document_mask false"
            )
        super().check_settings(seq_len=seq_len, **rest)

    @classmethod
    def check_length(cls, seq_len: int, segments: int) -> None:
        if seq_len < 2 * segments + 1:
            raise ConfigError(
                f"objective={cls.objective} needs seq_len >= {2 * segments + 1} (cls, then "
                f"{segments} segments of at least one token, each followed by sep), got "
                f"{seq_len}; raise seq_len"
            )

    # what a scored example holds, for the messages of :meth:`check`
    scored_what = "a scored example"

    def scored(self, ex: Example) -> bool:
        """Whether the example's label is scored (not -100), without drawing its segments."""
        return True

    def checked_windows(self) -> tuple[list[Example], str]:
        """The validation windows :meth:`check` looks at, and how messages name them."""
        examples = self.val_examples(CHECKED_WINDOWS)
        return examples, f"the first {len(examples)}"

    def check(self) -> None:
        """Also refuse validation text in which no checked window holds :attr:`scored_what` (no
        ". ! ?", or a seq_len too short for them): the head would never be scored or trained;
        warn where under a tenth of them do."""
        super().check()
        examples, which = self.checked_windows()
        scored = sum(self.scored(ex) for ex in examples)
        if scored == 0:
            raise ConfigError(
                f"objective={self.name}: none of {which} validation windows of "
                f"{self.window_len} tokens holds {self.scored_what}, so the head would never be "
                "scored; raise seq_len, or use text that has them (or objective=mlm)"
            )
        if scored < 0.1 * len(examples):
            log.warning(
                "objective=%s: only %d of %s validation windows hold %s; the others train the "
                "masked LM only (raise seq_len for more)",
                self.name,
                scored,
                which,
                self.scored_what,
            )

    def model_settings(self) -> dict:
        return head_settings(
            "sentence", self.objective, len(self.label_names), self.sentence_weight
        )

    @property
    def window_len(self) -> int:
        return self.seq_len - 1 - self.max_segments  # cls, a sep after each segment

    def segments(self, ex: Example) -> tuple[list[np.ndarray], int]:
        """(segments, label) of one example, reproducible from (seed, epoch, start); label -100:
        not scored (the masked LM still trains on the segments)."""
        raise NotImplementedError

    def sentence_label(self, ex: Example) -> int:
        return self.segments(ex)[1]

    @staticmethod
    def store_of(ex: Example) -> TokenStore:
        if ex.store is None:
            raise ValueError("this objective needs the example's token store (Example.store)")
        return ex.store

    # -- batches --------------------------------------------------------------------------------
    def _segment_ids(self, examples: list[tuple], width: int | None = None) -> np.ndarray:
        """(B, width) int64: cls S1 sep S2 sep ..., then pad (``width``: the longest)."""
        tok = self.tokenizer
        lengths = [sum(len(x) + 1 for x in segs) + 1 for segs, _ in examples]
        ids = np.full((len(examples), width or max(lengths)), tok.pad_id, dtype=np.int64)
        ids[:, 0] = tok.cls_id
        for row, (segs, _) in zip(ids, examples, strict=True):
            at = 1
            for seg in segs:
                row[at : at + len(seg)] = seg
                row[at + len(seg)] = tok.sep_id
                at += len(seg) + 1
        return ids

    def mask_example(self, ex: Example) -> tuple[np.ndarray, np.ndarray]:
        ids = self._segment_ids([self.segments(ex)])
        inputs, labels, _ = self._mask(ids, example_keys(self.seed, [ex]))
        return inputs[0], labels[0]

    def make_batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        made = [self.segments(ex) for ex in examples]
        ids = self._segment_ids(made, self.seq_len)
        inputs, labels, _ = self._mask(ids, example_keys(self.seed, examples))
        lengths = np.array([sum(len(x) + 1 for x in segs) + 1 for segs, _ in made])
        return {
            "input_ids": torch.from_numpy(inputs),
            "attention_mask": torch.from_numpy(np.arange(self.seq_len) < lengths[:, None]),
            "labels": torch.from_numpy(labels),
            "sentence_labels": torch.tensor([y for _, y in made], dtype=torch.int64),
        }


class SentenceTaskDataModule(SegmentTaskDataModule):
    """Shared by the sentence-level objectives, whose segments are a window's whole sentences; a
    subclass defines ``label_names`` and :meth:`make_segments`."""

    pairs_as_text = False  # a pair's sep inside a segment would blur the segments' boundaries
    scored_what = "two whole sentences (ending with . ! or ?)"

    def __init__(self, tokenizer, train, val, *, seq_len: int, **kwargs) -> None:
        self.is_end = sentence_end_table(tokenizer)  # decodes every token once
        super().__init__(tokenizer, train, val, seq_len=seq_len, **kwargs)

    def scored(self, ex: Example) -> bool:
        return self.stretch(ex) is not None

    # -- segments -------------------------------------------------------------------------------
    def segments(self, ex: Example) -> tuple[list[np.ndarray], int]:
        """(segments, label) of one example, reproducible from (seed, epoch, start); a window
        under two whole sentences is one segment with label -100 (not scored; the masked LM
        still trains on it)."""
        rng = example_rng(self.seed, ex)
        stretch = self.stretch(ex)
        if stretch is None:
            return [ex.tokens], IGNORE
        return self.make_segments(ex, stretch, rng)

    def make_segments(
        self, ex: Example, s: Stretch, rng: np.random.Generator
    ) -> tuple[list[np.ndarray], int]:
        raise NotImplementedError

    def stretch(self, ex: Example) -> Stretch | None:
        """The example's :class:`Stretch`; None when its longest stretch of one document holds
        under two whole sentences: no segments to tell apart by their content alone (cut at
        random positions, the junction of two segments told whether they were in order, a word
        continuing across it), so the example is not scored."""
        start, end = longest_run(ex.tokens, self.tokenizer.eos_id)
        text = ex.tokens[start:end]
        # whole sentences: from the first sentence start after a sentence end to the last
        # sentence end; the partial sentences at the stretch's edges are left out, and so is a
        # document's first sentence where the stretch holds it (a document's start lacks the
        # whitespace other sentence starts have: it would tell which segment came first)
        after_end = np.flatnonzero(self.is_end[text]) + 1
        if len(after_end) < 3:
            return None
        cuts = after_end[1:-1]
        return Stretch(text, start, int(after_end[0]), int(after_end[-1]), cuts)

    def cut_in_two(
        self, s: Stretch, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """(A, B, room): the whole sentences cut at one uniformly drawn place; ``room``: the tokens
        B had (it and the partial sentence left out after it)."""
        k = int(rng.choice(s.cuts))
        return s.text[s.first : k], s.text[k : s.last], len(s.text) - k

    # -- text from elsewhere (nsp, sentence_distance) -------------------------------------------
    @staticmethod
    def document_of(store: TokenStore, position: int) -> tuple[int, int, int]:
        """(index, start, end) of the document holding ``position``; end before its eos."""
        doc = int(np.searchsorted(store.offsets, position, side="right")) - 1
        return doc, int(store.offsets[doc]), int(store.offsets[doc + 1]) - 1

    def other_document(self, ex: Example, s: Stretch, rng: np.random.Generator):
        """(start, end) of a uniformly drawn other document of the example's split (its eos left
        out); None in a split of one document."""
        store = self.store_of(ex)
        if store.n_docs < 2:
            return None
        doc, _, _ = self.document_of(store, ex.start + s.start)
        other = int(rng.integers(store.n_docs - 1))
        other += other >= doc
        return int(store.offsets[other]), int(store.offsets[other + 1]) - 1

    def away_from_window(self, ex: Example, s: Stretch, rng: np.random.Generator):
        """(start, end) of the example's document at least a window before its window, or after
        it, drawn in proportion to their lengths; None where there is no such text. (The window
        before the example's is left out: text there can end right where segment A starts.)"""
        _, lo, hi = self.document_of(self.store_of(ex), ex.start + s.start)
        before = max(0, ex.start - self.window_len - lo)
        after = max(0, hi - (ex.start + self.window_len))
        if before + after == 0:
            return None
        if int(rng.integers(before + after)) < before:
            return lo, ex.start - self.window_len
        return ex.start + self.window_len, hi

    def text_from(
        self, ex: Example, region: tuple[int, int] | None, room: int, rng: np.random.Generator
    ) -> np.ndarray | None:
        """Whole sentences (at most ``room`` tokens) of the store's ``region`` (start, end: no eos
        inside), from a sentence start drawn uniformly among those (after a sentence end) whose
        first sentence fits the room, in a stretch of at most :data:`REGION_TOKENS` of the region
        (placed so that every position is about as likely to be in it); None where none fits. The
        sentences after the first are read from the region, not the stretch: cut at the
        stretch's edge, text from elsewhere ran shorter than B (22% of NotNext texts on a corpus
        of short documents), and its length told the label."""
        if region is None or region[1] - region[0] < 2:
            return None
        tokens = self.store_of(ex).tokens
        lo, hi = region
        span = min(hi - lo, REGION_TOKENS)
        for _ in range(8):  # a stretch cut by the region's edges is taken for its share of span
            at = lo - span + 1 + int(rng.integers(hi - lo + span - 1))
            a, b = max(lo, at), min(hi, at + span)
            if rng.random() * span < b - a:
                break
        chunk = np.asarray(tokens[a:b], dtype=np.int64)
        ends = np.flatnonzero(self.is_end[chunk])
        starts, stops = ends[:-1] + 1, ends[1:] + 1  # each sentence: [starts[i], stops[i])
        fits = np.flatnonzero(stops - starts <= room)
        if not len(fits):
            return None
        first = a + int(starts[fits[int(rng.integers(len(fits)))]])
        text = np.asarray(tokens[first : min(hi, first + room)], dtype=np.int64)
        return text[: int(np.flatnonzero(self.is_end[text])[-1]) + 1]  # its first sentence fits

    def other_text(
        self, ex: Example, s: Stretch, room: int, rng: np.random.Generator
    ) -> np.ndarray | None:
        """:meth:`text_from` another document of the split (up to :data:`OTHER_TRIES` documents
        drawn, BERT's count); None in a split of one document or where none has a sentence that
        fits."""
        for _ in range(OTHER_TRIES):
            region = self.other_document(ex, s, rng)
            if region is None:
                return None
            text = self.text_from(ex, region, room, rng)
            if text is not None:
                return text
        return None


class SentenceOrderDataModule(SentenceTaskDataModule):
    """ALBERT's sentence order prediction: the two segments in order (0) or swapped (1)."""

    objective = "sop"
    label_names = ("in order", "swapped")

    def make_segments(self, ex, s, rng):
        a, b, _ = self.cut_in_two(s, rng)
        return ([b, a], 1) if rng.random() < 0.5 else ([a, b], 0)


class NextSentenceDataModule(SentenceTaskDataModule):
    """BERT's next sentence prediction: A and the text after it (0) or another document's (1),
    half each. In a split of one document the other text comes from that document away from the
    example's window (the split must then hold at least three windows)."""

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

    def make_segments(self, ex, s, rng):
        a, b, room = self.cut_in_two(s, rng)
        if rng.random() < 0.5:
            return [a, b], 0
        if self.store_of(ex).n_docs >= 2:
            other = self.other_text(ex, s, room, rng)
        else:
            other = self.text_from(ex, self.away_from_window(ex, s, rng), room, rng)
        # no sentence elsewhere fits B's room: not scored (a cut sentence would give it away)
        return ([a, b], IGNORE) if other is None else ([a, other], 1)


class SentenceDistanceDataModule(SentenceTaskDataModule):
    """ERNIE 2.0's sentence distance: A, then the text after it (0), text of the same document
    away from the window (1: after it, or ending at least a window before it), or of another
    document (2); uniformly among the labels the example allows (0 always; 1 where its document
    has such text; 2 in a split of two or more documents)."""

    objective = "sentence_distance"
    label_names = ("adjacent", "same document", "other document")

    def make_segments(self, ex, s, rng):
        a, b, room = self.cut_in_two(s, rng)
        away = self.away_from_window(ex, s, rng)
        texts = {
            0: b,
            1: None if away is None else self.text_from(ex, away, room, rng),
            2: self.other_text(ex, s, room, rng),
        }
        labels = [y for y, text in texts.items() if text is not None]
        label = labels[int(rng.integers(len(labels)))]
        return [a, texts[label]], label


class DeshuffleDataModule(SentenceTaskDataModule):
    """ERNIE 2.0's sentence reordering: the whole sentences cut into n segments (n uniform in
    1..``max_segments``, at most one more than the places the text can be cut), shuffled by a
    uniformly drawn permutation; the label is the permutation's index among all orders of 1 to
    ``max_segments`` segments (named by the original position of each input segment: "2 1 3"
    shows the second segment first). One segment is a class of its own, which counting the seps
    tells: a classifier blind to order is right 1/3 + 1/3 x 1/2 + 1/3 x 1/6 = 0.56 of the time at
    ``max_segments=3`` where every example has three whole sentences or more, more where windows
    hold two (a review measured 0.58 on the bundled corpus at seq_len=256, 0.59 at 64): compare
    val/deshuffle_acc with that, not with 1/9."""

    objective = "deshuffle"
    max_segments = 2  # the least; each instance has its own setting

    def __init__(self, tokenizer, train, val, *, seq_len: int, max_segments: int = 3, **kwargs):
        self.check_segments(max_segments)
        self.max_segments = max_segments
        self.orders = [p for n in range(1, max_segments + 1) for p in permutations(range(n))]
        self.order_index = {p: i for i, p in enumerate(self.orders)}
        self.label_names = tuple(" ".join(str(i + 1) for i in p) for p in self.orders)
        super().__init__(tokenizer, train, val, seq_len=seq_len, **kwargs)

    @classmethod
    def check_settings(cls, *, max_segments: int | None = None, **rest) -> None:
        if max_segments is not None:
            cls.check_segments(max_segments)
        super().check_settings(max_segments=max_segments, **rest)

    @staticmethod
    def check_segments(max_segments) -> None:
        if isinstance(max_segments, bool) or not isinstance(max_segments, int):
            raise ConfigError(f"objective.max_segments={max_segments!r} is not a whole number")
        if not 2 <= max_segments <= 5:
            raise ConfigError(
                f"objective.max_segments={max_segments} must be 2 to 5 (the classes are every "
                f"order of 1 to max_segments segments: 3 for 2, 9 for 3, 33 for 4, 153 for 5)"
            )

    def make_segments(self, ex, s, rng):
        n = int(rng.integers(1, min(self.max_segments, len(s.cuts) + 1) + 1))
        cuts = np.sort(rng.choice(s.cuts, size=n - 1, replace=False))
        bounds = [s.first, *cuts.tolist(), s.last]
        pieces = [s.text[a:b] for a, b in pairwise(bounds)]
        order = tuple(int(i) for i in rng.permutation(n))
        return [pieces[i] for i in order], self.order_index[order]
