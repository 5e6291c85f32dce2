"""lmlab/nn/matmul.py: float32 products on CPUs through oneDNN, the same results as PyTorch's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmlab.nn import matmul
from lmlab.nn.loss import linear_cross_entropy
from lmlab.nn.matmul import Linear, cpu_matmul, set_cpu_matmul

needs_onednn = pytest.mark.skipif(
    matmul._onednn_linear is None, reason="this PyTorch build has no oneDNN (MKLDNN)"
)


@pytest.fixture
def onednn_calls(monkeypatch):
    """The oneDNN products so far (a list of their shapes), every size of product eligible; the
    route is restored after."""
    calls = []
    original = matmul._onednn_linear
    monkeypatch.setattr(matmul, "ONEDNN_MIN_MACS", 1)

    def counted(a, b, *args):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return original(a, b, *args)

    if original is not None:
        monkeypatch.setattr(matmul, "_onednn_linear", counted)
    yield calls
    set_cpu_matmul("onednn")


def reference(x, weight):
    """F.linear in float64 and its gradients, for an upstream gradient of ones."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    out = F.linear(x64, w64)
    out.backward(torch.ones_like(out))
    return out, x64.grad, w64.grad


@needs_onednn
@pytest.mark.parametrize("route", ["onednn", "blas"])
def test_linear_matches_f_linear_on_both_routes(onednn_calls, route):
    """Forward and both gradients equal float64 F.linear's within float32 rounding, through
    oneDNN for the forward and the input gradient (BLAS for the weight gradient) or all BLAS."""
    set_cpu_matmul(route)
    torch.manual_seed(0)
    layer = Linear(48, 80, bias=False)
    x = torch.randn(3, 20, 48, requires_grad=True)
    out = layer(x)
    out.backward(torch.ones_like(out))
    ref_out, ref_gx, ref_gw = reference(x, layer.weight)
    assert out.shape == (3, 20, 80) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad.double(), ref_gw, rtol=1e-5, atol=1e-5)
    if route == "onednn":  # x @ W.T on (60, 48) x (80, 48); g @ W as g @ (W.T).T
        assert onednn_calls == [((60, 48), (80, 48)), ((60, 80), (48, 80))]
    else:
        assert onednn_calls == []
    assert cpu_matmul() == route


@needs_onednn
def test_only_the_input_gradient_is_computed_when_the_weight_is_frozen(onednn_calls):
    torch.manual_seed(0)
    layer = Linear(16, 24, bias=False).requires_grad_(False)
    x = torch.randn(5, 16, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(5, 16))


@needs_onednn
def test_the_fused_head_takes_the_route_and_matches_blas(onednn_calls):
    """linear_cross_entropy's logits and input gradient go through oneDNN: loss and gradients as
    with BLAS, within float32 rounding."""
    torch.manual_seed(0)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = torch.randn(96, 32, requires_grad=True)
    labels = torch.randint(0, 96, (40,))
    labels[::7] = -100
    results = {}
    for route in ("blas", "onednn"):
        set_cpu_matmul(route)
        before = len(onednn_calls)
        loss, _ = linear_cross_entropy(hidden, weight, labels, chunk_size=16)
        gh, gw = torch.autograd.grad(loss, (hidden, weight))
        results[route] = (loss, gh, gw)
        # three chunks: logits and input gradient each
        assert len(onednn_calls) - before == (6 if route == "onednn" else 0)
    for a, b in zip(results["onednn"], results["blas"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_bf16_autocast_bf16_weights_biases_and_compiling_keep_pytorchs_route(
    onednn_calls, monkeypatch
):
    torch.manual_seed(0)
    layer, x = Linear(16, 24, bias=False), torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # autocast's F.linear
    assert layer.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16
    with_bias = Linear(16, 24)
    torch.testing.assert_close(with_bias(x), F.linear(x, with_bias.weight, with_bias.bias))
    assert onednn_calls == []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    Linear(16, 24, bias=False)(x)  # inductor must see F.linear
    assert onednn_calls == []


@needs_onednn
def test_small_products_stay_with_blas(onednn_calls, monkeypatch):
    """Below ONEDNN_MIN_MACS multiply-adds oneDNN's set-up costs more than it saves (a decoding
    step's single row): those products take BLAS."""
    monkeypatch.setattr(matmul, "ONEDNN_MIN_MACS", 64 * 256 * 768)
    layer = Linear(256, 768, bias=False)
    with torch.no_grad():
        layer(torch.randn(2, 31, 256))
        assert onednn_calls == []
        layer(torch.randn(2, 32, 256))
        assert onednn_calls == [((64, 256), (768, 256))]
        layer(torch.randn(0, 256))  # nothing to multiply
    assert len(onednn_calls) == 1


def test_an_unknown_route_is_refused_and_a_build_without_onednn_uses_blas(monkeypatch):
    with pytest.raises(ValueError, match=r"cpu_matmul='mkl' is not a route .* onednn .* blas"):
        set_cpu_matmul("mkl")
    monkeypatch.setattr(matmul, "_onednn_linear", None)
    set_cpu_matmul("onednn")
    assert cpu_matmul() == "blas"
    torch.manual_seed(0)
    layer, x = Linear(16, 24, bias=False), torch.randn(5, 16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
    monkeypatch.undo()
    set_cpu_matmul("onednn")


@needs_onednn
@pytest.mark.parametrize("route", ["onednn", "blas"])
def test_training_follows_the_cpu_matmul_setting(tiny_cfg, onednn_calls, route):
    """32-true training on the CPU sends its float32 products where cpu_matmul says."""
    from lmlab.train import train

    train(tiny_cfg(f"cpu_matmul={route}", "trainer.precision=32-true", "trainer.max_steps=3"))
    assert cpu_matmul() == route
    assert (len(onednn_calls) > 0) == (route == "onednn")


@needs_onednn
def test_double_backward_jit_tracing_and_vmap_work_as_with_f_linear(onednn_calls):
    """A graph-building backward uses PyTorch's own products; tracing and functorch transforms take
    F.linear (the oneDNN op has no TorchScript form and no batching rule)."""
    torch.manual_seed(0)
    layer, x = Linear(16, 24, bias=False), torch.randn(5, 16, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(gx.sum(), layer.weight)
    w = layer.weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    (ref_gx,) = torch.autograd.grad(F.linear(x64, w).pow(2).sum(), x64, create_graph=True)
    (ref_gw,) = torch.autograd.grad(ref_gx.sum(), w)
    torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-5, atol=1e-5)
    traced = torch.jit.trace(layer, torch.randn(5, 16), check_trace=False)
    calls = len(onednn_calls)
    torch.testing.assert_close(traced(x), F.linear(x, layer.weight))
    batched = torch.vmap(layer)(torch.randn(3, 5, 16))
    assert batched.shape == (3, 5, 24)
    assert len(onednn_calls) == calls  # neither the traced graph nor vmap called oneDNN


@needs_onednn
def test_a_frozen_weight_keeps_no_input_for_the_backward(onednn_calls):
    layer = Linear(16, 24, bias=False).requires_grad_(False)
    x = torch.randn(5, 16, requires_grad=True)
    out = layer(x)
    assert out.grad_fn.saved_tensors[0] is None  # as F.linear, which keeps only the weight


def test_the_route_reaches_processes_started_after_it(monkeypatch):
    """ddp_spawn's processes (and DataLoader workers) import lmlab afresh: the route comes with
    LMLAB_CPU_MATMUL, or cpu_matmul=blas held only in the launching process."""
    import subprocess
    import sys

    monkeypatch.setenv(matmul.ENV, "onednn")
    set_cpu_matmul("blas")
    code = "from lmlab.nn.matmul import cpu_matmul; print(cpu_matmul())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "blas"
    set_cpu_matmul("onednn")
