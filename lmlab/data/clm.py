"""Causal language modelling (GPT-style next-token prediction): ``causal`` batches.

Each example is ``seq_len + 1`` consecutive tokens of the packed stream (documents separated by eos);
inputs are the first ``seq_len``, labels the last ``seq_len``. Consecutive windows overlap by one token
(stride ``seq_len``), so validation scores every token after the first exactly once.
"""

from __future__ import annotations

from lmlab.data.base import Example, WindowDataModule
from lmlab.data.collate import causal_batch


class CausalLMDataModule(WindowDataModule):
    objective, batch_kind = "clm", "causal"

    @property
    def window_len(self) -> int:
        return self.seq_len + 1

    @property
    def stride(self) -> int:
        return self.seq_len

    def make_batch(self, examples: list[Example]) -> dict:
        return causal_batch([ex.tokens for ex in examples], self.seq_len, self.tokenizer.pad_id)
