"""Discourse relation prediction (ERNIE 2.0: Sun et al., 2020, sec. 4.2.3, "Discourse Relation
Task") with masked LM, for encoders: ``masked`` batches with ``sentence_labels``.

ERNIE 2.0 trains this task on the data of Sileo et al. (2019, "Mining Discourse Markers for
Unsupervised Sentence Representation Learning"): pairs of adjacent sentences whose second one
starts with a discourse marker ("However, ...", "For example, ..."), the marker taken away, and
the class is the marker. Such pairs need no labelling, so this objective mines them from the run's
own text: in a window's whole sentences (as the other sentence-level objectives find them,
:mod:`lmlab.data.sentences`), a sentence after the first whose text starts with one of the
``markers`` (a whole word or phrase, any case, followed by whitespace or by a comma and
whitespace) is a place to cut. One is drawn uniformly; the input is ``cls A sep B sep``, A the
whole sentences before it, B the rest with the marker (and its comma) taken out, masked as
objective=mlm masks, and the label is the marker's class. A window without such a sentence trains
the masked LM only (label not scored).

Each entry of ``markers`` is a class: one marker ("but"), or several that mean the same joined by
"|" ("therefore|thus|hence"); where two match ("for" and "for example"), the longer one counts.
Markers are matched on the decoded text, so every tokenizer works, provided the marker ends on a
token boundary (a tokenizer that merges "But," with the next word leaves that sentence out).

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
from collections import Counter

import numpy as np

from lmlab.data.base import Example, Windows, eval_starts
from lmlab.data.collate import IGNORE
from lmlab.data.denoise import token_texts
from lmlab.data.sentences import SentenceTaskDataModule, Stretch
from lmlab.errors import ConfigError

log = logging.getLogger(__name__)

# Validation windows, spread over the split, whose labels the run logs the shares of
SHARE_WINDOWS = 512

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
        self.longest = max(map(len, self.form_class)) + 1  # with its comma
        low = [t.lstrip().lower() for t in token_texts(tokenizer)]
        self.may_start = np.array([t in self.prefixes for t in low])  # "" too: whitespace
        self.may_start[tokenizer.special_ids] = False
        self._matches: dict[tuple[int, ...], tuple[int, int] | None] = {}
        super().__init__(tokenizer, train, val, seq_len=seq_len, **kwargs)

    @classmethod
    def check_settings(cls, *, markers=DEFAULT_MARKERS, **rest) -> None:
        parse_markers(markers)
        super().check_settings(**rest)

    # -- markers --------------------------------------------------------------------------------
    def marker_at(self, tokens: np.ndarray) -> tuple[int, int] | None:
        """(class, tokens it takes) of the marker the text of ``tokens`` starts with (after
        whitespace; its comma included), the longest where several match; None without one.
        Cached per token sequence."""
        if not len(tokens) or not self.may_start[tokens[0]]:
            return None
        key = tuple(tokens[: self.longest + 2].tolist())  # a byte tokenizer: a token per byte
        if key in self._matches:
            return self._matches[key]
        found, decode = None, self.tokenizer.decode
        text = decode(key[:1])
        for n in range(1, len(key)):
            low = text.lstrip().lower()
            if low not in self.prefixes:
                break
            longer = decode(key[: n + 1])
            after = longer[len(text) :] if longer.startswith(text) else ""
            form = low.removesuffix(",")
            if form in self.form_class and after[:1].isspace():  # a whole word, then whitespace
                found = (self.form_class[form], n)
            text = longer
        self._matches[key] = found
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

    def check(self) -> None:
        """Also log the classes' shares over up to :data:`SHARE_WINDOWS` validation windows
        spread over the split (compare val/discourse_acc with the largest)."""
        super().check()
        starts = eval_starts(len(self.val_store), self.window_len, self.stride)
        picked = np.linspace(0, len(starts) - 1, min(SHARE_WINDOWS, len(starts))).astype(int)
        windows = Windows(self.val_store, self.window_len)
        labels = [self.sentence_label(windows[int(starts[i])]) for i in picked]
        counts = Counter(y for y in labels if y != IGNORE)
        total = sum(counts.values())
        if not total:  # check() found scored windows among the first ones; these may lack them
            return
        shares = ", ".join(
            f"{self.label_names[y]} {c / total:.0%}" for y, c in counts.most_common(5)
        )
        log.info(
            "objective=discourse: %d of %d validation windows are scored; their markers: %s "
            "(always guessing the first scores %.2f)",
            total,
            len(labels),
            shares,
            counts.most_common(1)[0][1] / total,
        )
