"""Discourse relation prediction (ERNIE 2.0: Sun et al., 2020, sec. 4.2.3, "Discourse Relation
Task") with masked LM, for encoders: ``masked`` batches with ``sentence_labels``.

ERNIE 2.0 trains this task on the data of Sileo et al. (2019, "Mining Discourse Markers for
Unsupervised Sentence Representation Learning"): pairs of adjacent sentences whose second one
starts with a discourse marker ("However, ...", "For example, ..."), the marker taken away, and
the class is the marker. Such pairs need no labelling, so this objective mines them from the run's
own text: in a window's whole sentences (as the other sentence-level objectives find them,
:mod:`lmlab.data.sentences`), a sentence after the first whose text starts with one of the
``markers`` (a whole word or phrase, any case, whitespace inside it counting as one space, followed
by whitespace and a word, or by a comma, whitespace and a word, the word maybe after a quote or
bracket; not itself after a quote or a bracket) is a place to cut. One is drawn uniformly; the
input is ``cls A sep B sep``, A the whole sentences before it, B the rest with the marker (the
whitespace before it and its comma too) taken out, masked as objective=mlm masks, and the label is
the marker's class. A window without such a sentence trains the masked LM only (label not scored);
validation text none of whose windows (512 of them, spread over the split) has one is refused.

Each entry of ``markers`` is a class: one marker ("but"), or several that mean the same joined by
"|" ("therefore|thus|hence"); where two match ("for" and "for example"), the longer one counts.
Markers are matched on the decoded text, so every tokenizer works, provided the marker ends on a
token boundary (a tokenizer that merges "But," with the next word leaves that sentence out).
WordPiece pieces hold no whitespace, so there "But , so" and "But,so" read as "But, so". Sentence
ends are found as the other sentence-level objectives find them: a SentencePiece-style tokenizer
that merges a full stop with the newline and word after it ("▁bb.\nBut") hides that sentence.

The classes are as frequent as the text makes them (Sileo et al. balanced theirs by sampling): on
the bundled corpus "and" and "but" are most of them, so compare ``val/discourse_acc`` with the
majority class's share, which the run logs at the start (from windows spread over the validation
split).

The masked-LM loss is reported as objective=mlm's; the classifier's cross-entropy times
``sentence_weight`` is added to the training loss, and validation reports ``val/discourse_loss``
and ``val/discourse_acc``.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

import numpy as np

from lmlab.data.base import Example, eval_starts
from lmlab.data.collate import IGNORE
from lmlab.data.denoise import token_texts
from lmlab.data.sentences import SentenceTaskDataModule, Stretch
from lmlab.errors import ConfigError

log = logging.getLogger(__name__)

# Validation windows, spread over the split, that check() looks at (a marked sentence is rarer
# than two whole sentences: the first windows alone can miss them all) and logs the shares of
SHARE_WINDOWS = 512
# Tokens read from a sentence's start to find its marker (a byte tokenizer: one per byte, after
# any indentation), and after the marker to see that a word follows
MAX_MARKER_TOKENS = 64
AFTER_TOKENS = 8
# after a marker (and its comma): whitespace, then a word ("'tis" too)
FOLLOWS = re.compile(r"\s+[\"'\u2018\u2019\u201c(]?\w")

# Sileo et al.'s frequent English markers, a few grouped by meaning, and the sentence-initial
# conjunctions (and, but, yet, for, so) that old and informal text starts sentences with
DEFAULT_MARKERS = (
    "and",
    "but",
    "yet",
    "for",
    "so",
    "then",
    "now",
    "therefore|thus|hence",
    "however|nevertheless|nonetheless",
    "indeed|in fact",
    "also|besides|moreover|furthermore",
    "for example|for instance",
    "still",
    "instead",
    "meanwhile",
    "otherwise",
    "finally",
)


def parse_markers(markers) -> list[tuple[str, ...]]:
    """Each class's markers, lowercased, with single spaces; ConfigError naming the bad entry."""
    example = "e.g. objective.markers='[and, but, \"therefore|thus\"]'"
    if isinstance(markers, str) or not isinstance(markers, list | tuple):
        raise ConfigError(f"objective.markers={markers!r} must be a list of markers, {example}")
    if len(markers) < 2:
        raise ConfigError(
            f"objective.markers={list(markers)!r} needs at least two classes (one class is always "
            f"right), {example}"
        )
    classes, seen = [], {}
    for entry in markers:
        if not isinstance(entry, str):
            raise ConfigError(f"objective.markers: {entry!r} is not a text, {example}")
        forms = tuple(" ".join(form.lower().split()) for form in entry.split("|"))
        if len(set(forms)) < len(forms):
            raise ConfigError(f"objective.markers: {entry!r} lists a marker twice")
        for form in forms:
            if not form or not all(word.replace("'", "").isalpha() for word in form.split()):
                raise ConfigError(
                    f"objective.markers: {entry!r} has a marker that is not words of letters "
                    f"({form!r}); markers are words or phrases, several joined by '|'"
                )
            if form in seen:
                raise ConfigError(
                    f"objective.markers: {form!r} is in two classes ({seen[form]!r} and "
                    f"{entry!r}); keep it in one"
                )
            seen[form] = entry
        classes.append(forms)
    return classes


class DiscourseDataModule(SentenceTaskDataModule):
    """Masked LM plus which marker (class of ``markers``) started the sentence after segment A."""

    objective = "discourse"

    def __init__(
        self,
        tokenizer,
        train,
        val,
        *,
        seq_len: int,
        markers: tuple[str, ...] | list[str] = DEFAULT_MARKERS,
        **kwargs,  # sentence_weight; mask_prob, p_mask, p_random, whole_word
    ) -> None:
        classes = parse_markers(markers)
        self.label_names = tuple("|".join(forms) for forms in classes)
        self.form_class = {form: i for i, forms in enumerate(classes) for form in forms}
        # every text a sentence's start can have on the way to a marker: "b", "bu", "but", "but,"
        self.prefixes = {
            f[:n] for form in self.form_class for f in (form, form + ",") for n in range(len(f) + 1)
        }
        # tokens whose text can open a sentence on the way to a marker: "" (whitespace), "b",
        # "but,"; or a piece of a UTF-8 character (a byte tokenizer's "ü" is two tokens)
        low = [" ".join(t.lower().split()) for t in token_texts(tokenizer)]
        self.may_start = np.array([t in self.prefixes or t.endswith("\ufffd") for t in low])
        self.may_start[tokenizer.special_ids] = False
        super().__init__(tokenizer, train, val, seq_len=seq_len, **kwargs)

    @classmethod
    def check_settings(cls, *, markers=DEFAULT_MARKERS, **rest) -> None:
        parse_markers(markers)
        super().check_settings(**rest)

    # -- markers --------------------------------------------------------------------------------
    def marker_at(self, tokens: np.ndarray) -> tuple[int, int] | None:
        """(class, tokens it takes) of the marker the text of ``tokens`` starts with (after
        whitespace; its comma included), the longest where several match; None without one. A
        marker counts when whitespace and then a letter or digit follow it (or its comma), on the
        decoded text (so every tokenizer's pieces are read alike); whitespace inside the text
        counts as one space ("For\nexample")."""
        if not len(tokens) or not self.may_start[tokens[0]]:
            return None
        found, decode = None, self.tokenizer.decode
        ids = tokens[:MAX_MARKER_TOKENS].tolist()
        for n in range(1, len(ids)):
            text = decode(ids[:n])
            low = " ".join(text.lower().split())
            if low not in self.prefixes and not low.endswith("\ufffd"):
                break
            form = low.removesuffix(",")
            if form in self.form_class and not text[-1:].isspace():  # B keeps its whitespace
                after = decode(ids[: n + AFTER_TOKENS])
                if after.startswith(text) and FOLLOWS.match(after, len(text)):
                    found = (self.form_class[form], n)
        return found

    def marked(self, s: Stretch) -> list[tuple[int, int, int]]:
        """(sentence start, class, marker tokens) of each of ``s``'s sentences after its first
        whole one that start with a marker."""
        out = []
        for k in s.cuts[self.may_start[s.text[s.cuts]]].tolist():
            match = self.marker_at(s.text[k : s.last])
            if match is not None:
                out.append((k, *match))
        return out

    # -- examples -------------------------------------------------------------------------------
    def scored(self, ex: Example) -> bool:
        s = self.stretch(ex)
        return s is not None and bool(self.marked(s))

    scored_what = "a sentence after a whole one that starts with one of objective.markers"

    def make_segments(self, ex, s, rng):
        marked = self.marked(s)
        if not marked:
            return [ex.tokens], IGNORE
        k, label, n = marked[int(rng.integers(len(marked)))]
        return [s.text[s.first : k], s.text[k + n : s.last]], label

    def checked_windows(self) -> tuple[list[Example], str]:
        """Up to :data:`SHARE_WINDOWS` validation windows spread over the split."""
        starts = eval_starts(*self.index_space(self.val_store))
        picked = np.linspace(0, len(starts) - 1, min(SHARE_WINDOWS, len(starts))).astype(int)
        windows = self.dataset(self.val_store)
        return [windows[starts[i]] for i in picked.tolist()], f"{len(picked)}"

    def check(self) -> None:
        """Also log the classes' shares over the checked windows (compare val/discourse_acc with
        the largest), and the classes none of them has."""
        super().check()
        examples, which = self.checked_windows()
        counts = Counter(self.sentence_label(ex) for ex in examples)
        counts.pop(IGNORE, None)
        total = sum(counts.values())
        shares = ", ".join(
            f"{self.label_names[y]} {c / total:.0%}" for y, c in counts.most_common(5)
        )
        unseen = [name for y, name in enumerate(self.label_names) if y not in counts]
        log.info(
            "objective=discourse: %d of %s validation windows are scored; their markers: %s "
            "(always guessing the first scores %.2f)%s",
            total,
            which,
            shares,
            counts.most_common(1)[0][1] / total,
            f"; none has {', '.join(unseen)}" if unseen else "",
        )
