"""What every pre-training DataModule shares: windows over the token stores, samplers, loaders.

An objective subclasses :class:`WindowDataModule`, declares its ``batch_kind``, says how many raw tokens
one example needs (``window_len``) and how far apart windows start (``stride``), and turns a list of
:class:`Example` into a batch in ``make_batch``. Randomness inside ``make_batch`` (masking, noise) is
drawn per example from (seed, epoch, window start) only, with :func:`example_keys` (a counter-based
generator, vectorized over a batch) or :func:`example_rng` (a numpy generator, per example): batches
are reproducible, an example's randomness does not depend on its batch, worker or process, and
validation batches are identical at every validation, so validation metrics are comparable over time.

Training visits windows ``stride`` apart in a random order with a random phase each epoch, so window
boundaries move between epochs. Within an epoch no token is trained on twice (a causal LM's windows
share only the token that is one's last label and the next one's first input), but not every token is
seen: the tokens before the phase and after the last whole window, and the windows cut so that every
step gets a whole batch (:class:`RandomWindowSampler`), are left out, different ones each epoch.
Validation uses deterministic windows that cover the whole validation split. The training loader is
resumable mid-epoch (:class:`ResumableLoader`): a run resumed from a checkpoint trains on exactly the
batches that it would have used had it never stopped.

An objective whose examples are not windows of the token stream (objective=tlm: groups of whole
translation pairs; objective=ir_relevance: one pair, a row) numbers them itself: ``index_space``
gives the positions the samplers draw (and validation walks), ``dataset`` the example of each; the
samplers, sharding, resuming and validation padding are the same.

Subclasses set their own attributes *before* calling ``super().__init__``, which ends by checking that
the splits hold at least one example (a clear error before any training otherwise).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, Sampler

from lmlab.data.collate import GOLDEN_GAMMA, IGNORE, mix64, seq2seq_batch
from lmlab.data.store import TABLE_PARTS, TokenStore
from lmlab.data.tokenizers import TextTokenizer
from lmlab.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Example:
    start: int  # offset of the window in its token store
    tokens: np.ndarray  # int64, at most window_len tokens (shorter only at the end of a split)
    epoch: int = 0  # training epoch (0 for validation), for reproducible per-example randomness
    scored: bool = True  # False: a validation rank's padding window, its labels all ignored
    # the token store the window comes from (objectives that draw other text from it: nsp)
    store: TokenStore | None = field(default=None, repr=False, compare=False)


def example_rng(seed: int, ex: Example) -> np.random.Generator:
    """A numpy generator for one example, seeded by (seed, epoch, start): for per-example code
    (prefix lengths, BART noise); ~20 us to make, so batched objectives use :func:`example_keys`."""
    return np.random.default_rng((seed, ex.epoch, ex.start))


def example_keys(seed: int, examples: Sequence[Example]) -> np.ndarray:
    """(B,) uint64 keys of the counter-based generator (:func:`lmlab.data.collate.random_bits`), one
    per example, a hash of (seed, epoch, start) only: the key, and so every draw made with it, is the
    same in any batch, worker or process."""
    epoch = np.array([ex.epoch for ex in examples], dtype=np.uint64)
    start = np.array([ex.start for ex in examples], dtype=np.uint64)
    # Chained splitmix64 steps: each mixes in one part; mix64 is a bijection, so for one (seed,
    # epoch) distinct starts always get distinct keys.
    key = mix64(np.full(len(examples), seed % 2**64, dtype=np.uint64) + GOLDEN_GAMMA)
    key = mix64((key ^ epoch) + GOLDEN_GAMMA)
    return mix64((key ^ start) + GOLDEN_GAMMA)


class Windows(Dataset):
    """Index = (start, epoch); item = the :class:`Example` of ``window_len`` tokens from ``start``."""

    def __init__(self, store: TokenStore, window_len: int) -> None:
        self.store, self.window_len = store, window_len

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: tuple[int, int] | int) -> Example:
        """``start``, ``(start, epoch)``, or ``(start, epoch, scored)``."""
        start, epoch, *scored = index if isinstance(index, tuple) else (index, 0)
        tokens = np.asarray(self.store.tokens[start : start + self.window_len], dtype=np.int64)
        return Example(start, tokens, epoch, *scored, store=self.store)


class TokenSpans(Dataset):
    """Index = (span, epoch); item = the :class:`Example` of the tokens ``spans[span]`` (``[start,
    end)`` in the store; its start, unique in the store, keys the example's random draws): the
    examples of objectives whose index space is their own (``index_space``: tlm's groups of pairs,
    mcp's runs of columns, ir_relevance's rows)."""

    def __init__(self, store: TokenStore, spans: np.ndarray) -> None:
        self.store, self.spans = store, spans

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, index: tuple[int, int] | int) -> Example:
        """``span``, ``(span, epoch)``, or ``(span, epoch, scored)``."""
        span, epoch, *scored = index if isinstance(index, tuple) else (index, 0)
        a, b = (int(x) for x in self.spans[span])
        tokens = np.asarray(self.store.tokens[a:b], dtype=np.int64)
        return Example(a, tokens, epoch, *scored, store=self.store)


class RandomWindowSampler(Sampler[tuple[int, int]]):
    """Yields (start, epoch): starts ``phase + k * stride`` in random order, new phase every epoch.

    The order depends only on (seed, epoch). The epoch is cut to whole multiples of ``batch_size``
    per rank (the loader sets it to one optimizer step's micro-batches), so every step trains on
    the same number of windows (no short batch at an epoch's end,
    which would also make ``torch.compile`` recompile for a dynamic batch size); the windows left
    out differ from epoch to epoch. With several processes, rank ``r`` of ``world`` takes positions
    r, r + world, ... of that order, so one step's windows across all ranks are exactly one
    process's batch of ``world`` times the size: multi-device training sees the same data as one
    device with the same global batch. (lmlab shards itself:
    Lightning's ``DistributedSamplerWrapper`` would shuffle the order again; the trainer presets set
    ``use_distributed_sampler: false``.) ``skip`` leaves out the first ``skip`` windows of this rank's
    order (the ones a resumed run already trained on; set by :class:`ResumableLoader` before each
    pass); ``len`` stays the whole epoch's, as Lightning counts an epoch's batches from its start.
    """

    def __init__(
        self,
        n_tokens: int,
        window_len: int,
        stride: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        batch_size: int = 1,
    ) -> None:
        self.window_len, self.stride, self.seed, self.epoch = window_len, stride, seed, 0
        self.rank, self.world, self.batch_size = rank, world, batch_size
        # Same count for every phase: a window must end inside the stream whatever the phase.
        self.n = max(0, (n_tokens - window_len - (stride - 1)) // stride + 1)
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Windows of this rank per epoch: whole batches only."""
        return self.n // self.world // self.batch_size * self.batch_size

    def __iter__(self):
        epoch = self.epoch
        rng = np.random.default_rng((self.seed, epoch))
        phase = int(rng.integers(self.stride))
        order = rng.permutation(self.n)[: len(self) * self.world][self.rank :: self.world]
        for k in order[self.skip :]:
            yield phase + int(k) * self.stride, epoch


class ResumableLoader(DataLoader):
    """The training loader: a ``DataLoader`` over a :class:`RandomWindowSampler` that remembers how
    far into its epoch training got, so that a resumed run continues the epoch instead of restarting.

    Lightning saves :meth:`state_dict` in every checkpoint (under
    ``loops.fit_loop.state_dict.combined_loader``: having both methods makes the loader
    ``_Stateful`` to its ``CombinedLoader``) and, on resume, hands it to :meth:`load_state_dict` in
    ``FitLoop.setup_data``, before it iterates. The state is the epoch and the number of its windows
    already trained on; the next pass over that epoch skips them at the index level (nothing is
    loaded for them). The order and every example's randomness depend only on (seed, epoch, window
    start), so the rest of the epoch is exactly the uninterrupted run's.

    The position counts batches handed to Lightning, which equals batches trained on wherever
    checkpoints are written (``on_train_batch_end``, ``on_validation_end``, lmlab's SIGTERM save at
    the end of a step): Lightning's ``_PrefetchDataFetcher`` fetches no batch ahead when the loader
    has a length (ours always has), and the workers' prefetching happens below this count. Lightning
    relies on the same equality: on resume it sets its fetcher's count to the batches done in the
    epoch (``_TrainingEpochLoop.on_run_start``) and expects the loader to yield the remaining ones.
    A checkpoint written while a batch is in flight (Lightning's ``OnExceptionCheckpoint`` after an
    error in ``training_step``; lmlab writes none such) counts that batch, which Lightning then
    trains again: the resumed run would skip one batch.

    Gradient accumulation: Lightning writes checkpoints after optimizer steps, so the position is a
    whole number of accumulation windows (or the epoch's end) and no half-accumulated gradient is
    lost. A checkpoint saved by hand between micro-batches would resume after the batches it
    counted, without their gradients.

    Optimizer steps weigh every target alike: each batch carries ``step_targets``, the target count
    (labels other than -100) of all the micro-batches of its optimizer step on this process (the
    loader reads ahead the ``accumulation`` micro-batches of a step; steps start at the epoch's
    batch indices that are multiples of ``accumulation``, as Lightning's, and a step cut short by
    ``trainer.limit_train_batches`` counts only its batches). The module turns it into
    the step's total over all processes and scales each micro-batch's summed loss by it
    (:meth:`lmlab.models.base.LMModule.training_step`), so the step's gradient is the large batch's
    whatever the target counts of its micro-batches (prefix LM's vary). Batches with an auxiliary
    head's labels (``*_labels``) carry their step counts too, as ``step_aux_targets`` (one per key,
    in :func:`aux_label_keys` order), so that head's labels weigh alike across the step as well.

    Why a stateful loader rather than ``train_dataloader()`` reading the restored progress: at that
    call (``FitLoop.setup_data``) Lightning has not yet applied its restart adjustments (the
    in-epoch ``completed`` count is one short for a checkpoint written in ``on_train_batch_end``
    until ``_TrainingEpochLoop.reset``; a checkpoint at an epoch's last batch moves to the next
    epoch only in ``FitLoop.reset``), so that route would copy private Lightning logic. The state
    interface is Lightning's documented way, and it also silences its "dataloader is not resumable"
    warning.
    """

    _resume: dict[str, int] | None = None  # loaded, not yet applied to a pass
    _position: tuple[int, int] | None = None  # (epoch, windows handed out) of the current pass

    def __init__(
        self,
        *args,
        accumulation: int = 1,
        batch_limit: Callable[[], float] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.accumulation = accumulation
        self.batch_limit = batch_limit

    def state_dict(self) -> dict[str, int]:
        if self._resume is not None:  # restored but not iterated yet: keep the restored position
            return dict(self._resume)
        epoch, done = self._position or (getattr(self.sampler, "epoch", 0), 0)
        n = len(self.sampler)
        if done >= n:  # the epoch is finished: the next one starts from its beginning
            epoch, done = epoch + 1, 0
        world = getattr(self.sampler, "world", 1)
        return {
            "epoch": epoch,
            "windows": done,
            "epoch_windows": n,
            "world": world,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not isinstance(self.sampler, RandomWindowSampler):
            # Lightning wraps it in a DistributedSamplerWrapper on several devices; its windows are
            # sharded after our order, so a position in our order does not apply.
            _warn(
                "the training sampler is a %s, not lmlab's own: the resumed epoch restarts from "
                "its first batch",
                type(self.sampler).__name__,
            )
            return
        layout = (state.get("world", self.sampler.world), state.get("batch_size", self.batch_size))
        if layout != (self.sampler.world, self.batch_size):
            # Positions count this rank's windows and batches, and Lightning's restored batch
            # count sets where gradient accumulation steps: neither carries over exactly.
            _warn(
                "the checkpoint was written by %d process(es) with data.batch_size=%d, this run has "
                "%d with %d: the resumed epoch continues only approximately (some of its windows "
                "may be trained twice or skipped); resume with the same process count and batch "
                "size to continue exactly",
                *layout,
                self.sampler.world,
                self.batch_size,
            )
        elif state["epoch_windows"] != len(self.sampler):
            _warn(
                "the checkpoint's epoch had %d training windows, this run's has %d (data, seq_len "
                "or objective changed): the resumed epoch's order differs from the original",
                state["epoch_windows"],
                len(self.sampler),
            )
        self._resume = dict(state)
        self.sampler.set_epoch(state["epoch"])

    def __iter__(self):
        # A generator: its body runs at the first batch request, after Lightning's set_epoch,
        # although Lightning makes the iterator before it (FitLoop.setup_data, then
        # on_advance_start). Only then are the epoch and the skip final, and only then are workers
        # started and fed indices.
        sampler = self.sampler
        epoch = getattr(sampler, "epoch", 0)
        resume, self._resume = self._resume, None
        skip = 0
        if resume is not None and resume["epoch"] == epoch:
            # Lightning may go on to the next epoch instead (the checkpoint was at the last batch of
            # a `limit_train_batches`-shortened epoch): then this pass starts from the beginning.
            skip = resume["windows"]
        if isinstance(sampler, RandomWindowSampler):
            sampler.skip = skip
        self._position = (epoch, skip)
        batches = super().__iter__()
        index = skip // self.batch_size  # the epoch's batch index
        # the batches Lightning takes this epoch (trainer.limit_train_batches): its last step may
        # be short, and its targets are those of the batches trained only
        limit = self.batch_limit() if self.batch_limit is not None else math.inf
        while True:
            size = min(self.accumulation - index % self.accumulation, max(limit - index, 1))
            step = list(islice(batches, int(size)))
            if not step:
                break
            # Counted by numpy on the host arrays (a third of the time of torch's small-tensor
            # ops); each batch gets a tensor of its own (all-reduced in place), pinned as the rest.
            labelled = all(isinstance(b, dict) and "labels" in b for b in step)
            if labelled:
                targets = sum(int(np.count_nonzero(b["labels"].numpy() != IGNORE)) for b in step)
                # an auxiliary head's labels ("*_labels", in the order of aux_label_keys)
                aux = [
                    sum(int(np.count_nonzero(b[key].numpy() != IGNORE)) for b in step)
                    for key in aux_label_keys(step[0])
                ]
            for batch in step:
                if labelled:
                    count = torch.tensor(targets)
                    batch["step_targets"] = count.pin_memory() if self.pin_memory else count
                    if aux:
                        count = torch.tensor(aux)
                        batch["step_aux_targets"] = count.pin_memory() if self.pin_memory else count
                epoch, done = self._position
                self._position = (epoch, min(done + self.batch_size, len(sampler)))
                index += 1
                yield batch


# WindowDataModule's settings that a run gives from the top level and data.*, not objective.*
RUNTIME_SETTINGS = ("seq_len", "batch_size", "eval_batch_size", "num_workers", "seed")


def check_document_mask(value) -> None:
    """``objective.document_mask`` (the objectives whose windows pack documents: clm, prefix_lm,
    mlm, capital_word, tlm) is a boolean."""
    if not isinstance(value, bool):
        raise ConfigError(f"objective.document_mask must be true or false, got {value!r}")


def check_head_weight(key: str, weight) -> None:
    """Refuse an auxiliary head's loss weight (``objective.<key>``) that is not a finite number
    >= 0."""
    if isinstance(weight, bool) or not (isinstance(weight, int | float) and 0 <= weight < math.inf):
        raise ConfigError(
            f"objective.{key}={weight!r} must be a finite number >= 0 (the weight of the auxiliary "
            "head's loss in the training loss; 0 trains the masked LM only)"
        )


def head_settings(kind: str, task: str, classes: int, weight: float) -> dict:
    """The model's arguments for an auxiliary head (``kind``: sentence or token; see
    :class:`lmlab.models.encoder.EncoderLM`)."""
    return {f"{kind}_task": task, f"{kind}_classes": classes, f"{kind}_weight": weight}


def aux_label_keys(batch: dict) -> list[str]:
    """The label keys of a batch's auxiliary heads (``sentence_labels``, ``token_labels``), in
    the order of the loader's ``step_aux_targets``."""
    return sorted(k for k in batch if k.endswith("_labels"))


def scored_only(make_batch: Callable[[list[Example]], dict], examples: list[Example]) -> dict:
    """``make_batch(examples)`` with the labels of the padding examples (``scored=False``) all
    ignored (``labels`` and an auxiliary head's ``*_labels``): they add nothing to a metric (token
    counts and bytes come from the labels)."""
    batch = make_batch(examples)
    padding = [i for i, ex in enumerate(examples) if not ex.scored]
    if padding:
        for key in batch:
            if key == "labels" or key.endswith("_labels"):
                batch[key][padding] = IGNORE
    return batch


def _warn(msg: str, *args) -> None:
    if rank_zero_only.rank == 0:
        log.warning(msg, *args)


def eval_starts(n_tokens: int, window_len: int, stride: int) -> list[int]:
    """Starts 0, stride, 2*stride, ... until the windows have covered the whole split.

    With ``stride = window_len - 1`` (causal LM: inputs and shifted labels overlap by one token) every
    token after the first is a target exactly once; with ``stride = window_len`` every token is in
    exactly one window.
    """
    return list(range(0, n_tokens - (window_len - stride), stride))


class WindowDataModule(L.LightningDataModule):
    objective = ""  # the objective config's name (named in errors), each subclass's own
    batch_kind = ""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        train: TokenStore | None,
        val: TokenStore,
        *,
        seq_len: int,
        batch_size: int,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer, self.train_store, self.val_store = tokenizer, train, val
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.name = name or self.objective  # named in errors
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        # Build batches in pinned host memory: None = when the trainer's device is CUDA
        self.pin_memory: bool | None = None
        self.check()

    @classmethod
    def settings(cls) -> dict:
        """The objective's keyword settings (the ``objective.*`` keys, ``seq_len`` and the loader
        sizes) with their defaults (``inspect.Parameter.empty`` where required), gathered over the
        constructors of the class and its bases."""
        out = {}
        for klass in reversed(cls.__mro__):
            init = vars(klass).get("__init__")
            if init is not None and issubclass(klass, WindowDataModule):
                params = inspect.signature(init).parameters.values()
                out.update({p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY})
        return out

    @classmethod
    def objective_settings(cls) -> dict:
        """The ``objective.*`` keys of :meth:`settings`: without ``seq_len``, the loader sizes and
        the seed, which come from the top level and ``data.*``."""
        return {k: v for k, v in cls.settings().items() if k not in RUNTIME_SETTINGS}

    @classmethod
    def check_settings(cls, **settings) -> None:
        """Refuse settings that are wrong whatever the data. Called by the constructor, and by
        ``lmlab.train`` before any data work with every setting (defaults filled in), ``seq_len``
        and ``num_sentinels`` (the tokenizer's; None when not known before it is built).
        Subclasses check their own keys and pass the rest on."""

    def model_settings(self) -> dict:
        """Keyword arguments the model is built with besides its own config, saved with its
        checkpoint: what an auxiliary head needs
        (:class:`lmlab.data.sentences.SentenceTaskDataModule`), how a prefix LM reads prompts
        (:class:`lmlab.data.prefix_lm.PrefixLMDataModule`); none here."""
        return {}

    # -- what a subclass defines -----------------------------------------------------------------
    @property
    def window_len(self) -> int:
        """Raw tokens one example is made from."""
        return self.seq_len

    @property
    def stride(self) -> int:
        return self.window_len

    def make_batch(self, examples: list[Example]) -> dict:
        raise NotImplementedError

    def store_index(self, store: TokenStore, build: Callable[[TokenStore], Any]) -> Any:
        """``build(store)``, made once per store: an objective's index of its examples in it
        (tlm's groups of pairs, mcp's runs of columns, ir_relevance's title lengths). The first
        call is at construction (:meth:`check` asks :meth:`index_space`), before the loader's
        workers fork, so they share it."""
        cache = self.__dict__.setdefault("_store_index", {})
        key = (store.path, self.window_len)
        if key not in cache:
            cache[key] = build(store)
        return cache[key]

    def index_space(self, store: TokenStore) -> tuple[int, int, int]:
        """(positions, length, stride) that the samplers draw example starts from: the store's
        tokens, windows of :attr:`window_len` every :attr:`stride` here; an objective whose
        examples are not windows (objective=tlm: groups of whole pairs) numbers them itself,
        ``(n, 1, 1)`` for n examples, with :meth:`dataset` making the example of each. Each
        Example's ``start`` must be unique in its store (its random draws hash it): the token
        offset where the example's text starts serves."""
        return len(store), self.window_len, self.stride

    def dataset(self, store: TokenStore) -> Dataset:
        """Index (position, epoch) of :meth:`index_space` -> the :class:`Example`."""
        return Windows(store, self.window_len)

    @property
    def examples_what(self) -> str:
        """What the examples are, for messages."""
        return f"windows of {self.window_len} tokens"

    rows_grow_with_shorter_seq_len = True  # a lower seq_len makes more examples (for messages)

    # Pairs of texts (data.text_field=[a, b]: documents "a <sep> b <eos>", TokenStore.parts == 2):
    # ``pair_fields`` names the two for an objective that trains on pairs and refuses anything
    # else; other objectives read pairs as text, unless ``pairs_as_text`` is False.
    pair_fields: tuple[str, str] | None = None
    pairs_as_text = True
    # Tables (.csv / .tsv files: documents of column names and values, TokenStore.parts ==
    # TABLE_PARTS): ``tables`` for an objective that trains on them and refuses anything else;
    # the others read them as text, except those that refuse pairs (``pairs_as_text`` False) and
    # those on pairs.
    tables = False

    def check_parts(self) -> None:
        """Refuse stores of the wrong kind: plain text for an objective on pairs or tables, pairs
        or tables for one that cannot read them as text."""
        for split, store in (("training", self.train_store), ("validation", self.val_store)):
            if store is None:
                continue
            held = "tables" if store.parts == TABLE_PARTS else f"{store.parts} text(s) per document"
            if self.tables and store.parts != TABLE_PARTS:
                raise ConfigError(
                    f"objective={self.name} trains on tables, but the {split} split holds {held}; "
                    "use CSV or TSV files (their first row the column names): data=files "
                    "data.train='tables/*.csv'"
                )
            if self.pair_fields and store.parts != 2:
                a, b = self.pair_fields
                raise ConfigError(
                    f"objective={self.name} trains on pairs of texts ({a}, {b}), but the {split} "
                    f"split holds {held}; use JSONL rows of pairs: "
                    f"data=files data.train=pairs.jsonl data.text_field=[{a},{b}]"
                )
            if not self.pair_fields and not self.pairs_as_text and store.parts != 1:
                what = (
                    "tables, whose separators"
                    if store.parts == TABLE_PARTS
                    else "pairs of texts (data.text_field lists two fields), whose separator"
                )
                raise ConfigError(
                    f"objective={self.name} cuts text into segments, but the {split} split holds "
                    f"{what} would fall inside them; use text files"
                    + ("" if store.parts == TABLE_PARTS else " or one text field")
                )

    # -- shared ----------------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse stores of the wrong kind (:meth:`check_parts`) and splits too short for one
        example (called at construction, before training)."""
        self.check_parts()
        if self.train_store is not None:
            positions, length, stride = self.index_space(self.train_store)
            windows = type(self).index_space is WindowDataModule.index_space
            if positions < length + stride - 1 and not windows:
                raise ConfigError(
                    f"the training split makes no {self.examples_what} for objective={self.name}; "
                    "add text"
                )
            if positions < length + stride - 1:
                raise ConfigError(
                    f"the training split has {len(self.train_store)} tokens; objective="
                    f"{self.name} with seq_len={self.seq_len} needs at least "
                    f"{self.window_len + self.stride - 1} (windows of {self.window_len} tokens "
                    f"start at a random offset of up to {self.stride - 1}); add text or lower "
                    "seq_len"
                )
            # one process here; train_dataloader checks them all
            self._check_batches(RandomWindowSampler(positions, length, stride, 0).n, 1)
        if len(self.val_store) < 2:
            raise ConfigError("the validation split has no targets; add validation text")
        windows = type(self).index_space is WindowDataModule.index_space
        if windows and len(self.val_store) < self.window_len:
            training = self.train_store is not None  # else lmlab.evaluate's split
            _warn(
                "the %s split has %d tokens, less than one window of %d: its scores rest on "
                "those alone (noisy)%s",
                "validation" if training else "evaluated",
                len(self.val_store),
                self.window_len,
                "; give more validation text (data.val, data.val_fraction)" if training else "",
            )

    def _loader(
        self,
        store: TokenStore,
        sampler,
        batch_size: int,
        cls: type[DataLoader] = DataLoader,
        **kwargs,
    ) -> DataLoader:
        kwargs.setdefault("collate_fn", self.make_batch)
        return cls(
            self.dataset(store),
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self._pinned(),
            **kwargs,
        )

    def _pinned(self) -> bool:
        """Whether batches are built in pinned host memory: by default when they go to a CUDA
        device, so that Lightning's non-blocking transfer neither waits for the GPU nor stages
        through a copy."""
        if self.pin_memory is not None:
            return self.pin_memory
        t = self.trainer
        return t is not None and t.strategy.root_device.type == "cuda"

    def _shard(self) -> tuple[int, int]:
        """(rank, world size) of this process; (0, 1) outside a Trainer."""
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self) -> ResumableLoader:
        rank, world = self._shard()
        # Whole optimizer steps: with gradient accumulation an epoch of whole micro-batches could
        # still end inside a step, which Lightning would then take early on fewer sequences.
        accumulation = getattr(self.trainer, "accumulate_grad_batches", 1)
        sampler = RandomWindowSampler(
            *self.index_space(self.train_store),
            self.seed,
            rank,
            world,
            batch_size=self.batch_size * accumulation,
        )
        self._check_batches(sampler.n, world, accumulation)
        return self._loader(
            self.train_store,
            sampler,
            self.batch_size,
            ResumableLoader,
            accumulation=accumulation,
            batch_limit=self._training_batches,
        )

    def _training_batches(self) -> float:
        """Lightning's count of this epoch's training batches (``limit_train_batches`` applied;
        known once the loader exists, read when a pass starts)."""
        return getattr(self.trainer, "num_training_batches", math.inf)

    def _check_batches(self, windows: int, world: int, accumulation: int = 1) -> None:
        if windows < self.batch_size * accumulation * world:
            per_step = f"data.batch_size={self.batch_size}"
            per_step += f" x {accumulation} accumulated" if accumulation > 1 else ""
            per_step += f" x {world} processes" if world > 1 else ""
            raise ConfigError(
                f"the training split makes {windows} {self.examples_what}, fewer than one "
                f"optimizer step's batch of {per_step}; add text, or lower data.batch_size"
                + (
                    ", global_batch_size or seq_len"
                    if self.rows_grow_with_shorter_seq_len
                    else " or global_batch_size"
                )
            )

    def val_dataloader(self) -> DataLoader:
        # Each rank scores every world-th window, so no window counts twice; the torchmetrics
        # states are summed across ranks, so the metrics cover the split exactly once. Ranks left
        # a window short get a padding window whose labels are all ignored: every rank runs as
        # many batches (under FSDP each forward gathers the weights with the other ranks, and a
        # rank with a batch more waited for them forever).
        rank, world = self._shard()
        every = eval_starts(*self.index_space(self.val_store))
        starts: list = every[rank::world]
        starts += [(every[0], 0, False)] * (-(-len(every) // world) - len(starts))
        return self._loader(
            self.val_store,
            starts,
            self.eval_batch_size,
            collate_fn=partial(scored_only, self.make_batch),
        )

    def val_examples(self, n: int) -> list[Example]:
        """The first ``n`` validation examples (for samples and reconstructions)."""
        ds = self.dataset(self.val_store)
        return [ds[s] for s in eval_starts(*self.index_space(self.val_store))[:n]]


class Seq2SeqDataModule(WindowDataModule):
    """Shared by encoder-decoder objectives: ``corrupt(example) -> (encoder input, decoder target)``
    (each ending with eos) makes the example; batches have ``seq_len`` inputs and ``target_len``
    targets (:func:`lmlab.data.collate.seq2seq_batch`)."""

    batch_kind = "seq2seq"

    @property
    def target_len(self) -> int:
        raise NotImplementedError

    @classmethod
    def target_length(cls, *, seq_len: int, **settings) -> int:
        """:attr:`target_len` from the settings alone (checked against the model's decoder
        positions before any work)."""
        raise NotImplementedError

    def corrupt(self, ex: Example) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def make_batch(self, examples: list[Example]) -> dict:
        pairs = [self.corrupt(ex) for ex in examples]
        tok = self.tokenizer
        return seq2seq_batch(
            [x for x, _ in pairs],
            [y for _, y in pairs],
            self.seq_len,
            self.target_len,
            tok.pad_id,
            tok.bos_id,
        )
