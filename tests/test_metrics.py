from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.text import Perplexity as ReferencePerplexity

from lmlab.data.collate import causal_batch
from lmlab.data.tokenizers import byte_tokenizer, train_bpe
from lmlab.metrics import BitsPerByte, Perplexity, TargetMean
from lmlab.models.decoder import DecoderLM

from .conftest import make_text

OPTIM = {"lr": 1e-3, "weight_decay": 0.1}


def test_perplexity_matches_torchmetrics_reference_and_exp_mean_loss():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    target = torch.randint(0, 11, (3, 7))
    target[0, :2] = -100
    ref = ReferencePerplexity(ignore_index=-100)
    ref.update(logits, target)
    nll = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
    count = (target != -100).sum()
    ours = Perplexity()
    # fed in two halves: states accumulate like the reference's
    ours.update(nll / 2, count // 2)
    ours.update(nll / 2, count - count // 2)
    torch.testing.assert_close(ours.compute(), ref.compute(), rtol=1e-5, atol=0)
    torch.testing.assert_close(ours.compute(), (nll / count).exp(), rtol=1e-6, atol=0)


def test_perplexity_stays_exact_over_a_hundred_million_targets():
    """float32 states (torchmetrics') are off by 1e-6 here; float64 / int64 only round the result."""
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(80_000, 160_000, (1000,), generator=g)  # 1.2e8 targets in all
    nll_sums = (counts * (3.3 + 0.1 * torch.rand(1000, generator=g))).float()
    ppl = Perplexity()
    for nll_sum, count in zip(nll_sums, counts, strict=True):
        ppl.update(nll_sum, count)
    assert int(ppl.count) == int(counts.sum())
    want = torch.exp(nll_sums.double().sum() / counts.sum())
    torch.testing.assert_close(ppl.compute().double(), want, rtol=1e-7, atol=0)
    # states merge by the sum that distributed sync uses, and reset to exact zeros
    a, b = Perplexity(), Perplexity()
    a.update(nll_sums[:500].sum(), counts[:500].sum())
    b.update(nll_sums[500:].sum(), counts[500:].sum())
    a.merge_state(b)
    assert int(a.count) == int(counts.sum())
    torch.testing.assert_close(a.compute().double(), want, rtol=1e-7, atol=0)
    ppl.reset()
    assert ppl.total_log_probs.dtype == torch.float64 and ppl.count.dtype == torch.int64
    assert ppl.total_log_probs == 0 and ppl.count == 0


def test_metric_states_keep_their_dtype_in_a_bf16_true_module():
    """Lightning's bf16-true casts the whole LightningModule, metrics included."""
    metrics = torch.nn.ModuleList([TargetMean(), Perplexity(), BitsPerByte()]).to(torch.bfloat16)
    loss, ppl, bpb = metrics
    assert (loss.total.dtype, ppl.total_log_probs.dtype, bpb.nll.dtype) == (torch.float64,) * 3
    assert (loss.count.dtype, ppl.count.dtype) == (torch.int64,) * 2
    assert bpb.bytes.dtype == torch.float64  # scaled byte counts (TokenStore.byte_scale)
    for _ in range(3):  # 1000.0 + 1.0 is 1000.0 in bf16
        loss.update(torch.tensor(1000.0), torch.tensor(1000))
        loss.update(torch.tensor(1.0), torch.tensor(1))
    assert loss.total == 3003.0
    loss.reset()
    assert loss.total.dtype == torch.float64  # the defaults were not cast either


def test_target_mean_weights_batches_by_targets_and_keeps_nan():
    m = TargetMean()
    with pytest.warns(UserWarning, match="called before the ``update``"):
        assert m.compute() == 0  # no targets yet
    m.update(torch.tensor(6.0), torch.tensor(4))  # a batch of 4 targets with mean 1.5
    m.update(torch.tensor(1.0), torch.tensor(1))  # and one of 1 target
    assert m.compute().item() == pytest.approx(7 / 5)  # not (1.5 + 1) / 2
    assert m.compute().dtype == torch.float32
    m.update(torch.tensor(float("nan")), torch.tensor(3))
    assert math.isnan(m.compute().item())  # a NaN batch is not dropped from the mean


def test_bits_per_byte_accumulates():
    m = BitsPerByte()
    m.update(torch.tensor(10.0), torch.tensor(4))
    m.update(torch.tensor(6.0), torch.tensor(4))
    assert m.compute().item() == pytest.approx(16 / (math.log(2) * 8))


class Uniform(DecoderLM):
    """Every position predicts the uniform distribution over the padded vocabulary (zero hidden
    states: every logit is 0)."""

    def hidden_states(self, batch):
        B, T = batch["input_ids"].shape
        return torch.zeros(B, T, self.config.d_model), batch["labels"]


@pytest.mark.parametrize("loss_chunk_size", [0, 16])
@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_bpb_hand_computation_on_known_string(which, loss_chunk_size):
    text = "To be, or not to be: that is the question. Naïve ✓"
    tok = byte_tokenizer(2) if which == "byte" else train_bpe([make_text(2000, 0)], 320, 2)
    m = Uniform(
        vocab_size=tok.vocab_size,
        special_ids=tok.special,
        optim=OPTIM,
        n_layers=1,
        d_model=16,
        n_heads=2,
        max_seq_len=128,
        loss_chunk_size=loss_chunk_size,
    )
    m.set_token_bytes(tok.token_bytes())
    ids = np.array(tok.encode(text))
    batch = causal_batch([ids], seq_len=128, pad_id=tok.pad_id)
    nll_sum, count, n_bytes, correct = m.eval().nll(batch)  # accuracy is counted in eval mode
    V = m.config.padded_vocab_size
    n_targets = len(ids) - 1
    target_bytes = len(text.encode()) - tok.token_bytes()[ids[0]]  # first token is never a target
    assert count.item() == n_targets and n_bytes.item() == target_bytes
    # uniform prediction: each target costs ln V nats
    bpb = nll_sum.item() / (math.log(2) * n_bytes.item())
    assert bpb == pytest.approx(n_targets * math.log2(V) / target_bytes, rel=1e-6)
    m.set_token_bytes(tok.token_bytes(), scale=1.25)  # a tokenizer whose pieces miss bytes
    assert m.nll(batch)[2].item() == pytest.approx(1.25 * target_bytes)
    m.set_token_bytes(tok.token_bytes())
    if which == "byte":
        assert bpb == pytest.approx(math.log2(V), rel=1e-6)  # one token per byte
    # all logits tie, so argmax is id 0 (pad), never a target of this text
    assert correct.item() == 0
