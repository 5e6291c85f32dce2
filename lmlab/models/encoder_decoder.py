"""Encoder-decoder language model (T5 / BART family) as a LightningModule."""

from __future__ import annotations

import torch

from lmlab import flops
from lmlab.models.base import LMModule
from lmlab.nn.encoder_decoder import EncoderDecoder, EncoderDecoderConfig


class EncoderDecoderLM(LMModule):
    accepts = ("seq2seq",)
    config_class = EncoderDecoderConfig
    backbone_class = EncoderDecoder

    def step_flops(self, batch: dict) -> int:
        """The encoder over the S input tokens; the decoder and the head over the T target tokens,
        except the cross-attention keys and values, which are projections of the S encoder
        outputs; attention over S x S pairs per encoder layer and T x T + T x S per decoder layer."""
        B, S = batch["input_ids"].shape
        T = batch["decoder_input_ids"].shape[1]
        b, c = self.backbone, self.config
        kv = sum(block.cross.kv.weight.numel() for block in b.dec_blocks)
        per_input = flops.flops_per_token(
            flops.matmul_weights(b.enc_blocks) + kv, c.n_layers, c.d_model, S
        )
        decoder = flops.matmul_weights(b.dec_blocks) - kv + b.lm_head.weight.numel()
        per_target = flops.flops_per_token(decoder, c.n_decoder_layers, c.d_model, T + S)
        return B * (S * per_input + T * per_target)

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.backbone(
            batch["input_ids"], batch["decoder_input_ids"], batch.get("attention_mask"), head=False
        )
        return hidden, batch["labels"]

    def decode_greedy(self, tokenizer, input_ids, attention_mask=None, max_new_tokens=128, **kw):
        """Generated target ids per row (eos and what follows removed)."""
        with self.evaluating():
            y = self.backbone.generate(
                input_ids.to(self.device),
                max_new_tokens,
                start_id=tokenizer.bos_id,
                attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                eos_id=tokenizer.eos_id,
                **kw,
            )
        rows = []
        for row in y.tolist():
            rows.append(row[: row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row)
        return rows

    def generate_text(
        self,
        tokenizer,
        prompts: list[str],
        *,
        max_new_tokens: int = 100,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
    ) -> list[str]:
        """Fill the sentinels (``<extra_id_0>`` …) of each prompt, or rewrite it (denoising)."""
        from lmlab.data.span import fill_sentinels

        gen = torch.Generator(device=self.device).manual_seed(seed)
        out = []
        for prompt in prompts:
            ids = [*tokenizer.encode(prompt, allow_special=True), tokenizer.eos_id]
            self.check_prompt_length(len(ids))
            (target,) = self.decode_greedy(
                tokenizer,
                torch.tensor([ids]),
                None,
                max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=gen,
            )
            if any(t in tokenizer.sentinel_ids for t in ids):
                filled = fill_sentinels(ids[:-1], target, tokenizer.sentinel_ids)
                out.append(
                    f"{tokenizer.decode(filled)}\n  (decoder output: {tokenizer.decode(target)!r})"
                )
            else:
                out.append(tokenizer.decode(target))
        return out

    def samples(self, tokenizer, datamodule, *, max_new_tokens: int = 64, **_) -> list[str]:
        """Reconstructions of the first validation windows: input, expected and generated target,
        both cut to ``max_new_tokens`` tokens (a longer target says so: a denoising target is the
        whole window, and the generation could never reach the rest)."""
        batch = datamodule.make_batch(datamodule.val_examples(2))
        labels = batch["labels"]
        n = min(labels.shape[1], max_new_tokens)
        outputs = [[] for _ in labels]
        if n:
            outputs = self.decode_greedy(
                tokenizer,
                batch["input_ids"],
                batch["attention_mask"],
                max_new_tokens=n,
                temperature=0.0,
            )
        out = []
        for b, generated in enumerate(outputs):
            inputs = batch["input_ids"][b][batch["attention_mask"][b]].tolist()
            target = [t for t in labels[b].tolist() if t not in (-100, tokenizer.eos_id)]
            cut = f" [first {n} of {len(target)} tokens: sample.max_new_tokens]"
            out.append(
                f"input:    {tokenizer.decode(inputs)}\n"
                f"target:   {tokenizer.decode(target[:n])}{cut if len(target) > n else ''}\n"
                f"generated:{' ' if generated else ''}{tokenizer.decode(generated)}"
            )
        return out
