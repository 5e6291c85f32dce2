"""Encoder-only masked language model (BERT family) as a LightningModule."""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from lmlab import flops
from lmlab.data.collate import IGNORE
from lmlab.errors import ConfigError
from lmlab.models.base import LMModule
from lmlab.nn.encoder import Encoder, EncoderConfig


def selected_rows(targets: int, positions: int) -> int:
    """Rows the MLM head runs on for ``targets`` masked positions out of ``positions``: the count
    rounded up to a multiple of a power of two >= 2 sqrt(positions) (one step for a batch without
    targets), at most ``positions``.

    A masked count drawn position by position varies from batch to batch by its binomial standard
    deviation, sqrt(positions p (1 - p)), 0.36 sqrt(positions) at p = 0.15, so the step is at
    least 5.6 of those: a run's batches fall in two or three row counts, each a static shape that
    torch.compile compiles once (lmlab's own masking takes a fixed share of each window's ordinary
    tokens, so its counts hardly vary: usually one). Without the rounding every new count was a
    new shape: compiled again at each one (under the fused loss, whose chunk loop fixes the row
    count, up to torch's recompile limit of 8, after which the step ran uncompiled). 32 x 512
    windows with 15% masked (2458 targets): 2560 rows, 4% more than the targets; in general the
    extra rows average half a step, 7-13 / sqrt(positions) of the head's work (5-10% at 16384
    positions, where the head is ~4% of BERT-base's step; 21-42% at 1024)."""
    step = 1 << math.ceil(math.log2(2 * math.sqrt(positions)))
    return min(positions, max(1, -(-targets // step)) * step)


def classify(
    head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, labelled positions, correct argmax predictions) of a classifier head
    on hidden states (..., C) against ``labels`` (...); label -100: not scored."""
    logits = head(hidden).float().flatten(0, -2)
    labels = labels.flatten()
    scored = labels != IGNORE
    nll = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    return nll, scored.sum(), ((logits.argmax(-1) == labels) & scored).sum()


def lowercase_text(text: str, specials: list[str]) -> str:
    """``text`` lowercased but for the special tokens spelled in it (BERT-cased's ``[MASK]``)."""
    spelled = "|".join(re.escape(t) for t in sorted(filter(None, specials), key=len, reverse=True))
    parts = re.split(f"({spelled})", text) if spelled else [text]
    return "".join(part if i % 2 else part.lower() for i, part in enumerate(parts))


class EncoderLM(LMModule):
    """An encoder with its MLM head and, for sentence-level objectives (nsp, sop, ...), a classifier
    of the cls position: ``sentence_task`` names it (its metrics are ``val/<task>_loss`` and
    ``val/<task>_acc``), ``sentence_classes`` sizes it, and its mean cross-entropy times
    ``sentence_weight`` is added to the training loss; ``token_task``, ``token_classes`` and
    ``token_weight`` likewise for a classifier of every position (capital_word), over the
    positions its ``token_labels`` score. The objective sets them
    (:meth:`lmlab.data.base.WindowDataModule.model_settings`); they are saved with the checkpoint."""

    accepts = ("masked",)
    # fill-mask is deterministic: top_k candidates per mask, nothing sampled or generated
    generation_settings = ("top_k",)
    config_class = EncoderConfig
    backbone_class = Encoder

    def __init__(
        self,
        *,
        sentence_task: str = "",
        sentence_classes: int = 0,
        sentence_weight: float = 1.0,
        token_task: str = "",
        token_classes: int = 0,
        token_weight: float = 1.0,
        **kwargs,
    ) -> None:
        for kind, task, classes in (
            ("sentence", sentence_task, sentence_classes),
            ("token", token_task, token_classes),
        ):
            if bool(task) != (classes > 0):
                raise ValueError(
                    f"{kind}_task={task!r} and {kind}_classes={classes} must be given together"
                )
        # read by build_backbone, inside super().__init__
        self.sentence_classes, self.token_classes = sentence_classes, token_classes
        super().__init__(**kwargs)
        if sentence_task:
            self.add_aux_task(sentence_task, sentence_weight, "sentence_labels")
        if token_task:
            self.add_aux_task(token_task, token_weight, "token_labels")

    def build_backbone(self) -> Encoder:
        return Encoder(self.config, self.sentence_classes, self.token_classes)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        batch = super().on_before_batch_transfer(batch, dataloader_idx)
        labels = batch["labels"]
        if labels.device.type == "cpu":
            # Counted while the labels are on the host (Python ints, which Lightning leaves as
            # they are): `hidden_states` then selects the targets without asking the device how
            # many. The compiled step reads the rounded row count only, the same from batch to
            # batch (an exact count it read would be a new constant of its graph at each batch).
            n = int((labels != IGNORE).sum())
            batch["n_targets"] = n  # for the FLOP count
            batch["target_rows"] = selected_rows(n, labels.numel())
        return batch

    def step_flops(self, batch: dict) -> int:
        """The blocks at every position, the output head at the targets only: the useful work
        (``hidden_states`` also runs the head on a few ignored rows, see :func:`selected_rows`)."""
        B, S = batch["input_ids"].shape
        targets = batch.get("n_targets")
        if targets is None:
            targets = int((batch["labels"] != IGNORE).sum())
        b, c = self.backbone, self.config
        blocks = flops.flops_per_token(flops.matmul_weights(b.blocks), c.n_layers, c.d_model, S)
        head = b.sentence_head
        sentence = 0 if head is None else head.pool_weight.numel() + head.weight.numel()
        token = 0 if b.token_head is None else b.token_head.weight.numel()
        return (
            B * S * blocks
            + 6 * b.lm_head.weight.numel() * targets
            + 6 * sentence * B
            + 6 * token * B * S
        )

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The ~15% selected positions, so the output head (a d_model x vocab matmul per position,
        the largest single cost of a small MLM model) runs on those, and a few more.

        They are gathered in order by a stable sort that puts the targets first, cut at the count
        ``on_before_batch_transfer`` took on the host (boolean indexing would ask the device for
        the count, on a GPU a wait for every queued kernel at each step, and break the compiled
        graph there), rounded up by :func:`selected_rows` (``target_rows``): the rows past the
        targets are ignored positions, whose labels (-100) add nothing to the loss, and the row
        count stays the same from batch to batch, so a compiled step is not compiled again for
        each new count. Called on a batch without it (``nll`` used directly), it is computed
        here."""
        return self.select_targets(self.encoded(batch), batch)

    def encoded(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The backbone's final hidden states (B, S, C) of ``batch``."""
        return self.backbone(
            batch["input_ids"],
            batch.get("attention_mask"),
            doc_ids=batch.get("doc_ids"),
            head=False,
        )

    def select_targets(
        self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`hidden_states` from the backbone's hidden states (B, S, C)."""
        labels = batch["labels"].flatten()
        ignored = labels == IGNORE
        rows = batch.get("target_rows")
        if rows is None:
            rows = selected_rows(int(labels.numel() - ignored.sum()), labels.numel())
        index = torch.argsort(ignored.to(torch.uint8), stable=True)[:rows]
        return hidden.flatten(0, -2).index_select(0, index), labels.index_select(0, index)

    def nll(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """:meth:`LMModule.nll`, and with a sentence head its (NLL sum, count, correct) over the
        batch's ``sentence_labels``, with a token head over its ``token_labels``, from the same
        forward pass."""
        hidden = self.encoded(batch)
        sums = self.head_loss(*self.select_targets(hidden, batch), count_correct=not self.training)
        b = self.backbone
        if b.sentence_head is not None:
            sums = (*sums, *classify(b.sentence_head, hidden[:, 0], batch["sentence_labels"]))
        if b.token_head is not None:
            sums = (*sums, *classify(b.token_head, hidden, batch["token_labels"]))
        return sums

    def encode_one(self, ids: list[int], doc_ids=None, head: bool = False) -> torch.Tensor:
        """The backbone's output (hidden states, or logits with ``head``) for one input (1, S, ...),
        its documents kept apart where ``doc_ids`` are given (document masks)."""
        self.check_prompt_length(len(ids))
        x = torch.tensor([ids], device=self.device)
        docs = None if doc_ids is None else torch.as_tensor(doc_ids, device=self.device)[None]
        return self.backbone(x, doc_ids=docs, head=head)

    def predict_tokens(self, ids: list[int], doc_ids=None) -> torch.Tensor:
        """Class probabilities (S, classes) of the token head at every position of one input."""
        with self.evaluating():
            hidden = self.encode_one(ids, doc_ids)
            return self.backbone.token_head(hidden[0]).float().softmax(-1).cpu()

    def predict_sentence(self, ids: list[int]) -> torch.Tensor:
        """Class probabilities (classes,) of the sentence head for one input (cls ... sep)."""
        with self.evaluating():
            hidden = self.encode_one(ids)  # segment-level objectives: no document masks
            return self.backbone.sentence_head(hidden[0, 0]).float().softmax(-1).cpu()

    def predict_masked(
        self, ids: list[int], top_k: int, doc_ids=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k token ids (and probabilities) at every position of ``ids``: (S, k) each.

        Special tokens (mask, pad, sentinels, ...) are never proposed: they are not text.
        """
        text = self.token_bytes > 0  # specials are the zero-byte tokens
        with self.evaluating():
            logits = self.encode_one(ids, doc_ids, head=True)[0, :, : self.vocab_size].float()
            logits[:, ~text] = float("-inf")
            probs = logits.softmax(-1)
        p, i = probs.topk(min(top_k, int(text.sum())), dim=-1)  # no more than the text tokens
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
        """What ``python -m lmlab.generate`` does for an encoder: fill-mask. A model trained on
        lowercased text (objective=capital_word) reads the prompts lowercased. A prompt without a
        mask token is refused (there would be nothing to fill: the text came back as it was)."""
        mask = tokenizer.tk.id_to_token(tokenizer.mask_id)
        if self.hparams.get("token_task") == "capital_word":
            specials = [tokenizer.tk.id_to_token(i) for i in tokenizer.special_ids]
            prompts = [lowercase_text(p, specials) for p in prompts]
        for prompt in prompts:
            if tokenizer.mask_id not in tokenizer.encode(prompt, allow_special=True):
                raise ConfigError(
                    f"prompt={prompt!r} has no {mask}: an encoder fills masks; put {mask} where "
                    f"tokens should be predicted, e.g. 'prompt=\"The {mask} king\"'"
                )
        return self.fill_mask(tokenizer, prompts, top_k or 5)

    def sample_examples(self, datamodule, max_new_tokens: int) -> list:
        """The first two validation windows, cut to ``max_new_tokens`` to keep samples readable;
        for a sentence-level objective whole (cut, a window would hold no two whole sentences),
        the first two of the first 20 that it scores (where it scores two)."""
        if not hasattr(datamodule, "sentence_label"):
            examples = datamodule.val_examples(2)
            for ex in examples:
                ex.tokens = ex.tokens[:max_new_tokens]
            return examples
        examples = datamodule.val_examples(20)
        scored = [ex for ex in examples if datamodule.sentence_label(ex) != IGNORE]
        return (scored if len(scored) >= 2 else examples)[:2]

    def samples(self, tokenizer, datamodule, *, max_new_tokens: int = 64, **_) -> list[str]:
        """Fill-mask on the first validation windows: original, masked input, predictions; for a
        sentence-level objective also the example's label and the sentence head's prediction, for
        capital_word the token head's right case predictions and the text as it capitalizes it."""
        out = []

        def show(ids):  # without the outer cls / sep; a pair's segments split by " | "
            ids = list(ids[1:-1])
            cuts = [i for i, t in enumerate(ids) if t == tokenizer.sep_id]
            parts = [ids[a + 1 : b] for a, b in zip([-1, *cuts], [*cuts, len(ids)], strict=True)]
            return " | ".join(tokenizer.decode(p) for p in parts)

        for ex in self.sample_examples(datamodule, max_new_tokens):
            inputs, labels = datamodule.mask_example(ex)
            docs = getattr(datamodule, "documents_of", lambda _: None)(inputs[None])
            docs = None if docs is None else docs[0]  # as training saw it (document masks)
            top, _ = self.predict_masked(inputs.tolist(), 1, docs)
            selected = labels != -100
            predicted = inputs.copy()
            predicted[selected] = top[selected, 0].numpy()
            right = int((predicted[selected] == labels[selected]).sum())
            original = labels.clip(0) * selected + inputs * ~selected
            if hasattr(datamodule, "original_ids"):  # inputs changed beyond the masking
                original = datamodule.original_ids(ex)
            lines = [
                f"original:  {show(original)}",
                f"masked:    {show(inputs)}",
                f"predicted: {show(predicted)}",
                f"({right}/{int(selected.sum())} selected tokens right)",
            ]
            truth = getattr(datamodule, "sentence_label", lambda _: IGNORE)(ex)
            if self.backbone.sentence_head is not None and truth != IGNORE:
                names = datamodule.label_names
                probs = self.predict_sentence(inputs.tolist())
                guess = int(probs.argmax())
                lines.append(
                    f"{datamodule.objective}: {names[truth]} (predicted "
                    f"{names[guess]}, p={float(probs[guess]):.2f})"
                )
            if self.backbone.token_head is not None:
                truth = torch.as_tensor(datamodule.token_labels_of(ex))
                guess = self.predict_tokens(inputs.tolist(), docs).argmax(-1)
                scored = truth != IGNORE
                right = int((guess[scored] == truth[scored]).sum())
                lines.append(
                    f"{datamodule.objective}: {right}/{int(scored.sum())} right; the model's "
                    f"{datamodule.label_names[1]}: "
                    f"{datamodule.show_predicted(inputs, guess, truth.numpy())}"
                )
            out.append("\n".join(lines))
        return out
