"""Decoder-only language model (GPT family) as a LightningModule: causal LM and prefix LM."""

from __future__ import annotations

import logging

import torch

from lmlab.models.base import LMModule
from lmlab.nn.decoder import Decoder, DecoderConfig

log = logging.getLogger(__name__)


class DecoderLM(LMModule):
    """``prefix_prompts``: trained as a prefix LM (objective=prefix_lm sets it through
    :meth:`lmlab.data.base.WindowDataModule.model_settings`; saved with the checkpoint), so a
    prompt is read as the prefix, bidirectionally, as training read prefixes."""

    accepts = ("causal", "prefix")
    config_class = DecoderConfig
    backbone_class = Decoder

    def __init__(self, *, prefix_prompts: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.prefix_prompts = prefix_prompts

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.backbone(
            batch["input_ids"],
            prefix_len=batch.get("prefix_len"),
            doc_ids=batch.get("doc_ids"),
            head=False,
        )
        return hidden, batch["labels"]

    def generate_text(
        self,
        tokenizer,
        prompts: list[str],
        *,
        max_new_tokens: int = 100,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
    ) -> list[str]:
        """Continue each prompt; a prompt of "" starts from the end-of-document token. Prompt and
        continuation share the model's ``max_seq_len`` positions: a prompt too long to leave room
        for ``max_new_tokens`` (up to half the positions) keeps its last tokens; the continuation
        stops where the positions end. Special tokens other than eos are never sampled (no text
        holds them; an early model gave them probability). A prefix LM (``prefix_prompts``) reads
        each prompt as its prefix."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out = []
        limit = self.config.max_seq_len
        keep = limit - min(max_new_tokens, limit // 2)
        suppress = [i for i in tokenizer.special_ids if i != tokenizer.eos_id]
        with self.evaluating():
            for prompt in prompts:
                ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
                if len(ids) > keep:
                    self._warn_once(
                        "the prompt is %d tokens; the model has %d positions for it and %d new "
                        "tokens: its last %d are used",
                        len(ids),
                        limit,
                        max_new_tokens,
                        keep,
                    )
                    ids = ids[-keep:]
                x = torch.tensor([ids], device=self.device)
                y = self.backbone.generate(
                    x,
                    max_new_tokens,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    eos_id=tokenizer.eos_id,
                    generator=gen,
                    suppress=suppress,
                    prefix=self.prefix_prompts,
                )
                made = y.shape[1] - len(ids)
                ran_out = y.shape[1] == limit and y[0, -1].item() != tokenizer.eos_id
                if made < max_new_tokens and ran_out:
                    self._warn_once(
                        "the model's %d positions ended after %d of the %d new tokens asked for "
                        "(a prompt of %d tokens)",
                        limit,
                        made,
                        max_new_tokens,
                        len(ids),
                    )
                new = [t for t in y[0, len(ids) :].tolist() if t != tokenizer.eos_id]
                out.append(prompt + tokenizer.decode(new))
        return out

    def _warn_once(self, message: str, *args) -> None:
        """A warning said once by this model, with the first case's figures (its samples repeat
        at every validation)."""
        said = self.__dict__.setdefault("_said", set())
        if message not in said:
            said.add(message)
            log.warning(message, *args)

    def samples(self, tokenizer, datamodule, *, prompts=(), **settings) -> list[str]:
        # prompts: checked by lmlab.train (a list of texts; Hydra reads [1984] as a number)
        return self.generate_text(tokenizer, [str(p) for p in prompts or ()], **settings)
