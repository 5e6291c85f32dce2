"""Prefix language modelling (Raffel et al., 2020, sec. 3.2.1; Dong et al., 2019): ``prefix`` batches.

Like causal LM, each example is ``seq_len + 1`` tokens, but its first ``prefix_len`` positions (drawn
uniformly from 1 .. seq_len - 1 per example) attend to each other bidirectionally; positions after the
prefix are causal. The loss covers only the tokens after the prefix. The decoder it trains reads a
prompt as its prefix when it generates (``DecoderLM.prefix_prompts``).
"""

from __future__ import annotations

import numpy as np
import torch

from lmlab.data.base import Example, example_rng
from lmlab.data.clm import CausalLMDataModule
from lmlab.data.collate import IGNORE


class PrefixLMDataModule(CausalLMDataModule):
    objective, batch_kind = "prefix_lm", "prefix"

    def model_settings(self) -> dict:
        """The decoder reads a prompt as the prefix when it generates, as training read them."""
        return {"prefix_prompts": True}

    def make_batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        batch = super().make_batch(examples)
        prefix = np.empty(len(examples), dtype=np.int64)
        for b, ex in enumerate(examples):
            n = len(ex.tokens) - 1  # real positions in this row
            prefix[b] = example_rng(self.seed, ex).integers(1, n) if n > 1 else 1
            # position t predicts token t+1; targets inside the prefix are not scored
            batch["labels"][b, : prefix[b] - 1] = IGNORE
        batch["prefix_len"] = torch.from_numpy(prefix)
        return batch
