"""Encoder-only masked language model (BERT family) as a LightningModule."""

from __future__ import annotations

import torch

from lmlab import flops
from lmlab.data.collate import IGNORE
from lmlab.models.base import LMModule
from lmlab.nn.encoder import Encoder, EncoderConfig


class EncoderLM(LMModule):
    accepts = ("masked",)
    config_class = EncoderConfig
    backbone_class = Encoder

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        batch = super().on_before_batch_transfer(batch, dataloader_idx)
        labels = batch["labels"]
        if labels.device.type == "cpu":
            # Counted while the labels are on the host (a Python int, which Lightning leaves as it
            # is): `hidden_states` then selects the targets without asking the device how many.
            batch["n_targets"] = int((labels != IGNORE).sum())
        return batch

    def step_flops(self, batch: dict) -> int:
        """The blocks at every position, the output head at the selected ones only (as
        ``hidden_states`` runs it)."""
        B, S = batch["input_ids"].shape
        targets = batch.get("n_targets")
        if targets is None:
            targets = int((batch["labels"] != IGNORE).sum())
        b, c = self.backbone, self.config
        blocks = flops.flops_per_token(flops.matmul_weights(b.blocks), c.n_layers, c.d_model, S)
        return B * S * blocks + 6 * b.lm_head.weight.numel() * targets

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The ~15% selected positions only, so the output head (a d_model x vocab matmul per
        position, the largest single cost of a small MLM model) runs on those alone.

        They are gathered in order by a stable sort that puts the targets first, cut at the count
        ``on_before_batch_transfer`` took on the host: boolean indexing would ask the device for
        the count (on a GPU, a wait for every queued kernel at each step) and break the compiled
        graph there. Called on a batch without the count (``nll`` used directly), it is computed
        here."""
        hidden = self.backbone(batch["input_ids"], batch.get("attention_mask"), head=False)
        labels = batch["labels"].flatten()
        ignored = labels == IGNORE
        n = batch.get("n_targets")
        if n is None:
            n = int(labels.numel() - ignored.sum())
        index = torch.argsort(ignored.to(torch.uint8), stable=True)[:n]
        return hidden.flatten(0, -2).index_select(0, index), labels.index_select(0, index)

    def predict_masked(self, ids: list[int], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k token ids (and probabilities) at every position of ``ids``: (S, k) each.

        Special tokens (mask, pad, sentinels, ...) are never proposed: they are not text.
        """
        with self.evaluating():
            x = torch.tensor([ids], device=self.device)
            logits = self.backbone(x)[0, :, : self.vocab_size].float()
            logits[:, self.token_bytes == 0] = float("-inf")  # specials are the zero-byte tokens
            probs = logits.softmax(-1)
        p, i = probs.topk(top_k, dim=-1)
        return i.cpu(), p.cpu()

    def fill_mask(self, tokenizer, texts: list[str], top_k: int = 5) -> list[str]:
        """For text with mask tokens (``<|mask|>``), the text filled with the top prediction and the
        top-k candidates of each mask."""
        out = []
        for text in texts:
            ids = [tokenizer.cls_id, *tokenizer.encode(text, allow_special=True), tokenizer.sep_id]
            top, prob = self.predict_masked(ids, top_k)
            filled, lines = list(ids), []
            for pos in (i for i, t in enumerate(ids) if t == tokenizer.mask_id):
                filled[pos] = int(top[pos, 0])
                cands = ", ".join(
                    f"{tokenizer.decode([int(t)])!r} {float(p):.2f}"
                    for t, p in zip(top[pos], prob[pos], strict=True)
                )
                lines.append(f"  mask at token {pos - 1}: {cands}")
            out.append("\n".join([tokenizer.decode(filled[1:-1]), *lines]))
        return out

    def generate_text(
        self, tokenizer, prompts: list[str], *, top_k: int | None = None, **_
    ) -> list[str]:
        """What ``python -m lmlab.generate`` does for an encoder: fill-mask."""
        return self.fill_mask(tokenizer, prompts, top_k or 5)

    def samples(self, tokenizer, datamodule, *, max_new_tokens: int = 64, **_) -> list[str]:
        """Fill-mask on the first validation windows: original, masked input, predictions."""
        out = []
        for ex in datamodule.val_examples(2):
            ex.tokens = ex.tokens[:max_new_tokens]  # keep samples readable
            inputs, labels = datamodule.mask_example(ex)
            top, _ = self.predict_masked(inputs.tolist(), 1)
            selected = labels != -100
            predicted = inputs.copy()
            predicted[selected] = top[selected, 0].numpy()
            right = int((predicted[selected] == labels[selected]).sum())
            show = lambda ids: tokenizer.decode(ids[1:-1])  # without cls / sep
            out.append(
                f"original:  {show(labels.clip(0) * selected + inputs * ~selected)}\n"
                f"masked:    {show(inputs)}\n"
                f"predicted: {show(predicted)}\n"
                f"({right}/{int(selected.sum())} selected tokens right)"
            )
        return out
