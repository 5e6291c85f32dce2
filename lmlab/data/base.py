"""What every pre-training DataModule shares: windows over the token stores, samplers, loaders.

An objective subclasses :class:`WindowDataModule`, declares its ``batch_kind``, says how many raw tokens
one example needs (``window_len``) and how far apart windows start (``stride``), and turns a list of
:class:`Example` into a batch in ``make_batch``. Randomness inside ``make_batch`` (masking, noise) is
drawn from :func:`example_rng`, seeded by (seed, epoch, window start): batches are reproducible, and
validation batches are identical at every validation, so validation metrics are comparable over time.

Training visits non-overlapping windows in a random order with a random phase each epoch (window
boundaries move between epochs and every token is seen once per epoch). Validation uses deterministic
windows that cover the whole validation split.

Subclasses set their own attributes *before* calling ``super().__init__``, which ends by checking that
the splits hold at least one example (a clear error before any training otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from lmlab.data.store import TokenStore
from lmlab.data.tokenizers import TextTokenizer
from lmlab.errors import ConfigError


@dataclass
class Example:
    start: int  # offset of the window in its token store
    tokens: np.ndarray  # int64, at most window_len tokens (shorter only at the end of a split)
    epoch: int = 0  # training epoch (0 for validation), for reproducible per-example randomness


def example_rng(seed: int, ex: Example) -> np.random.Generator:
    return np.random.default_rng((seed, ex.epoch, ex.start))


class Windows(Dataset):
    """Index = (start, epoch); item = the :class:`Example` of ``window_len`` tokens from ``start``."""

    def __init__(self, store: TokenStore, window_len: int) -> None:
        self.store, self.window_len = store, window_len

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: tuple[int, int] | int) -> Example:
        start, epoch = index if isinstance(index, tuple) else (index, 0)
        tokens = np.asarray(self.store.tokens[start : start + self.window_len], dtype=np.int64)
        return Example(start, tokens, epoch)


class RandomWindowSampler(Sampler[tuple[int, int]]):
    """Yields (start, epoch): starts ``phase + k * stride`` in random order, new phase every epoch."""

    def __init__(self, n_tokens: int, window_len: int, stride: int, seed: int) -> None:
        self.window_len, self.stride, self.seed, self.epoch = window_len, stride, seed, 0
        # Same count for every phase: a window must end inside the stream whatever the phase.
        self.n = max(0, (n_tokens - window_len - (stride - 1)) // stride + 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        phase = int(rng.integers(self.stride))
        for k in rng.permutation(self.n):
            yield phase + int(k) * self.stride, self.epoch


def eval_starts(n_tokens: int, window_len: int, stride: int) -> list[int]:
    """Starts 0, stride, 2*stride, ... until the windows have covered the whole split.

    With ``stride = window_len - 1`` (causal LM: inputs and shifted labels overlap by one token) every
    token after the first is a target exactly once; with ``stride = window_len`` every token is in
    exactly one window.
    """
    return list(range(0, n_tokens - (window_len - stride), stride))


class WindowDataModule(L.LightningDataModule):
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
        name: str = "",
    ) -> None:
        super().__init__()
        self.tokenizer, self.train_store, self.val_store = tokenizer, train, val
        self.seq_len, self.batch_size, self.seed, self.name = seq_len, batch_size, seed, name
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.check()

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

    # -- shared ----------------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse splits too short for one example (called at construction, before training)."""
        if (
            self.train_store is not None
            and len(self.train_store) < self.window_len + self.stride - 1
        ):
            raise ConfigError(
                f"the training split has {len(self.train_store)} tokens, fewer than one window of "
                f"{self.window_len + self.stride - 1} (objective={self.name}, seq_len={self.seq_len}); "
                "add text or lower seq_len"
            )
        if len(self.val_store) < 2:
            raise ConfigError("the validation split has no targets; add validation text")

    def _loader(self, store: TokenStore, sampler, batch_size: int) -> DataLoader:
        return DataLoader(
            Windows(store, self.window_len),
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.make_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        sampler = RandomWindowSampler(
            len(self.train_store), self.window_len, self.stride, self.seed
        )
        return self._loader(self.train_store, sampler, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        starts = eval_starts(len(self.val_store), self.window_len, self.stride)
        return self._loader(self.val_store, starts, self.eval_batch_size)

    def val_examples(self, n: int) -> list[Example]:
        """The first ``n`` validation windows (for samples and reconstructions)."""
        ds = Windows(self.val_store, self.window_len)
        return [ds[s] for s in eval_starts(len(self.val_store), self.window_len, self.stride)[:n]]
