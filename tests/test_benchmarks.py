"""The benchmark scripts run end to end at tiny sizes and their tables are consistent with themselves.

Speed targets are measured by the scripts (benchmarks/README.md), never asserted here: these machines
are noisy. What is checked: each script runs with its options, and the derived columns follow from the
measured ones (tokens/s from step time and batch shape, ratios from the two contenders' times).
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def run(monkeypatch, capsys, tmp_path):
    """Run a benchmark script's ``main`` with a command line; returns what it printed. The script
    is imported as its own folder's module, as ``python benchmarks/<name>.py`` runs it. Its
    tokenizers and token stores go to the test's folder (not the user's cache), and the log
    levels its ``common.quiet()`` sets are put back after the test."""
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]

    def run(name: str, command_line: str) -> str:
        sys.modules.pop(name, None)
        importlib.import_module(name).main(command_line.split())
        return capsys.readouterr().out

    yield run
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


def tables(text: str) -> list[list[dict[str, str]]]:
    """The markdown tables printed in ``text``, each a list of {header: cell} rows."""
    found, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|--"):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                cells = [c.strip() for c in row.strip("|").split("|")]
                rows.append(dict(zip(header, cells, strict=True)))
            found.append(rows)
    return found


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x%"))


def assert_ratio(printed: str, num: str, den: str) -> None:
    """``printed`` is num / den of the unrounded values that ``num`` and ``den`` print rounded:
    it lies between the ratios of their rounding interval's ends (widened by its own rounding)."""
    half = lambda cell: 0.5 * 10.0 ** -len(cell.partition(".")[2])
    n, d, r = number(num), number(den), number(printed)
    low = (n - half(num)) / (d + half(den)) - half(printed.rstrip("x"))
    high = (n + half(num)) / (d - half(den)) + half(printed.rstrip("x"))
    assert low <= r <= high, (printed, num, den)


def test_gpu_script_smoke_run_on_cpu(run):
    out = run(
        "gpu",
        "--tiny --device cpu --family decoder encoder_decoder --compile-mode max-autotune "
        "--sdpa-backend math --loss-chunk-size 0 8 --compile-scope blocks "
        "--precision bf16-true bf16-true+masters --accumulate 1 2",
    )
    assert "gpu: lmlab presets (tiny sizes), compile off" in out  # --tiny: off
    (rows,) = tables(out)
    keys = ("family", "loss chunk", "compile scope", "compile mode", "attention", "precision")
    got = [tuple(r[k] for k in (*keys, "accumulate")) for r in rows]
    assert got == [
        (family, chunk, "off", "off", "math", precision, accumulate)
        for family in ("decoder", "encoder_decoder")
        for chunk in ("0", "8")
        for precision in ("bf16-true", "bf16-true+masters")
        for accumulate in ("1", "2")
    ]
    steps = [line.split(":")[1].split() for line in out.splitlines() if "steps (ms, host)" in line]
    assert len(steps) == len(rows)
    for r, host in zip(rows, steps, strict=True):  # tiny: batch 2 x 64 input tokens, 0.1 ms
        ms, tokens = number(r["mean step ms"]), 128e3 * number(r["accumulate"])
        assert tokens / (ms + 0.05) - 0.5 <= number(r["tokens/s"]) <= tokens / (ms - 0.05) + 0.5
        assert r["meets"] == "n/a (tiny)"
        assert number(r["warm-up s"]) >= 0  # set-up and warm-up: under 0.05 s at this size
        # 3 timed steps, whose host times fill the synchronised window: their mean is the mean
        assert len(host) == 3
        assert sum(map(float, host)) / 3 == pytest.approx(ms, abs=0.1 + 0.01 * ms)


def test_gpu_script_document_length_trains_on_masked_packed_documents(run, monkeypatch):
    """--document-length: every step's batch packs documents of that mean length, and the
    backbones get their doc_ids (the masked attention of objective.document_mask); 0 beside it
    is the same run on one unmasked window, side by side."""
    from lmlab.nn.decoder import Decoder
    from lmlab.nn.encoder import Encoder

    seen = []
    for cls in (Decoder, Encoder):
        real = cls.forward
        monkeypatch.setattr(
            cls,
            "forward",
            lambda self, *a, real=real, cls=cls, **k: (
                seen.append((cls, k["doc_ids"])) or real(self, *a, **k)
            ),
        )
    out = run("gpu", "--tiny --device cpu --family decoder encoder --document-length 0 8")
    (rows,) = tables(out)
    assert [(r["family"], r["batch"]) for r in rows] == [
        ("decoder", "2 x 64"),
        ("decoder", "2 x 64, documents of ~8"),
        ("encoder", "2 x 64"),
        ("encoder", "2 x 64, documents of ~8"),
    ]
    for cls in (Decoder, Encoder):
        ids = [d for c, d in seen if c is cls]
        masked = [d is not None for d in ids]
        n = masked.index(True)  # the unmasked run's steps, then the masked run's
        assert n >= 5 and all(masked[n:]) and len(ids) - n >= 5
        assert all(d.max() > 2 for d in ids[n:])
    with pytest.raises(SystemExit, match="--document-length: decoder and encoder only"):
        run("gpu", "--tiny --device cpu --family encoder_decoder --document-length 8")
    run("gpu", "--tiny --device cpu --family encoder_decoder --document-length 0")  # no masks
    for bad in ("1", "-4"):
        with pytest.raises(SystemExit, match=f"--document-length {bad}: tokens, >= 2"):
            run("gpu", f"--tiny --device cpu --family decoder --document-length 0 {bad}")
    with pytest.raises(SystemExit, match="on GPUs the flash kernel takes no attention mask"):
        run("gpu", "--tiny --device cuda --family decoder --document-length 8 --sdpa-backend flash")


def test_random_batches_of_packed_documents():
    """common.random_batch's document_length: eos at rate 1 / length (binomial, 5 sd) and the
    batch's doc_ids those of its inputs (an eos opens a causal document, ends a masked one)."""
    sys.path.insert(0, str(BENCH))
    try:
        common = importlib.import_module("common")
    finally:
        sys.path.remove(str(BENCH))
    from lmlab.data.collate import document_ids

    eos = common.SPECIAL_IDS["eos"]
    for kind in ("causal", "masked"):
        gen = torch.Generator().manual_seed(0)
        b = common.random_batch(kind, 16, 512, 1000, document_length=32, generator=gen)
        n, p = b["input_ids"].numel(), 1 / 32
        assert abs(int((b["input_ids"] == eos).sum()) - n * p) < 5 * (n * p * (1 - p)) ** 0.5
        want = document_ids(b["input_ids"].numpy(), eos, eos_opens=kind == "causal")
        assert torch.equal(b["doc_ids"], torch.from_numpy(want))
        if kind == "masked":  # eos is special: never a masked target
            assert (b["labels"][b["input_ids"] == eos] == -100).all()
        assert "doc_ids" not in common.random_batch(kind, 2, 8, 1000, generator=gen)


def test_gpu_script_precision_values(monkeypatch):
    """--precision: Lightning's precision, + master weights (their step compiled under compile, or
    eager with -eager); master weights of anything but bf16 weights are refused."""
    monkeypatch.syspath_prepend(str(BENCH))
    gpu = importlib.import_module("gpu")
    assert gpu.precision_parts("bf16-mixed") == ("bf16-mixed", False, True)
    assert gpu.precision_parts("bf16-true+masters") == ("bf16-true", True, True)
    assert gpu.precision_parts("bf16-true+masters-eager") == ("bf16-true", True, False)
    for bad in ("bf16-mixed+masters", "32-true+masters-eager"):
        with pytest.raises(SystemExit, match="master weights are fp32 copies of bf16 weights"):
            gpu.precision_parts(bad)
    for typo in ("bf16-treu", "bf16-treu+masters"):  # refused before the first run, not at its turn
        with pytest.raises(SystemExit, match=rf"{re.escape(typo)}: not a precision; use one of"):
            gpu.precision_parts(typo)


def test_gpu_script_refuses_an_accumulation_below_one(run):
    with pytest.raises(SystemExit, match="--accumulate 0"):
        run("gpu", "--tiny --device cpu --family decoder --accumulate 1 0")


def test_gpu_script_traces_steps_after_the_timed_ones(run, tmp_path):
    """--trace-steps 2: two optimizer steps after the 3 timed ones are profiled (two AdamW steps in
    the trace) and summarised; the timed steps are the same 3."""
    import gzip
    import json

    out = run("gpu", f"--tiny --device cpu --family decoder --trace-steps 2 --trace-dir {tmp_path}")
    (trace,) = tmp_path.glob("decoder-*.json.gz")
    with gzip.open(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    steps = [e for e in events if e.get("name", "").startswith("Optimizer.step#")]
    assert len(steps) == 2
    assert f"trace: {trace}" in out and "no device kernels in the trace (a CPU run)" in out
    (host,) = [line for line in out.splitlines() if "steps (ms, host)" in line]
    assert len(host.split(":")[1].split()) == 3
    with pytest.raises(SystemExit, match="--trace-steps -1"):
        run("gpu", "--tiny --device cpu --trace-steps -1")
    with pytest.raises(SystemExit, match="is a file; name a folder"):
        run("gpu", f"--tiny --device cpu --trace-steps 1 --trace-dir {trace}")


def test_gpu_script_goes_on_when_the_profiler_fails(run, monkeypatch, tmp_path):
    """A profiler that raises costs the trace, not the run: the timed steps come before it."""

    def broken(*args, **kwargs):
        raise RuntimeError("CUPTI unavailable")

    monkeypatch.setattr(torch.profiler, "profile", broken)
    out = run("gpu", f"--tiny --device cpu --family decoder --trace-steps 2 --trace-dir {tmp_path}")
    assert "trace: the profiler failed (RuntimeError: CUPTI unavailable); no trace" in out
    (rows,) = tables(out)
    assert len(rows) == 1 and number(rows[0]["tokens/s"]) > 0


def test_gpu_script_reports_a_failing_run_and_goes_on(run, monkeypatch, capsys):
    """A configuration that raises is reported (FAILED, its row 'failed') and the others still
    run; the script then exits non-zero."""
    from lmlab.optim import MasterWeightAdamW

    def broken(self, closure=None):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(MasterWeightAdamW, "step", broken)
    with pytest.raises(SystemExit, match="1 of 3 runs failed"):
        run("gpu", "--tiny --device cpu --family decoder --precision bf16-true+masters "
                   "bf16-mixed bf16-true")  # fmt: skip
    out = capsys.readouterr().out
    assert "bf16-true+masters, accumulate 1): FAILED: RuntimeError: no such kernel" in out
    (rows,) = tables(out)
    assert [r["precision"] for r in rows] == ["bf16-true+masters", "bf16-mixed", "bf16-true"]
    assert rows[0]["tokens/s"] == "failed" and rows[0]["meets"] == "NO"
    assert all(number(r["tokens/s"]) > 0 for r in rows[1:])


def test_a_run_failing_while_profiled_leaves_no_profiler_on(run, monkeypatch, capsys, tmp_path):
    """The first run raises inside its profiled steps: its profiler stops then, so the second
    run's steps are not profiled (nor timed under a profiler) before its own trace."""
    from lmlab.models.base import LMModule

    fits, profiled = [], []
    training_step = LMModule.training_step

    def step(self, batch, batch_idx):
        if batch_idx == 0:
            fits.append(self)
        if len(fits) == 1 and self.global_step == 5:  # the first profiled step (2 + 3 before it)
            raise RuntimeError("failed mid-trace")
        if len(fits) == 2 and self.global_step < 5:
            profiled.append(torch.autograd._profiler_enabled())
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(LMModule, "training_step", step)
    with pytest.raises(SystemExit, match="1 of 2 runs failed"):
        run("gpu", "--tiny --device cpu --family decoder --precision bf16-mixed bf16-true "
                   f"--trace-steps 2 --trace-dir {tmp_path}")  # fmt: skip
    assert "FAILED: RuntimeError: failed mid-trace" in capsys.readouterr().out
    assert len(profiled) == 5 and not any(profiled)


def test_timeline_finds_the_idle_gaps_and_what_the_host_launched_after_them(monkeypatch):
    """benchmarks/timeline.py on a hand-made GPU trace: kernels on two streams (overlapping), a copy,
    their launch calls and the host's operators around them; busy time is the union, the gaps over
    20 us are blamed on the innermost operator around the next kernel's launch call."""
    monkeypatch.syspath_prepend(str(BENCH))
    timeline = importlib.import_module("timeline")

    def kernel(ts, dur, corr, name="triton_poi_fused_add_0", cat="kernel", stream=7):
        return dict(ph="X", cat=cat, name=name, ts=ts, dur=dur, pid=0, tid=stream,
                    args={"correlation": corr})  # fmt: skip

    def host(ts, dur, name, cat="cpu_op", corr=None):
        args = {} if corr is None else {"correlation": corr}
        return dict(ph="X", cat=cat, name=name, ts=ts, dur=dur, pid=1, tid=1, args=args)

    events = [
        kernel(0, 10, 1, name="nvjet_sm90_tst_256x128"),
        kernel(5, 10, 2, stream=8),  # overlaps the first: busy [0, 15)
        kernel(50, 10, 3),  # a 35 us gap, launched inside aten::mul inside Optimizer.step
        kernel(65, 5, 4),  # a 5 us gap: not listed
        kernel(100, 20, 5),  # 30 us, launched from no host operator: blamed on the call
        kernel(120, 5, 6, name="Memcpy HtoD (Pinned -> Device)", cat="gpu_memcpy"),
        kernel(200, 10, 99),  # 75 us, its launch not in the trace
        kernel(300, 5, 7),  # 90 us, launched (at 150) before the gap began: device-side
        kernel(400, 5, 8),  # 95 us, launched inside aten::outer after two children ended
        host(150, 1, "cudaLaunchKernel", cat="cuda_runtime", corr=7),
        host(380, 15, "aten::outer"),
        host(381, 2, "aten::a"),
        host(384, 2, "aten::b"),
        host(384, 1, "aten::b_inner"),
        host(390, 1, "cudaLaunchKernel", cat="cuda_runtime", corr=8),
        host(40, 7, "Optimizer.step#AdamW.step", cat="user_annotation"),
        host(44, 3, "aten::matmul"),  # starts with aten::mul, ends after it: not the innermost
        host(44, 2, "aten::mul"),
        host(41, 1, "aten::zero_"),  # ended before the launch
        host(45, 1, "cudaLaunchKernel", cat="cuda_runtime", corr=3),
        host(95, 1, "cuLaunchKernel", cat="cuda_driver", corr=5),
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1},  # metadata: skipped
    ]
    s = timeline.summarize(timeline.load_events(events), steps=1)
    assert s["window_ms"] == pytest.approx(0.405)
    assert s["busy_ms"] == pytest.approx(0.075)
    assert s["idle_ms"] == pytest.approx(0.330)
    assert s["gaps_ms"] == pytest.approx(0.325)
    assert [(round(us), by) for us, by, _ in s["longest_gaps"]] == [
        (95, "aten::outer"),
        (90, "(launched before the gap: device-side)"),
        (75, "(launch not traced)"),
        (35, "aten::mul"),
        (30, "cuLaunchKernel"),
    ]
    assert dict(s["by_kind"]) == pytest.approx(
        {"matrix products": 0.010, "elementwise and reductions": 0.065, "copies and fills": 0.005}
    )
    s2 = timeline.summarize(timeline.load_events(events), steps=2)  # per step: halved
    assert s2["busy_ms"] == pytest.approx(0.0375) and s2["blame"][0][2] == 0.5
    text = timeline.report(s)
    assert "ms a step (18.5%)" in text and "0.33 of it in gaps over 20 us" in text


def test_gpu_script_layers_override_sets_every_stack(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    gpu = importlib.import_module("gpu")
    *_, dims = gpu.preset_shape("encoder_decoder", tiny=False)
    assert (dims["n_layers"], dims["n_decoder_layers"]) == (12, 12)
    deep = gpu.with_layers("encoder_decoder", dims, 48)
    assert (deep["n_layers"], deep["n_decoder_layers"], deep["d_model"]) == (48, 48, 768)
    assert gpu.with_layers("decoder", {"n_layers": 2}, 5) == {"n_layers": 5}
    assert gpu.with_layers("decoder", dims, None) is dims


@pytest.mark.parametrize(
    ("family", "experiment"),
    [("decoder", "gpt2_124m_1gpu"), ("encoder", "bert_base"), ("encoder_decoder", "t5_base")],
)
def test_gpu_script_presets_are_the_experiment_files(monkeypatch, compose_cfg, family, experiment):
    """gpu.py copies each GPU preset (it runs where Hydra is not installed): the copy's sizes and
    training settings are what `python -m lmlab experiment=<preset>` composes."""
    monkeypatch.syspath_prepend(str(BENCH))
    gpu = importlib.import_module("gpu")
    cfg = compose_cfg(f"experiment={experiment}")
    vocab, batch, seq_len, _, dims = gpu.preset_shape(family, tiny=False)
    assert (vocab, batch, seq_len) == (cfg.tokenizer.vocab_size, cfg.data.batch_size, cfg.seq_len)
    for key, value in dims.items():  # the target length: T5's span arithmetic (gpu.py says)
        assert key == "max_target_len" or cfg.model[key] == value, key
    train = gpu.PRESETS[family]["train"]
    lightning, masters, _ = gpu.precision_parts(train["precision"])
    assert (lightning, masters) == (cfg.trainer.precision, cfg.optim.master_weights)
    assert train["compile_mode"] == ("default" if cfg.compile is True else cfg.compile)
    assert train["loss_chunk_size"] == cfg.loss_chunk_size
    assert train["log_every"] == cfg.trainer.log_every_n_steps
    assert train["log_every"] == cfg.callbacks.progress_bar.refresh_rate


def test_gpu_script_runs_each_family_with_its_preset_unless_told(monkeypatch):
    """Each family's runs take its preset's precision, compile mode and loss chunk; an option given
    replaces them for every family. The warm-up runs past the first step that writes metrics, and
    the timed steps hold the writing steps in their share (an interval of 50: 50 + 100)."""
    monkeypatch.syspath_prepend(str(BENCH))
    gpu = importlib.import_module("gpu")

    def runs(command_line: str) -> list[tuple]:
        args = gpu.parse_args(command_line.split())
        gpu.check_args(args)
        return gpu.family_runs(args)

    assert runs("--family decoder encoder") == [
        ("decoder", 16384, "model", "reduce-overhead", "bf16-true+masters", 1, 0, "auto"),
        ("encoder", None, "model", "default", "bf16-mixed", 1, 0, "auto"),
    ]
    told = runs("--family decoder encoder --precision bf16-mixed --loss-chunk-size 0 0")
    assert told == [
        ("decoder", 0, "model", "reduce-overhead", "bf16-mixed", 1, 0, "auto"),
        ("encoder", 0, "model", "default", "bf16-mixed", 1, 0, "auto"),
    ]
    flex = runs("--family decoder --document-length 0 512 --sdpa-backend auto flex")
    assert [r[-2:] for r in flex] == [(0, "auto"), (512, "auto"), (512, "flex")]  # no (0, flex)
    for bad in (  # FlexAttention: document masks, on GPUs
        "--family decoder --sdpa-backend flex",
        "--family decoder --document-length 0 --sdpa-backend auto flex",
        "--family decoder --document-length 512 --sdpa-backend flex --device cpu",
    ):
        with pytest.raises(SystemExit, match="--sdpa-backend flex: FlexAttention takes the doc"):
            runs(bad)
    schedule = lambda line, family: gpu.schedule(family, gpu.parse_args(line.split()))
    assert schedule("", "decoder") == (50, 100) and schedule("", "encoder") == (10, 30)
    assert schedule("--override trainer.log_every_n_steps=20", "decoder") == (50, 100)  # redraws
    both = "trainer.log_every_n_steps=20 callbacks.progress_bar.refresh_rate=20"
    assert schedule(f"--override {both}", "decoder") == (20, 40)
    assert schedule("--override callbacks.progress_bar.refresh_rate=25", "encoder") == (25, 50)
    assert schedule("--warmup 3 --steps 7", "decoder") == (3, 7)
    assert schedule("--tiny", "decoder") == (2, 3)


def test_benchmark_trainer_takes_hydra_overrides(monkeypatch, tmp_path):
    """gpu.py --override: Hydra overrides reach the Trainer composed from conf/; without Hydra
    (the Trainer built by hand) they are refused, not ignored."""
    monkeypatch.syspath_prepend(str(BENCH))
    common = importlib.import_module("common")
    kw = dict(accelerator="cpu", precision="32-true", max_steps=3, output_dir=tmp_path)
    trainer, how = common.lmlab_trainer(
        **kw, overrides=["trainer.log_every_n_steps=7", "callbacks.progress_bar.refresh_rate=3"]
    )
    assert how.startswith("Hydra") and trainer.log_every_n_steps == 7
    assert trainer.progress_bar_callback.refresh_rate == 3
    assert common.lmlab_trainer(**kw)[0].log_every_n_steps == 10  # conf/trainer/default.yaml
    for use_hydra in (True, False):  # a preset's interval, with Hydra or without
        trainer, _ = common.lmlab_trainer(**kw, use_hydra=use_hydra, log_every=50)
        assert trainer.log_every_n_steps == trainer.progress_bar_callback.refresh_rate == 50
    with pytest.raises(SystemExit, match="need Hydra"):
        common.lmlab_trainer(**kw, use_hydra=False, overrides=["trainer.log_every_n_steps=7"])


def test_overhead_script_ratio_is_the_step_time_ratio(run):
    out = run(
        "overhead", "--rounds 2 --warmup 1 --steps 2 --layers 1 --d-model 32 --batch 2 --seq-len 16"
    )
    (rows,) = tables(out)
    plain, lmlab = rows
    assert plain["contender"] == "plain PyTorch loop" and lmlab["contender"] == "lmlab (Lightning)"
    assert_ratio(lmlab["step time vs plain"], lmlab["median step ms"], plain["median step ms"])
    ratio = number(lmlab["step time vs plain"])
    assert f"lmlab overhead: {100 * (ratio - 1):+.1f}%" in out


@pytest.mark.parametrize("use_hydra", [True, False])
def test_overhead_contenders_make_the_same_updates(monkeypatch, tmp_path, use_hydra):
    """overhead.py races the same work: from the same weights on the same batches, four steps of
    lmlab's Trainer (composed from conf/, or by hand as on machines without Hydra) and of the
    plain loop (loss, clipping at 1.0, AdamW groups, warmup + cosine schedule) leave the same
    weights."""
    monkeypatch.syspath_prepend(str(BENCH))
    overhead = importlib.import_module("overhead")
    common = importlib.import_module("common")
    pre = dict(overhead.PRESETS["tiny"], n_layers=2, d_model=32, batch=2, seq_len=16, vocab=64)
    cpu = torch.device("cpu")
    lit, plain_step, batches = overhead.contenders(pre, cpu, "32-true", False, steps=4)
    plain = plain_step.model
    start = {name: p.detach().clone() for name, p in plain.named_parameters()}
    for name, p in lit.backbone.named_parameters():
        assert torch.equal(p, start[name]), name
    trainer, _ = common.lmlab_trainer(
        accelerator="cpu",
        precision="32-true",
        max_steps=4,
        output_dir=tmp_path,
        use_hydra=use_hydra,
    )
    trainer.fit(lit, train_dataloaders=common.loader(batches, 4))
    plain_step.reset()
    for batch in common.loader(batches, 4):
        plain_step(batch)
    assert trainer.global_step == 4
    trained = dict(plain.named_parameters())
    for name, p in lit.backbone.named_parameters():
        assert not torch.equal(p, start[name]), name  # every weight moved
        torch.testing.assert_close(p, trained[name], atol=1e-6, rtol=1e-5, msg=name)


def test_overhead_compares_round_means_on_a_gpu_and_medians_on_a_cpu(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    overhead = importlib.import_module("overhead")
    medians, means = (10.0, 10.2), (11.0, 11.5)
    assert overhead.step_basis(torch.device("cpu"), medians, means) == ("medians", 10.0, 10.2)
    assert overhead.step_basis(torch.device("cuda"), medians, means) == ("round means", 11.0, 11.5)


def test_data_script_supply_over_demand(run):
    out = run("data", "--seconds 0.3 --warmup 1 --objective clm span")
    (rows,) = tables(out)
    assert [r["objective"] for r in rows] == ["clm", "span"]
    for r in rows:
        rate, demand = number(r["batches/s"]), number(r["H100 demand (batches/s)"])
        assert number(r["supply / demand"]) == pytest.approx(rate / demand, rel=0.01)
        b, t = (int(x) for x in r["batch"].split(" x "))
        assert number(r["tokens/s"].rstrip("M")) * 1e6 == pytest.approx(rate * b * t, rel=0.01)


def test_vs_hf_script_matches_sizes_and_reports_the_time_ratio(run):
    pytest.importorskip("transformers", reason="vs_hf.py needs the optional `bench` extra")
    out = run(
        "vs_hf",
        "--layers 1 --d-model 32 --heads 2 --vocab 256 --batch 1 --seq-len 16 --target-len 8 "
        "--rounds 2 --warmup 1 --cpu-matmul onednn blas",
    )
    (rows,) = tables(out)
    by_family = {}
    for r in rows:
        by_family.setdefault(r["family"], []).append(r)
    assert set(by_family) == {"decoder", "encoder", "encoder_decoder"}
    for family, (onednn, blas, theirs) in by_family.items():
        assert onednn["model"].startswith("lmlab") and onednn["model"].endswith("(onednn)")
        assert blas["model"].startswith("lmlab") and blas["model"].endswith("(blas)")
        assert theirs["model"].startswith("HF")
        for ours in (onednn, blas):
            if family != "encoder":  # BERT has biases and learned positions: a few % more
                assert ours["parameters"] == theirs["parameters"], family
            speed = ours["lmlab / HF speed"]
            assert_ratio(speed, theirs["median step ms"], ours["median step ms"])


def test_breakdown_sorts_kernels_by_kind_and_its_table_adds_up(run):
    """benchmarks/breakdown.py: kernel names of an H100 profile (2026-11-27) and CPU operators land
    in their kind; the kinds' times add up to the total and the shares to 100%."""
    from common import FRAMEWORK, kind_of

    h100 = {
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "matrix products",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64": "attention",
        "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*)": "attention",
        "triton_poi_fused__unsafe_view_cat_mul_silu_silu_backward_split_view_4": (
            "elementwise and reductions"
        ),
        "triton_per_fused__fused_rms_norm__to_copy__unsafe_view_add_10": (
            "elementwise and reductions"
        ),
        "triton_tem_fused_mm_0": "matrix products",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::"
        "(anonymous namespace)::FusedOptimizerTensorListMetadata<4>": "optimizer",
        "Memcpy HtoD (Pageable -> Device)": "copies and fills",
    }
    for name, kind in h100.items():
        assert kind_of(name, device_kernel=True) == kind, name
    assert kind_of("aten::mm", device_kernel=False) == "matrix products"
    assert kind_of("_RMSNormBackward", device_kernel=False) == FRAMEWORK

    out = run(
        "breakdown",
        "--tiny --device cpu --family encoder --warmup 1 --steps 2 --top 5 "
        "--precision bf16-true+masters",
    )
    assert "bf16 weights, fp32 masters (eager step), compile=False" in out  # --tiny: no compile
    kinds, longest = tables(out)
    *parts, total = kinds
    assert total["kind"] == "all" and len(longest) == 5
    ms = [number(r["ms per step"]) for r in parts]
    assert sum(ms) == pytest.approx(number(total["ms per step"]), abs=0.01 * len(ms))
    assert sum(number(r["share"]) for r in parts) == pytest.approx(100, abs=0.1 * len(parts))
    top = [number(r["ms per step"]) for r in longest]
    assert top == sorted(top, reverse=True) and top[0] <= number(total["ms per step"])
    assert {r["kind"] for r in longest} <= {r["kind"] for r in parts}


def test_optimizer_script_times_the_four_steps_and_their_bandwidth(run):
    """benchmarks/optimizer.py: bf16-mixed's and bf16-true's steps, master weights' eager and
    compiled steps; the speed column is the first's time over each one's, GB/s the bytes a step
    moves over its time."""
    import re

    out = run("optimizer", "--tiny --device cpu --warmup 1 --rounds 2 --steps 1")
    n_weights = int(re.search(r"\(([\d,]+) weights\)", out).group(1).replace(",", ""))
    (rows,) = tables(out)
    assert [r["step"] for r in rows] == [
        "bf16-mixed",
        "bf16-true",
        "masters, eager",
        "masters, compiled",
    ]
    for r in rows:
        assert_ratio(r["speed vs bf16-mixed"], rows[0]["ms"], r["ms"])
        megabytes = int(r["bytes / weight"]) * n_weights / 1e6  # MB per ms = GB/s
        assert_ratio(r["GB/s"], f"{megabytes:.6f}", r["ms"])


def test_stepper_with_bf16_weights_steps_fp32_masters_and_rounds_them_back(monkeypatch):
    """breakdown.py --precision bf16-true+masters: the plain loop's model in bf16, its AdamW over
    fp32 copies (clipped there, as LMModule's hook orders it), the weights the copies rounded."""
    monkeypatch.syspath_prepend(str(BENCH))
    common = importlib.import_module("common")
    from lmlab.optim import MasterWeightAdamW

    torch.manual_seed(0)
    model = common.lmlab_model("decoder", vocab_size=64, n_layers=1, d_model=16, n_heads=2)
    batch = common.random_batch("causal", 2, 8, 64, generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    stepper = common.Stepper(
        model, common.lmlab_loss, cpu, bf16=True, bf16_weights=True, masters=True
    )
    assert isinstance(stepper.opt, MasterWeightAdamW) and not stepper.bf16  # no autocast
    before = [p.detach().clone() for p in stepper.params]
    stepper(batch)
    for p, master in zip(stepper.opt.model_params, stepper.opt.masters, strict=True):
        assert p.dtype == torch.bfloat16 and master.dtype == torch.float32
        assert torch.equal(p, master.to(torch.bfloat16))
    assert any(not torch.equal(p, old) for p, old in zip(stepper.params, before, strict=True))


def test_breakdown_leaves_named_ranges_out_of_the_kernel_time(monkeypatch):
    """On a GPU the profiler also gives a range the code names (the optimizer's step) a device-side
    entry spanning its kernels; counted as a kernel, the H100 profile of 2026-11-27 had the AdamW
    step twice (1.32 ms of 35.7 ms)."""
    from types import SimpleNamespace

    import torch

    monkeypatch.syspath_prepend(str(BENCH))
    from breakdown import kernel_times

    cuda = torch.autograd.DeviceType.CUDA
    event = lambda key, us, annotation=False, device=cuda: SimpleNamespace(
        key=key,
        device_type=device,
        is_user_annotation=annotation,
        self_device_time_total=us,
        self_cpu_time_total=us,
        count=5,
    )
    events = [
        event("multi_tensor_apply_kernel", 6500.0),
        event("Optimizer.step#AdamW.step", 6600.0, annotation=True),
        event("aten::mm", 900.0, device=torch.autograd.DeviceType.CPU),
    ]
    prof = SimpleNamespace(key_averages=lambda: events)
    assert kernel_times(prof, torch.device("cuda"), steps=5) == {
        "multi_tensor_apply_kernel": (1.3, 1.0)
    }


@pytest.mark.parametrize(("warmup", "accumulate"), [(2, 1), (0, 1), (2, 2)])
def test_step_timer_total_ends_at_the_last_step_not_at_the_end_of_training(
    tmp_path, monkeypatch, warmup, accumulate
):
    """gpu.py's and overhead.py's timed window: the optimizer steps after the warm-up (none, or
    steps of several micro-batches) up to the last one. What Lightning does once a run ends (here
    a callback that takes 0.5 s at the epoch's end) is not a step's cost and stays out, as the
    plain loop's window leaves it out."""
    import time

    import lightning as L
    import torch

    monkeypatch.syspath_prepend(str(BENCH))
    import common

    class SlowEnd(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            time.sleep(0.5)

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.w(batch).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    timer = common.StepTimer(warmup=warmup)
    trainer = L.Trainer(
        max_steps=6,
        accumulate_grad_batches=accumulate,
        accelerator="cpu",
        callbacks=[timer, SlowEnd()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Tiny(), train_dataloaders=torch.utils.data.DataLoader(torch.randn(64, 4)))
    assert len(timer.times) == 6 - warmup
    assert timer.total < 0.5


def test_gpu_questions_script_runs_valid_commands_and_keeps_each_answer(tmp_path):
    """gpu_questions.sh (one GPU call's prepared measurements) with a stand-in Python that records
    its command lines: each step's file ends with its exit status, every benchmark command line
    is one its script accepts, and the test selection names existing GPU tests (so that a renamed
    option or test cannot waste a GPU session)."""
    import json
    import re
    import subprocess

    log, fake = tmp_path / "argv.jsonl", tmp_path / "python"
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    fake.chmod(0o755)
    out = tmp_path / "answers"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake)}
    done = subprocess.run(
        ["bash", str(BENCH / "gpu_questions.sh"), "answers"],  # relative: the caller's folder
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    steps = ["01_tests", "02_decoder", "03_reference", "04_flex"]
    for name in steps:
        assert (out / f"{name}.txt").read_text().splitlines()[-1].startswith("exit 0, ")
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    scripts = [c for c in calls if c and c[0].startswith("benchmarks/")]
    assert [c[0] for c in scripts] == [
        "benchmarks/gpu.py",
        "benchmarks/reference.py",
        "benchmarks/gpu.py",
    ]
    sys.path.insert(0, str(BENCH))
    try:
        for script, *argv in scripts:
            module = importlib.import_module(Path(script).stem)
            args = module.parse_args(argv)  # exits on an option it does not take
            if hasattr(module, "check_args"):
                module.check_args(args)  # and on a value gpu.py refuses before its runs
    finally:
        sys.path.remove(str(BENCH))
    flex = scripts[2]
    assert flex[flex.index("--sdpa-backend") + 1 :][:2] == ["auto", "flex"]
    (tests,) = [c for c in calls if c[:2] == ["-m", "pytest"]]
    names = re.findall(r"^def (test_\w+)", (BENCH.parent / "tests/test_gpu.py").read_text(), re.M)
    words = tests[tests.index("-k") + 1].split(" or ")
    assert all(any(w in n for n in names) for w in words)


def test_scratch_folders_go_when_the_process_ends_and_trace_folders_stay(tmp_path):
    """The scripts' Trainer folders (metrics.csv, ...) were left in the temporary folder by every
    run; the traces a run writes without --trace-dir are what it is for, and stay."""
    import subprocess

    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import common\n"
        "scratch = common.scratch_folder('lmlab-test-scratch-')\n"
        "(scratch / 'run' / 'metrics.csv').parent.mkdir(); (scratch / 'run' / 'metrics.csv').touch()\n"
        "print(scratch); print(common.trace_folder(None, 2, 'lmlab-test-traces-'))\n"
        "assert common.trace_folder(None, 0) is None\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(BENCH)], capture_output=True, text=True, check=True
    )
    scratch, traces = map(Path, p.stdout.split())
    assert scratch.name.startswith("lmlab-test-scratch-") and not scratch.exists()
    assert traces.name.startswith("lmlab-test-traces-") and traces.is_dir()
    traces.rmdir()
