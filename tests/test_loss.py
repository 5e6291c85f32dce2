"""lmlab.nn.loss.linear_cross_entropy equals the head + F.cross_entropy it replaces."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from lmlab.nn.loss import linear_cross_entropy

N, C, V = 37, 16, 50  # a token count no chunk size below divides


def inputs(dtype=torch.float32, ignored=(0, 5, 6, 36)):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, C, generator=g, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, C, generator=g) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[list(ignored)] = -100
    return hidden, weight, labels


def reference(hidden, weight, labels):
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk_size", [1, 8, 37, 1000])
def test_loss_and_gradients_equal_the_unfused_head_and_cross_entropy(chunk_size):
    h1, w1, labels = inputs()
    want = reference(h1, w1, labels)
    (want * 0.7).backward()  # a non-unit upstream gradient: backward must scale by it
    h2, w2, _ = inputs()
    got, correct = linear_cross_entropy(h2, w2, labels, chunk_size=chunk_size)
    (got * 0.7).backward()
    assert correct is None
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-6)
    assert h2.grad[[0, 5, 6, 36]].abs().max() == 0  # ignored positions get no gradient


@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="torch.compile on CPU (inductor) needs a C compiler",
)
def test_compiled_loss_and_gradients_equal_the_unfused_head():
    """Inside torch.compile (as compile=true traces it). With torch 2.11 it failed (every input got a
    zero gradient) while forward summed its outputs in place (pytorch/pytorch#180642); torch 2.13,
    which CI runs, gets that code right, so there it guards the compiled path in general."""
    h1, w1, labels = inputs()
    want = reference(h1, w1, labels)
    (want * 0.7).backward()
    h2, w2, _ = inputs()
    fused = torch.compile(lambda h, w: linear_cross_entropy(h, w, labels, chunk_size=8)[0])
    got = fused(h2, w2)
    (got * 0.7).backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="torch.compile on CPU (inductor) needs a C compiler",
)
def test_compiled_bf16_step_keeps_no_float32_logits_and_scatters_nothing():
    """Compiled, a chunk's softmax gradient is the pure formula (``_softmax_grad``): inductor computes
    the loss and writes the bf16 gradient in one fused kernel, reusing the bf16 logits' buffer. The
    eager code's in-place updates and ``scatter_add_`` made it keep a float32 (tokens x vocab) copy,
    scatter into it eagerly and round it in another pass. Checked on inductor's generated code;
    the values are also compared with the unfused head, in bf16."""
    from torch._inductor.utils import run_and_get_code

    n, c, v = 64, 8, 96
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, c, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(v, c, generator=g).bfloat16().requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100

    def step(h, w):
        loss = linear_cross_entropy(h, w, labels, chunk_size=n)[0]
        loss.backward()
        return loss

    got, codes = run_and_get_code(torch.compile(step), hidden, weight)
    forward = codes[0]
    assert f"(({n}, {v}), ({v}, 1), torch.float32)" not in forward
    assert f"(({n}, {v}), ({v}, 1), torch.bfloat16)" in forward  # the logits, then the gradient
    assert "scatter" not in forward
    h2, w2 = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    want = reference(h2, w2, labels)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=0.02, atol=0.02)
    torch.testing.assert_close(weight.grad, w2.grad, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4])
def test_the_compiled_formula_is_exact_for_logits_far_from_zero(offset):
    """The compiled branch's softmax gradient against float64, for rows of logits around
    ``offset``: computed relative to each row's largest logit, its error stays at float32's
    rounding of values <= 1 (with the log-sum-exp taken absolute, it grew with the logits:
    7e-5 at 1e3, 3e-4 at 1e4)."""
    from lmlab.nn.loss import _softmax_grad

    g = torch.Generator().manual_seed(0)
    z = torch.randn(32, 500, generator=g) * 5 + offset
    labels = torch.randint(0, 500, (32, 1), generator=g)
    valid = torch.ones(32, 1, dtype=torch.bool)
    valid[3] = False
    top = z.amax(1, keepdim=True)
    got, total = _softmax_grad(z, top, top - z.gather(1, labels), labels, valid, torch.float32)
    z64 = z.double()
    want = torch.softmax(z64, 1).scatter_add_(1, labels, -torch.ones(32, 1, dtype=torch.double))
    want[3] = 0
    keep = torch.arange(32) != 3
    want_total = F.cross_entropy(z64[keep], labels[keep, 0], reduction="sum")
    assert (got.double() - want).abs().max() < 2e-6
    torch.testing.assert_close(total.double(), want_total, rtol=1e-6, atol=1e-4)


def test_counts_correct_argmax_predictions_with_and_without_gradients():
    hidden, weight, labels = inputs()
    logits = hidden @ weight.t()
    labels[1:4] = logits[1:4].argmax(-1)  # three targets certainly right
    want = int(((logits.argmax(-1) == labels) & (labels != -100)).sum())
    assert want >= 3
    with torch.no_grad():
        nll, correct = linear_cross_entropy(
            hidden, weight, labels, chunk_size=8, count_correct=True
        )
        torch.testing.assert_close(nll, reference(hidden, weight, labels))
    assert int(correct) == want
    nll, correct = linear_cross_entropy(hidden, weight, labels, chunk_size=8, count_correct=True)
    assert int(correct) == want and nll.requires_grad


def test_non_finite_hidden_states_at_ignored_rows_add_nothing():
    """As in F.cross_entropy, an ignored row's loss is dropped, not multiplied by 0 (NaN * 0 = NaN);
    its gradients are zero and it adds nothing to the weight's gradient either."""
    h1, w1, labels = inputs()
    want = reference(h1, w1, labels)
    want.backward()
    h2, w2, _ = inputs()
    with torch.no_grad():
        h2[5], h2[36, 3] = float("nan"), float("inf")  # both ignored rows
        torch.testing.assert_close(reference(h2, w2, labels), want)  # what F.cross_entropy does
        nll, _ = linear_cross_entropy(h2, w2, labels, chunk_size=8)
        torch.testing.assert_close(nll, want, rtol=1e-6, atol=1e-5)
    got, _ = linear_cross_entropy(h2, w2, labels, chunk_size=8)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-6)


def test_tied_weight_also_receives_the_embedding_gradient():
    g = torch.Generator().manual_seed(1)
    emb = torch.nn.Embedding(V, C)
    ids = torch.randint(0, V, (N,), generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    reference(emb(ids), emb.weight, labels).backward()
    want = emb.weight.grad.clone()
    emb.weight.grad = None
    linear_cross_entropy(emb(ids), emb.weight, labels, chunk_size=5)[0].backward()
    torch.testing.assert_close(emb.weight.grad, want, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_the_unfused_path_within_bf16_rounding():
    h1, w1, labels = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference(h1, w1, labels)
    want.backward()
    h2, w2, _ = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = linear_cross_entropy(h2, w2, labels, chunk_size=8)
    got.backward()
    assert got.dtype == torch.float32 and w2.grad.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=0.02, atol=0.01)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=0.02, atol=0.01)


def test_bad_chunk_size_is_an_error():
    hidden, weight, labels = inputs()
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        linear_cross_entropy(hidden, weight, labels, chunk_size=0)


def test_no_tokens_gives_zero_loss_and_zero_gradients():
    hidden, weight, labels = inputs()
    nll, _ = linear_cross_entropy(hidden[:0], weight, labels[:0])
    nll.backward()
    assert float(nll.detach()) == 0 and weight.grad.abs().max() == 0


def test_a_second_backward_through_the_same_forward_is_refused():
    hidden, weight, labels = inputs()
    nll, _ = linear_cross_entropy(hidden, weight, labels)
    nll.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass per forward"):
        nll.backward()


@pytest.mark.parametrize("family", ["decoder", "encoder", "encoder_decoder"])
def test_every_family_trains_the_same_with_and_without_the_fused_head(family):
    """LMModule.nll with loss_chunk_size=0 (head, then F.cross_entropy) and 7 (fused, in chunks
    that do not divide the token count): same loss, count, accuracy and gradients."""
    from lmlab.models.decoder import DecoderLM
    from lmlab.models.encoder import EncoderLM
    from lmlab.models.encoder_decoder import EncoderDecoderLM

    cls = {"decoder": DecoderLM, "encoder": EncoderLM, "encoder_decoder": EncoderDecoderLM}[family]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (2, 12), generator=g)
    labels = torch.randint(3, 90, (2, 12), generator=g)
    labels[0, :5] = -100
    batch = {"input_ids": ids, "labels": labels}
    if family == "encoder":
        batch["attention_mask"] = torch.ones_like(ids, dtype=torch.bool)
    if family == "encoder_decoder":
        batch |= {"decoder_input_ids": labels.clamp(min=0), "attention_mask": ids > 4}

    def run(chunk, train):
        torch.manual_seed(0)
        m = cls(
            vocab_size=90,
            special_ids={},
            optim={},
            n_layers=1,
            d_model=16,
            n_heads=2,
            max_seq_len=16,
            loss_chunk_size=chunk,
        ).train(train)
        m.set_token_bytes(torch.ones(90, dtype=torch.long))
        stats = m.nll(batch)
        stats[0].backward()
        return stats, {n: p.grad for n, p in m.named_parameters()}

    for train in (True, False):
        (want, want_grads), (got, got_grads) = run(0, train), run(7, train)
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-5)
        assert [int(x) for x in got[1:]] == [int(x) for x in want[1:]]  # count, bytes, correct
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_negative_loss_chunk_size_is_refused_by_the_module():
    from lmlab.models.decoder import DecoderLM

    with pytest.raises(ValueError, match="loss_chunk_size must be >= 0"):
        DecoderLM(vocab_size=90, special_ids={}, optim={}, loss_chunk_size=-1)


@pytest.mark.parametrize(("setting", "fused"), [(None, True), (0, False), (64, True)])
def test_loss_chunk_size_none_fuses_on_a_cpu(monkeypatch, setting, fused):
    import lmlab.models.base as base
    from lmlab.models.decoder import DecoderLM

    calls = []
    real = base.linear_cross_entropy
    monkeypatch.setattr(
        base, "linear_cross_entropy", lambda *a, **k: calls.append(k) or real(*a, **k)
    )
    m = DecoderLM(vocab_size=90, special_ids={}, optim={}, n_layers=1, d_model=16, n_heads=2,
                  max_seq_len=16, loss_chunk_size=setting)  # fmt: skip
    m.set_token_bytes(torch.ones(90, dtype=torch.long))
    ids = torch.randint(3, 90, (2, 12))
    m.nll({"input_ids": ids, "labels": ids})
    want = setting or base.CPU_LOSS_CHUNK
    assert [k["chunk_size"] for k in calls] == ([want] if fused else [])
