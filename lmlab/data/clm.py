"""Causal language modelling data (GPT-style next-token prediction): ``causal`` batches.

Training: non-overlapping windows of ``seq_len + 1`` tokens over the packed training stream, visited in a
random order with a random phase each epoch (so window boundaries move between epochs and every token is
seen once per epoch). Validation: deterministic non-overlapping windows that cover the whole validation
split, so every validation token after the first is a target exactly once and ``val/bpb`` is a property
of the split, not of a sample.
"""

from __future__ import annotations

from functools import partial

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from lmlab.data.collate import causal_batch
from lmlab.data.store import TokenStore
from lmlab.data.tokenizers import TextTokenizer
from lmlab.errors import ConfigError


class Windows(Dataset):
    """Index = start offset; item = ``tokens[start : start + seq_len + 1]`` (shorter at the end)."""

    def __init__(self, store: TokenStore, seq_len: int) -> None:
        self.store, self.seq_len = store, seq_len

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, start: int) -> np.ndarray:
        return np.asarray(self.store.tokens[start : start + self.seq_len + 1], dtype=np.int64)


class RandomWindowSampler(Sampler[int]):
    """Start offsets ``phase + k * seq_len`` in a random order; phase and order change every epoch."""

    def __init__(self, n_tokens: int, seq_len: int, seed: int) -> None:
        self.n_tokens, self.seq_len, self.seed, self.epoch = n_tokens, seq_len, seed, 0
        # Same count for every phase: windows must end inside the stream whatever the phase.
        self.n = (n_tokens - seq_len) // seq_len

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        phase = int(rng.integers(self.seq_len))
        yield from (phase + int(k) * self.seq_len for k in rng.permutation(self.n))


def eval_starts(n_tokens: int, seq_len: int) -> list[int]:
    """Window starts 0, T, 2T, ... whose targets cover tokens 1 .. n_tokens - 1 exactly once."""
    return list(range(0, n_tokens - 1, seq_len))


class CausalLMDataModule(L.LightningDataModule):
    batch_kind = "causal"

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
        name: str = "clm",
    ) -> None:
        super().__init__()
        if train is not None and len(train) < seq_len + 1:
            raise ConfigError(
                f"the training split has {len(train)} tokens, fewer than one window of seq_len+1="
                f"{seq_len + 1}; add text or lower seq_len"
            )
        if len(val) < 2:
            raise ConfigError("the validation split has no targets; add validation text")
        self.tokenizer, self.train_store, self.val_store = tokenizer, train, val
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.collate = partial(causal_batch, seq_len=seq_len, pad_id=tokenizer.pad_id)

    def _loader(self, store: TokenStore, sampler, batch_size: int) -> DataLoader:
        return DataLoader(
            Windows(store, self.seq_len),
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        sampler = RandomWindowSampler(len(self.train_store), self.seq_len, self.seed)
        return self._loader(self.train_store, sampler, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        starts = eval_starts(len(self.val_store), self.seq_len)
        return self._loader(self.val_store, starts, self.eval_batch_size)

    def prompts(self, n: int, length: int) -> list[list[int]]:
        """The first ``length`` tokens of the first ``n`` validation documents (for samples)."""
        offs = self.val_store.offsets
        return [
            np.asarray(self.val_store.tokens[offs[d] : min(offs[d] + length, offs[d + 1])]).tolist()
            for d in range(min(n, self.val_store.n_docs))
        ]
