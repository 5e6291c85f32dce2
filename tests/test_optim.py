"""optim.master_weights: AdamW over fp32 copies of bf16-true weights (lmlab/optim.py)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from lmlab.errors import ConfigError
from lmlab.models.base import trained_params
from lmlab.optim import MasterWeightAdamW
from lmlab.train import check_settings, train

SETTINGS = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


def weights(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, generator=g).bfloat16(), torch.randn(3, generator=g).bfloat16()]


def groups(params: list[torch.Tensor]) -> list[dict]:
    return [
        {"params": params[:1], "weight_decay": 0.1},
        {"params": params[1:], "weight_decay": 0.0},
    ]


def gradients(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).bfloat16() for p in params]


def run(steps, model: list[torch.Tensor], opt) -> None:
    """``opt`` steps ``model`` with :func:`gradients` of each of ``steps``."""
    for step in steps:
        for w, g in zip(model, gradients(model, step), strict=True):
            w.grad = g
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("kind", ["fused", "foreach", "for-loop"])
def test_steps_are_fp32_adamw_on_the_masters_and_the_weights_their_rounding(kind):
    """Bit for bit: the masters follow torch's AdamW on fp32 weights given the bf16 gradients
    (upcast), and after every step each bf16 weight is its master rounded."""
    flags = {
        "fused": dict(fused=True),
        "foreach": dict(foreach=True),
        "for-loop": dict(foreach=False),
    }
    model = weights()
    fp32 = [w.float() for w in model]
    ours = MasterWeightAdamW(groups(model), **SETTINGS, **flags[kind])
    ref = torch.optim.AdamW(groups(fp32), **SETTINGS, **flags[kind])
    for step in range(5):
        for w, r, g in zip(model, fp32, gradients(model, step), strict=True):
            w.grad, r.grad = g, g.float()
        ours.step()
        ref.step()
        assert all(m.grad is None for m in ours.masters)  # freed: read by nothing after the step
        ours.zero_grad()
        ref.zero_grad()
        for w, m, r in zip(model, ours.masters, fp32, strict=True):
            assert torch.equal(m, r)
            assert torch.equal(w, r.bfloat16())
            assert w.dtype == torch.bfloat16 and m.dtype == torch.float32
            assert w.grad is None and m.grad is None
    assert sum((w.float() != r).sum() for w, r in zip(model, fp32, strict=True)) > 0  # rounded


def test_updates_below_bf16_resolution_add_up_in_the_masters():
    """At lr=1e-4 every AdamW update of a weight of 1.0 (bf16 spacing 2^-7 above it, 2^-8 below)
    is below half a spacing: plain AdamW on bf16 weights never moves them, the masters move by
    lr per step and the bf16 weights follow once the masters have moved far enough."""
    settings = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    plain, ours = [torch.ones(8).bfloat16()], [torch.ones(8).bfloat16()]
    plain_opt = torch.optim.AdamW(plain, **settings)
    ours_opt = MasterWeightAdamW(ours, **settings)
    for _ in range(60):
        for w in (*plain, *ours):
            w.grad = torch.ones_like(w)  # a constant gradient: each update is -lr (to fp32 eps)
        plain_opt.step()
        ours_opt.step()
    assert torch.equal(plain[0], torch.ones(8).bfloat16())
    master = ours_opt.masters[0]
    assert torch.allclose(master, torch.full((8,), 1 - 60e-4), atol=1e-6)
    assert torch.equal(ours[0], master.bfloat16())
    # 1 - 0.006 lies between 1 - 2^-7 and 1 - 2^-8 (0.9921875, 0.99609375), nearer the first
    assert (ours[0] == 0.9921875).all()


def test_a_weight_without_gradient_is_left_alone_and_stale_master_gradients_are_not_reused():
    model = weights()
    opt = MasterWeightAdamW(groups(model), **SETTINGS)
    model[0].grad, model[1].grad = gradients(model, 0)
    opt.step()
    before = [w.clone() for w in model], [m.clone() for m in opt.masters]
    # The next step reaches the matrix only; the vector's master gradient from step 0 is gone
    model[0].grad, model[1].grad = gradients(model, 1)[0], None
    opt.step()
    assert torch.equal(model[1], before[0][1]) and torch.equal(opt.masters[1], before[1][1])
    assert opt.masters[1].grad is None
    assert not torch.equal(model[0], before[0][0])


def test_a_checkpoint_carries_the_masters_and_a_resumed_optimizer_continues_exactly():
    """state_dict -> a new optimizer on the rounded weights (as a resumed run builds one) -> the
    same next steps as the uninterrupted optimizer, bit for bit; without the masters (a plain
    AdamW checkpoint) the steps go on from the rounded weights and differ."""

    model = weights()
    opt = MasterWeightAdamW(groups(model), **SETTINGS)
    run(range(3), model, opt)
    saved = {k: v for k, v in opt.state_dict().items()}
    saved = torch.load(_roundtrip(saved), weights_only=False)  # as a checkpoint file holds it
    run(range(3, 6), model, opt)

    resumed = [w.clone() for w in weights()]  # other values: the load must set everything
    for w, v in zip(resumed, saved["master_weights"], strict=True):
        w.copy_(v)  # the checkpoint's model weights: the masters rounded
    opt2 = MasterWeightAdamW(groups(resumed), **SETTINGS)
    opt2.load_state_dict(saved)
    run(range(3, 6), resumed, opt2)
    for a, b in zip((*model, *opt.masters), (*resumed, *opt2.masters), strict=True):
        assert torch.equal(a, b)

    plain_state = {k: v for k, v in saved.items() if k != "master_weights"}
    fresh = [v.bfloat16() for v in saved["master_weights"]]
    opt3 = MasterWeightAdamW(groups(fresh), **SETTINGS)
    opt3.load_state_dict(plain_state)
    run(range(3, 6), fresh, opt3)
    assert any(not torch.equal(a, b) for a, b in zip(opt.masters, opt3.masters, strict=True))


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_a_checkpoint_of_another_model_is_refused():
    opt = MasterWeightAdamW(weights(), **SETTINGS)
    state = opt.state_dict()
    for bad in (state["master_weights"][:1], [torch.zeros(3, 5), torch.zeros(3)]):
        with pytest.raises(ValueError, match="master weights do not match this model's 2"):
            MasterWeightAdamW(weights(), **SETTINGS).load_state_dict(
                {**state, "master_weights": bad}
            )


def test_step_hooks_run_once_after_the_weights_are_written_and_params_as_torch_takes_them():
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # torch hooks AdamW.step too now
    model = weights()
    opt = MasterWeightAdamW(groups(model), **SETTINGS)
    seen = []
    opt.register_step_post_hook(
        lambda o, *_: seen.append(
            all(torch.equal(w, m.bfloat16()) for w, m in zip(model, o.masters, strict=True))
        )
    )
    for step in range(2):
        for w, g in zip(model, gradients(model, step), strict=True):
            w.grad = g
        opt.step()
    assert seen == [True, True]
    with pytest.raises(TypeError, match=r"not a torch\.FloatTensor"):
        MasterWeightAdamW(torch.zeros(4, 3))
    one = MasterWeightAdamW([{"params": torch.zeros(4, 3).bfloat16()}])
    assert [tuple(m.shape) for m in one.masters] == [(4, 3)]


# -- the compiled step (optim.master_weights under compile=true) ----------------------------------
@pytest.fixture
def uncompiled_step(monkeypatch):
    """The compiled step's arithmetic (:func:`lmlab.optim.master_adamw`) run eagerly: its tests
    need not wait for the compiler (test_the_compiled_step_compiles_once_per_group... compiles)."""
    import lmlab.optim

    monkeypatch.setattr(lmlab.optim, "_compiled_master_adamw", lambda: lmlab.optim.master_adamw)


def three_weights(seed: int = 0, rows: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).bfloat16() for s in ((rows, 3), (4,), (3,))]


def three_groups(params: list[torch.Tensor]) -> list[dict]:
    return [
        {"params": params[:2], "weight_decay": 0.1},
        {"params": params[2:], "weight_decay": 0.0},
    ]


# Each step's gradient treatment: (skip_nonfinite's factor, clip_grad_norm_'s max_norm,
# clip_grad_value_'s bound, index of a weight without gradient)
TREATMENTS = [
    (None, None, None, None),
    (0.5, None, None, None),
    (None, 0.5, None, None),  # below every step's norm: clipping acts
    (None, None, 0.1, None),
    (2.0, None, 0.1, None),  # the factor first, then the bound
    (2.0, 0.5, None, 1),
    (None, None, None, 2),  # a group with no gradient at all
]


def treated_steps(opt, model, on_step=None) -> list[torch.Tensor | None]:
    """Run :data:`TREATMENTS` (the learning rate changing every step) through MasterWeightAdamW
    ``opt`` on bf16 weights ``model``; returns clip_grad_norm_'s norms."""
    norms = []
    for step, (factor, max_norm, bound, missing) in enumerate(TREATMENTS):
        for k, (w, g) in enumerate(zip(model, gradients(model, step), strict=True)):
            w.grad = None if k == missing else g
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (1 - step / 10)
        opt.pull_grads()
        if factor is not None:
            opt.scale_grads(factor)
        norms.append(None if max_norm is None else opt.clip_grad_norm_(max_norm))
        if bound is not None:
            opt.clip_grad_value_(bound)
        opt.step()
        if on_step is not None:
            on_step(step)
        opt.zero_grad()
    return norms


def reference_steps(fp32, model) -> tuple[torch.optim.AdamW, list[torch.Tensor | None]]:
    """:func:`treated_steps` as torch's AdamW on fp32 weights and torch's clipping functions."""
    ref = torch.optim.AdamW(three_groups(fp32), **SETTINGS, foreach=False)
    norms = []
    for step, (factor, max_norm, bound, missing) in enumerate(TREATMENTS):
        for k, (r, g) in enumerate(zip(fp32, gradients(model, step), strict=True)):
            r.grad = None if k == missing else g.float() * (factor or 1.0)
        for group in ref.param_groups:
            group["lr"] = 1e-2 * (1 - step / 10)
        live = [r for r in fp32 if r.grad is not None]
        norms.append(None if max_norm is None else torch.nn.utils.clip_grad_norm_(live, max_norm))
        if bound is not None:
            torch.nn.utils.clip_grad_value_(live, bound)
        ref.step()
        ref.zero_grad()
    return ref, norms


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.usefixtures("uncompiled_step")
def test_scaling_and_clipping_reach_the_step_as_torch_applies_them(compiled):
    """Both steps, the eager one (fp32 copies of the gradients scaled in place, torch's AdamW) and
    the compiled one's arithmetic (:func:`master_adamw`, run eagerly here), follow torch's AdamW on
    fp32 weights given the same gradients scaled, norm-clipped and value-clipped by torch's
    functions, through a changing learning rate, a weight without
    gradient and a group without any; every bf16 weight is its master rounded after each step. The
    compiled step reads the model's bf16 gradients without changing them."""
    model = three_weights()
    fp32 = [w.float() for w in model]
    ours = MasterWeightAdamW(three_groups(model), compiled=compiled, **SETTINGS, fused=True)
    ref, ref_norms = reference_steps(fp32, model)
    before = []

    def check(step):
        assert all(torch.equal(w, m.bfloat16()) for w, m in zip(model, ours.masters, strict=True))
        grads = gradients(model, step)
        assert all(
            w.grad is None or torch.equal(w.grad, g) for w, g in zip(model, grads, strict=True)
        )
        before.append([m.clone() for m in ours.masters])

    norms = treated_steps(ours, model, check)
    for got, want in zip(norms, ref_norms, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want)
    assert torch.equal(before[-1][2], before[-2][2])  # the last step left the vector group alone
    assert not torch.equal(before[3][0], before[2][0])
    for m, r in zip(ours.masters, fp32, strict=True):
        torch.testing.assert_close(m, r, rtol=1e-6, atol=1e-6)
        state, ref_state = ours.state[m], ref.state[r]
        assert state["step"].item() == ref_state["step"].item()
        torch.testing.assert_close(state["exp_avg"], ref_state["exp_avg"])
        torch.testing.assert_close(state["exp_avg_sq"], ref_state["exp_avg_sq"])
    assert [ours.state[m]["step"].item() for m in ours.masters] == [7, 6, 6]


def test_the_compiled_step_compiles_once_per_group_and_matches_the_eager_step():
    """torch.compile (inductor: C++ on a CPU) of the step: the same masters as the eager step to
    fp32 rounding, and one graph per parameter group that no later step (a new learning rate, a
    new clipping factor) compiles again."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # counts since the process started, reset() or not
    model, twin = three_weights(), three_weights()
    opts = [
        MasterWeightAdamW(three_groups(w), compiled=c, **SETTINGS, fused=True)
        for w, c in ((model, True), (twin, False))
    ]
    for step in range(3):
        for opt, weights_ in zip(opts, (model, twin), strict=True):
            for w, g in zip(weights_, gradients(weights_, step), strict=True):
                w.grad = g
            for group in opt.param_groups:
                group["lr"] = 1e-2 / (step + 1)
            opt.pull_grads()
            opt.clip_grad_norm_(1.0 + step)
            opt.step()
            opt.zero_grad()
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2 and counters["stats"]["unique_graphs"] == 2
    for a, b in zip(opts[0].masters, opts[1].masters, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(w, m.bfloat16()) for w, m in zip(model, opts[0].masters, strict=True))
    torch._dynamo.reset()


@pytest.mark.usefixtures("uncompiled_step")
def test_a_checkpoint_resumes_across_the_compiled_and_the_eager_step():
    """The compiled step keeps AdamW's state as torch's fused AdamW does: its checkpoint resumes
    under the eager step (and back), the next steps as the uninterrupted run's."""

    for first in (True, False):
        model = three_weights()
        opt = MasterWeightAdamW(three_groups(model), compiled=first, **SETTINGS, fused=True)
        run(range(2), model, opt)
        saved = torch.load(_roundtrip(opt.state_dict()), weights_only=False)
        run(range(2, 4), model, opt)
        resumed = [w.clone() for w in model]
        switched = MasterWeightAdamW(
            three_groups(resumed), compiled=not first, **SETTINGS, fused=True
        )
        switched.load_state_dict(saved)
        run(range(2, 4), resumed, switched)
        for a, b in zip(opt.masters, switched.masters, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def fp32_gradients(opt: MasterWeightAdamW, model: list[torch.Tensor], step: int, how: str) -> None:
    """Give ``opt``'s masters a step's gradient in fp32 as gradient accumulation does (three
    micro-batches added by accumulate_grads) or as DDP's hook does (fp32_all_reduce_hook: views of
    the all-reduced bucket, ``reduced`` set, the model's gradients dropped)."""
    if how == "accumulated":
        for micro in range(3):
            for w, g in zip(model, gradients(model, 10 * step + micro), strict=True):
                w.grad = g
            opt.accumulate_grads()
        return
    flat = torch.cat([g.float().flatten() for g in gradients(model, step)])
    offset = 0
    for m in opt.masters:
        m.grad = flat[offset : offset + m.numel()].view_as(m)
        offset += m.numel()
    opt.reduced = True


@pytest.mark.usefixtures("uncompiled_step")
@pytest.mark.parametrize("how", ["accumulated", "all-reduced"])
def test_the_compiled_step_reads_fp32_gradients_the_masters_hold(how):
    """Gradient accumulation and DDP's hook leave the step's gradient in the masters' fp32
    ``.grad``: the compiled step reads those, with clipping's factor, as the eager step does."""
    results = []
    for compiled in (True, False):
        model = three_weights()
        opt = MasterWeightAdamW(three_groups(model), compiled=compiled, **SETTINGS, fused=True)
        for step in range(2):
            fp32_gradients(opt, model, step, how)
            opt.pull_grads()
            assert all(g.dtype == torch.float32 for g in opt.step_grads())
            opt.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad()
        results.append(opt.masters)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not torch.equal(results[0][0], three_weights()[0].float())  # they stepped


@pytest.mark.usefixtures("uncompiled_step")
@pytest.mark.parametrize("compiled", [False, True])
def test_in_a_plain_loop_clipping_before_the_step_clips(compiled):
    """backward, clip_grad_norm_, step (no Lightning hook pulled the gradients first): the step
    clips as torch's clip_grad_norm_ on fp32 weights does."""
    model = three_weights()
    fp32 = [w.float() for w in model]
    ours = MasterWeightAdamW(three_groups(model), compiled=compiled, **SETTINGS, fused=True)
    ref = torch.optim.AdamW(three_groups(fp32), **SETTINGS)
    for w, r, g in zip(model, fp32, gradients(model, 0), strict=True):
        w.grad, r.grad = g, g.float()
    norm = ours.clip_grad_norm_(0.1)
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(fp32, 0.1))
    assert norm > 1  # clipping acts
    ours.step()
    ref.step()
    for m, r in zip(ours.masters, fp32, strict=True):
        torch.testing.assert_close(ours.state[m]["exp_avg"], ref.state[r]["exp_avg"])
        torch.testing.assert_close(m, r, rtol=1e-6, atol=1e-6)


def test_each_optimizer_compiles_its_own_graphs_and_past_the_limit_steps_eagerly():
    """Dynamo keeps at most recompile_limit graphs per code object, and with fullgraph a further
    one fails: each optimizer compiles its own copy of the step (two optimizers of two groups each
    fit under a limit of 2), and an optimizer that needs one graph more warns and steps eagerly,
    with the same arithmetic."""
    import torch._dynamo

    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2):
        limited_steps()
    torch._dynamo.reset()


def limited_steps() -> None:
    """A compiled optimizer, another of other shapes, and an eager one of those, stepped alike
    (see the test above): no warning until the third graph of each compiled one."""
    import warnings

    models = [three_weights(rows=5), three_weights(rows=6), three_weights(rows=6)]
    opts = [
        MasterWeightAdamW(three_groups(w), compiled=c, **SETTINGS, fused=True)
        for w, c in zip(models, (True, True, False), strict=True)
    ]
    for step in range(2):
        for opt, model in zip(opts, models, strict=True):
            for w, g in zip(model, gradients(model, step), strict=True):
                w.grad = g
            if step == 1:
                opt.clip_grad_value_(0.5)  # a bound: a third graph for each group
            if step == 1 and opt.compiled:
                with pytest.warns(UserWarning, match="steps eagerly from here on"):
                    opt.step()
            else:
                with warnings.catch_warnings():
                    warnings.filterwarnings("error", message=".*steps eagerly")
                    opt.step()
            opt.zero_grad()
    torch.testing.assert_close(opts[1].masters, opts[2].masters, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("compile", "setting", "compiled"),
    [(True, True, True), (True, False, False), (False, True, False)],
)
def test_the_master_step_is_compiled_under_compile_unless_turned_off(compile, setting, compiled):
    """configure_optimizers: master weights' step compiled with compile set and
    optim.compile_master_step (the default) true; eager otherwise."""
    from types import SimpleNamespace

    from lmlab.models.decoder import DecoderLM

    optim = dict(lr=1e-3, master_weights=True, compile_master_step=setting)
    dims = dict(n_layers=1, d_model=8, n_heads=2, max_seq_len=4)
    module = DecoderLM(vocab_size=16, special_ids={}, optim=optim, compile=compile, **dims)
    module._trainer = SimpleNamespace(precision="bf16-true", max_steps=10)
    optimizer = module.bfloat16().configure_optimizers()["optimizer"]
    assert isinstance(optimizer, MasterWeightAdamW) and optimizer.compiled is compiled


def test_the_compiled_step_refuses_what_it_does_not_compute():
    for setting in ("amsgrad", "maximize"):
        with pytest.raises(ValueError, match="amsgrad, maximize and differentiable need"):
            MasterWeightAdamW(weights(), compiled=True, fused=True, **{setting: True})
    with pytest.raises(ValueError, match=r"step counts on the weights' device.*pass fused=True"):
        MasterWeightAdamW(weights(), compiled=True)  # torch keeps them on the CPU otherwise
    MasterWeightAdamW(weights(), compiled=True, capturable=True)


# -- through lmlab's training ---------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_training_steps_the_masters_clips_their_gradients_and_leaves_the_weights_rounded(
    tiny_cfg, monkeypatch, algorithm
):
    """bf16-true + master_weights: the Trainer's optimizer is MasterWeightAdamW; each AdamW step
    sees fp32 gradients pulled from the model and clipped by gradient_clip_algorithm (norm, or
    every value, <= gradient_clip_val, far below the unclipped ones); after training every bf16
    weight is its master rounded."""
    sizes = []
    adamw_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        assert all(g.dtype == torch.float32 for g in grads)
        ord_ = 2 if algorithm == "norm" else float("inf")
        norms = torch.stack([torch.linalg.vector_norm(g, ord_) for g in grads])
        sizes.append(torch.linalg.vector_norm(norms, ord_).item())
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    clip = 0.01 if algorithm == "norm" else 1e-4
    cfg = tiny_cfg(
        "trainer.precision=bf16-true",
        "optim.master_weights=true",
        f"trainer.gradient_clip_val={clip}",
        f"+trainer.gradient_clip_algorithm={algorithm}",
        "trainer.max_steps=4",
        "callbacks.samples=null",
    )
    _, objects = train(cfg)
    model = objects["model"]
    (opt,) = [o for o in objects["trainer"].optimizers]
    assert isinstance(opt, MasterWeightAdamW)
    assert len(sizes) == 4 and all(n <= clip * (1 + 1e-5) for n in sizes)
    params = {id(p): p for p in model.parameters()}.values()
    assert len(opt.model_params) == len(params)
    for w, m in zip(opt.model_params, opt.masters, strict=True):
        assert w.dtype == torch.bfloat16 and torch.equal(w, m.bfloat16())


@pytest.mark.parametrize("fails", [False, True])
def test_the_masters_leave_the_device_when_fit_ends_or_raises(tiny_cfg, monkeypatch, fails):
    """Lightning moves the model and AdamW's state to the CPU at teardown, not the masters: lmlab's
    callback moves them when fit ends and when it raises (here the CPU is the device too, so the
    move itself is recorded)."""
    from lmlab.models.base import LMModule

    moved = []
    to = MasterWeightAdamW.to
    monkeypatch.setattr(
        MasterWeightAdamW, "to", lambda self, d: moved.append(str(d)) or to(self, d)
    )
    training_step = LMModule.training_step

    def failing(self, batch, batch_idx):
        if fails and self.global_step == 2:
            raise RuntimeError("a failing step")
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(LMModule, "training_step", failing)
    cfg = tiny_cfg(
        "trainer.precision=bf16-true",
        "optim.master_weights=true",
        "trainer.max_steps=3",
        "callbacks.samples=null",
    )
    if fails:
        with pytest.raises(RuntimeError, match="a failing step"):
            train(cfg)
    else:
        train(cfg)
    assert moved == ["cpu"]


def test_a_failed_move_of_the_masters_leaves_the_fit_error_and_lightning_clean_up(
    tiny_cfg, monkeypatch
):
    """After a device error the move may fail too: a warning, and the fit's own error is the
    one raised (Lightning's clean-up after the callbacks still runs: its teardown moves the model
    to the CPU)."""
    from lmlab.models.base import LMModule

    def lost(self, device):
        raise RuntimeError("device lost")

    def failing(self, batch, batch_idx):
        raise ValueError("the step failed")

    monkeypatch.setattr(MasterWeightAdamW, "to", lost)
    monkeypatch.setattr(LMModule, "training_step", failing)
    teardowns = []
    teardown = L.pytorch.strategies.SingleDeviceStrategy.teardown
    monkeypatch.setattr(
        L.pytorch.strategies.SingleDeviceStrategy,
        "teardown",
        lambda self: teardowns.append(1) or teardown(self),
    )
    cfg = tiny_cfg("trainer.precision=bf16-true", "optim.master_weights=true")
    with (
        pytest.warns(UserWarning, match="master weights not moved off the device: device lost"),
        pytest.raises(ValueError, match="the step failed"),
    ):
        train(cfg)
    assert teardowns


@pytest.mark.slow
def test_under_compile_training_steps_the_masters_with_the_compiled_step(tiny_cfg, monkeypatch):
    """compile=true + bf16-true + master_weights: the Trainer's optimizer steps compiled, reading
    the model's bf16 gradients with clipping's factor (the step's gradient norm <= 0.01); after
    training every bf16 weight is its master rounded."""
    norms = []
    compiled_step = MasterWeightAdamW._compiled_step

    def recording(self, grads, factor, bound):
        live = [g for g in grads if g is not None]
        assert live and all(g.dtype == torch.bfloat16 for g in live)
        norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in live]))
        norms.append((norm * factor).item())
        return compiled_step(self, grads, factor, bound)

    monkeypatch.setattr(MasterWeightAdamW, "_compiled_step", recording)
    cfg = tiny_cfg(
        "trainer.precision=bf16-true",
        "optim.master_weights=true",
        "compile=true",
        "trainer.gradient_clip_val=0.01",
        "trainer.max_steps=3",
        "callbacks.samples=null",
    )
    _, objects = train(cfg)
    (opt,) = objects["trainer"].optimizers
    assert opt.compiled
    assert len(norms) == 3 and all(n <= 0.01 * (1 + 1e-5) for n in norms)
    for w, m in zip(opt.model_params, opt.masters, strict=True):
        assert w.dtype == torch.bfloat16 and torch.equal(w, m.bfloat16())


class RecordGradients(L.Callback):
    """Each micro-batch's model gradients (bf16) right after its backward (callbacks run before the
    module's on_after_backward, which moves them into the masters), and the masters' gradients
    AdamW steps with."""

    def __init__(self) -> None:
        self.micro = []

    def on_after_backward(self, trainer, pl_module) -> None:
        (opt,) = trainer.optimizers
        self.micro.append([w.grad.clone() for w in opt.model_params])


def train_recording(cfg, monkeypatch) -> tuple[list, list]:
    """(each micro-batch's model gradients, each step's master gradients) of ``cfg``'s run."""
    stepped = []
    adamw_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        stepped.append([m.grad.clone() for m in self.masters])
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with open_dict(cfg):
        cfg.callbacks.record = {"_target_": f"{__name__}.RecordGradients"}
    _, objects = train(cfg)
    (recorder,) = [c for c in objects["trainer"].callbacks if isinstance(c, RecordGradients)]
    return recorder.micro, stepped


MASTERS = [
    "trainer.precision=bf16-true",
    "optim.master_weights=true",
    "trainer.gradient_clip_val=0",
    "optim.warmup_steps=0",
    "callbacks.samples=null",
]


def test_accumulated_gradients_add_up_in_fp32(tiny_cfg, monkeypatch):
    """In one process each micro-batch's bf16 gradient is added into the fp32 masters' after its
    backward: the step's gradient is the fp32 sum exactly (a bf16 sum rounds at every addition)."""
    cfg = tiny_cfg(*MASTERS, "trainer.accumulate_grad_batches=4", "trainer.max_steps=2")
    micros, steps = train_recording(cfg, monkeypatch)
    assert len(micros) == 8 and len(steps) == 2
    rounded = 0
    for s, stepped in enumerate(steps):
        micro = micros[4 * s : 4 * s + 4]
        for k, got in enumerate(stepped):
            fp32 = (
                micro[0][k].float()
                + micro[1][k].float()
                + micro[2][k].float()
                + micro[3][k].float()
            )
            assert torch.equal(got, fp32)
            bf16 = micro[0][k] + micro[1][k] + micro[2][k] + micro[3][k]
            rounded += int((bf16.float() != fp32).sum())
    assert rounded > 0  # the bf16 sum would have differed


@pytest.mark.parametrize("bad", [1, 2])
def test_a_skipped_micro_batch_rescales_the_master_gradients(tiny_cfg, monkeypatch, bad):
    """skip_nonfinite with accumulation: the step's other micro-batch's gradient is scaled up to
    the mean over its own targets; with master weights the scaling must reach the fp32 gradients
    AdamW steps with (a review: pulled after the rescale, it was lost without a trace)."""
    from lmlab.models.base import LMModule

    calls = [0]

    def nll(self, batch, _nll=LMModule.nll):
        out = _nll(self, batch)
        if self.training:
            calls[0] += 1
            if calls[0] == bad:
                return (out[0] * float("nan"), *out[1:])
        return out

    monkeypatch.setattr(LMModule, "nll", nll)
    cfg = tiny_cfg(
        *MASTERS,
        "trainer.skip_nonfinite=true",
        "trainer.accumulate_grad_batches=2",
        "trainer.max_steps=1",
    )
    micros, steps = train_recording(cfg, monkeypatch)
    # causal LM: both micro-batches have as many targets, so the trained one's gradient doubles
    assert len(micros) == 1 and len(steps) == 1  # the skipped micro-batch had no backward
    for g, m in zip(micros[0], steps[0], strict=True):
        assert torch.equal(m, 2 * g.float())


def test_a_resume_that_switches_master_weights_keeps_the_fp32_values(tiny_cfg):
    """A checkpoint with masters resumed without them: the model gets the masters, not their bf16
    rounding; one of fp32 weights (32-true) resumed with masters starts them from those weights.
    Tied weights (the decoder's embedding and head) get the value under both names."""
    import copy

    cfg = tiny_cfg(
        "trainer.precision=bf16-true",
        "optim.master_weights=true",
        "trainer.max_steps=3",
        "callbacks.samples=null",
    )
    _, objects = train(cfg)
    model = objects["model"]
    ckpt = torch.load(
        objects["output_dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    masters = ckpt["optimizer_states"][0]["master_weights"]
    names = [n for _, ns in trained_params(model) for n in ns]
    assert len(names) > len(masters)  # a tied weight has two names
    rounded = copy.deepcopy(ckpt)
    model.optim_cfg["master_weights"] = False
    model.on_load_checkpoint(rounded)
    for (_, ns), m in zip(trained_params(model), masters, strict=True):
        assert all(rounded["state_dict"][n].dtype == torch.float32 for n in ns)
        assert all(torch.equal(rounded["state_dict"][n], m) for n in ns)
        assert all(torch.equal(ckpt["state_dict"][n], m.bfloat16()) for n in ns)
    # the other way: fp32 weights, no masters
    fp32 = copy.deepcopy(ckpt)
    del fp32["optimizer_states"][0]["master_weights"]
    fp32["state_dict"] = {k: v.float() + 1e-3 for k, v in fp32["state_dict"].items()}
    model.optim_cfg["master_weights"] = True
    model.on_load_checkpoint(fp32)
    seeded = fp32["optimizer_states"][0]["master_weights"]
    for (_, ns), m in zip(trained_params(model), seeded, strict=True):
        assert torch.equal(m, fp32["state_dict"][ns[0]]) and m.dtype == torch.float32


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["optim.master_weights=true", "trainer.precision=32-true"],
            r"optim\.master_weights=true keeps fp32 copies of bf16 weights, but "
            r"trainer\.precision=32-true has no bf16 weights .*: add trainer\.precision=bf16-true",
        ),
        (
            ["optim.master_weights=true", "trainer.precision=bf16-mixed"],
            r"trainer\.precision=bf16-mixed has no bf16 weights",
        ),
        (["optim.master_weights=yes"], r"optim\.master_weights='yes' must be true or false"),
        (
            ["optim.compile_master_step=2"],
            r"optim\.compile_master_step=2 must be true or false",
        ),
        (
            [
                "+trainer.strategy=deepspeed_stage_2",
                "trainer.precision=bf16-true",
                "optim.master_weights=true",
            ],
            r"does not combine with trainer\.strategy=deepspeed_stage_2, which shards the weights",
        ),
        (
            ["trainer=fsdp", "trainer.precision=bf16-true", "optim.master_weights=true"],
            r"does not combine with trainer=fsdp: .* trainer\.precision=32-true "
            r"trainer\.strategy\.param_dtype=bf16",
        ),
        (
            [
                "trainer=ddp_sim",
                "+trainer.strategy.find_unused_parameters=true",
                "trainer.precision=bf16-true",
                "optim.master_weights=true",
            ],
            r"does not combine with DDP's find_unused_parameters: .* drop find_unused_parameters",
        ),
        (
            [
                "+trainer.strategy=ddp_find_unused_parameters_true",
                "trainer.precision=bf16-true",
                "optim.master_weights=true",
            ],
            r"does not combine with DDP's find_unused_parameters",
        ),
    ],
)
def test_master_weights_without_bf16_weights_or_with_fsdp_is_refused(tiny_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_settings(tiny_cfg(*overrides))


def test_master_weights_in_several_processes_without_ddp_are_refused_at_fit_start():
    """Under DDP the communication hook all-reduces the masters' fp32 gradients; a strategy of
    several processes that is not DDP would step each process on its own gradients: named when
    fit starts, before any step."""
    from types import SimpleNamespace

    from lmlab.models.decoder import DecoderLM

    module = DecoderLM(
        vocab_size=16,
        special_ids={},
        optim=dict(lr=1e-3),
        n_layers=1,
        d_model=8,
        n_heads=2,
        max_seq_len=4,
    ).bfloat16()
    optimizer = MasterWeightAdamW(groups(list(module.parameters())), **SETTINGS)
    trainer = SimpleNamespace(strategy=SimpleNamespace(model=module), optimizers=[optimizer])
    module._trainer = SimpleNamespace(**vars(trainer), world_size=1)
    module.on_fit_start()  # one process: nothing to register, nothing refused
    module._trainer = SimpleNamespace(**vars(trainer), world_size=2)
    with pytest.raises(ConfigError, match=r"with 2 processes needs DDP .* SimpleNamespace is not"):
        module.on_fit_start()
