"""Causal language modelling (GPT-style next-token prediction): ``causal`` batches.

Each example is ``seq_len + 1`` consecutive tokens of the packed stream (documents separated by eos);
inputs are the first ``seq_len``, labels the last ``seq_len``. Consecutive windows overlap by one token
(stride ``seq_len``), so validation scores every token after the first exactly once.

With ``document_mask=true`` the batches also carry ``doc_ids`` (:func:`lmlab.data.collate.document_ids`):
each position attends only to the earlier positions of its own document, so a packed window computes
what each of its documents would alone (document masking, as in Llama 3's pre-training; Dubey et al.,
2024). Rotary positions need no restart: a document's outputs do not depend on where it starts.
"""

from __future__ import annotations

import torch

from lmlab.data.base import Example, WindowDataModule, check_document_mask
from lmlab.data.collate import causal_batch, document_ids


class CausalLMDataModule(WindowDataModule):
    objective, batch_kind = "clm", "causal"

    def __init__(self, tokenizer, train, val, *, document_mask: bool = False, **kwargs) -> None:
        self.check_settings(document_mask=document_mask)
        self.document_mask = document_mask
        super().__init__(tokenizer, train, val, **kwargs)

    @classmethod
    def check_settings(cls, *, document_mask: bool = False, **rest) -> None:
        check_document_mask(document_mask)
        super().check_settings(**rest)

    @property
    def window_len(self) -> int:
        return self.seq_len + 1

    @property
    def stride(self) -> int:
        return self.seq_len

    def make_batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        batch = causal_batch([ex.tokens for ex in examples], self.seq_len, self.tokenizer.pad_id)
        if self.document_mask:
            docs = document_ids(batch["input_ids"].numpy(), self.tokenizer.eos_id)
            batch["doc_ids"] = torch.from_numpy(docs)
        return batch
