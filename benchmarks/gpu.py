"""The three GPU presets through lmlab's Lightning path: tokens/s and MFU on one GPU, bf16 + compile.

For each family, ``DecoderLM`` / ``EncoderLM`` / ``EncoderDecoderLM`` at its preset's size is fitted by a
Lightning Trainer built like ``lmlab.train.build_run`` (``common.lmlab_trainer``: Hydra compose when
Hydra is installed, else the same settings by hand) on random tokens, for ``--warmup`` untimed steps
(compilation happens there) and ``--steps`` timed ones, bracketed by device synchronisations.
MFU is PaLM's ``6 N + 12 L d T`` FLOPs per token (``lmlab.flops``) over the device's bf16 peak.

The presets are copied from ``conf/experiment/{gpt2_124m_1gpu,bert_base,t5_base}.yaml``, sizes and
training settings (this script does not need Hydra, which GPU images often lack; a test checks the
copies against the files): the decoder's is GPT-2 124M as measured fastest on one GPU (bf16 weights
with fp32 masters, CUDA graphs, the fused head + loss, metrics every 50 steps), the encoder's and
encoder-decoder's bf16 autocast with compile's default mode. ``--precision``, ``--compile-mode`` and
``--loss-chunk-size`` replace a preset's value for every family. Without ``--warmup``, the warm-up
runs past the first step that writes metrics (its first call compiles more), and ``--steps`` (default
30, or 2 x the longer of the metrics and the progress-bar intervals when that is longer) takes the
steps that wait for the GPU (writing, redrawing) in their share.
Tokens count input tokens (the encoder-decoder's encoder inputs); FLOPs are what each part computes
(``LMModule.step_flops``: the MLM head on the selected positions, the encoder-decoder's decoder and
head at the target length).

    bash benchmarks/gpu.sh                                # on one GPU: this script, then pytest -m gpu
    python benchmarks/gpu.py --tiny --device cpu          # smoke run on a CPU (tiny sizes, no compile)
"""

from __future__ import annotations

import argparse
import gc
import itertools
import textwrap
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import common
import lightning as L
import timeline
import torch
from torch.profiler import ProfilerActivity, profile

from lmlab import flops
from lmlab.parallel import (
    ATTENTION_KERNELS,
    COMPILE_MODES,
    COMPILE_SCOPES,
    FLEX,
    attention_kernel,
    use_tf32,
)

# A preset's training settings (``train``): --precision's form of trainer.precision and
# optim.master_weights, compile's mode, loss_chunk_size (None: the module's default, off on GPUs),
# and trainer.log_every_n_steps with callbacks.progress_bar.refresh_rate (``log_every``).
AUTOCAST = dict(precision="bf16-mixed", compile_mode="default", loss_chunk_size=None, log_every=10)
PRESETS = {
    # conf/experiment/gpt2_124m_1gpu.yaml (gpt2_124m's 12 x 768, 12 heads, vocab 50257 padded to
    # 50304, 16 x 1024, with the one-GPU settings)
    "decoder": dict(
        kind="causal",
        vocab=50257,
        batch=16,
        seq_len=1024,
        dims=dict(n_layers=12, d_model=768, n_heads=12, max_seq_len=1024),
        train=dict(
            precision="bf16-true+masters",
            compile_mode="reduce-overhead",
            loss_chunk_size=16384,
            log_every=50,
        ),
    ),
    # conf/experiment/bert_base.yaml: 12 x 768, 12 heads, learned positions, vocab 30522, 32 x 512
    "encoder": dict(
        kind="masked",
        vocab=30522,
        batch=32,
        seq_len=512,
        dims=dict(n_layers=12, d_model=768, n_heads=12, max_seq_len=512, positions="learned"),
        train=AUTOCAST,
    ),
    # conf/experiment/t5_base.yaml: 12 + 12 x 768, 12 heads, vocab 32100, 32 x 512 in, 114 out
    "encoder_decoder": dict(
        kind="seq2seq",
        vocab=32100,
        batch=32,
        seq_len=512,
        target_len=114,
        dims=dict(
            n_layers=12,
            n_decoder_layers=12,
            d_model=768,
            n_heads=12,
            max_seq_len=512,
            max_target_len=114,
        ),
        train=AUTOCAST,
    ),
}
# what the command line's options replace (None: not given, each family's preset value)
TRAIN_OPTIONS = ("precision", "compile_mode", "loss_chunk_size")
TINY = dict(n_layers=2, d_model=64, n_heads=2)  # --tiny: these dims, vocab 512, batch 2

# Issue 4: reference figures on an H100 80GB HBM3 (2026-11-26) and lmlab's targets, tokens/s.
REFERENCE = {
    "decoder": ("nanoGPT compiled 470K (HF GPT-2 385K)", 520e3, 0.45),
    "encoder": ("HF BERT-base MLM eager 347K", 450e3, None),
    "encoder_decoder": ("HF T5-base compiled 235K", 300e3, None),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--family", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--precision",
        nargs="+",
        help="Lightning precision, one run per value (default: each preset's; bf16-mixed but\n"
        "the decoder's bf16-true+masters); bf16-true+masters: bf16-true with\n"
        "optim.master_weights=true (AdamW over fp32 copies of the weights; under compile its\n"
        "step compiled), bf16-true+masters-eager: the same with the eager step; e.g.\n"
        "bf16-mixed bf16-true bf16-true+masters to compare them side by side",
    )
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, help="default: on, off with --tiny"
    )
    p.add_argument(
        "--compile-mode",
        nargs="+",
        choices=COMPILE_MODES,
        help="torch.compile mode when compiling (lmlab's compile=<mode>), one run per value\n"
        "(default: each preset's; default but the decoder's reduce-overhead);\n"
        "e.g. default reduce-overhead to compare them side by side",
    )
    p.add_argument(
        "--compile-scope",
        nargs="+",
        choices=COMPILE_SCOPES,
        default=["model"],
        help="lmlab's compile_scope, one run per value: model (one graph) or blocks (one graph\n"
        "per kind of block + the head and loss); e.g. model blocks to compare both",
    )
    p.add_argument(
        "--cold",
        action="store_true",
        help="no inductor caches (a first compile's time, as on a fresh machine)",
    )
    p.add_argument(
        "--accumulate",
        nargs="+",
        type=int,
        default=[1],
        help="micro-batches per optimizer step (trainer.accumulate_grad_batches), one run per\n"
        "value; --warmup and --steps count optimizer steps, tokens/s every micro-batch",
    )
    p.add_argument("--layers", type=int, help="override the preset's layers (per stack)")
    p.add_argument(
        "--override",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra overrides of the Trainer's conf/ (trainer.*, callbacks.*), e.g.\n"
        "trainer.log_every_n_steps=50 callbacks.progress_bar.refresh_rate=50",
    )
    p.add_argument(
        "--sdpa-backend",
        nargs="+",
        choices=["auto", *ATTENTION_KERNELS, FLEX],
        default=["auto"],
        help="attention kernel (auto: PyTorch's choice), one run per value; training's\n"
        "`attention=<kernel>` key; flex: the document masks through FlexAttention's\n"
        "block masks (with --document-length; GPUs), e.g. --document-length 0 512\n"
        "--sdpa-backend auto flex: one unmasked window, dense masks, flex masks",
    )
    p.add_argument(
        "--document-length",
        type=int,
        nargs="+",
        default=[0],
        help="decoder and encoder: packed documents of about this many tokens, attending only\n"
        "within themselves (objective.document_mask=true), one run per value; 0 (default): one\n"
        "unmasked window; e.g. 0 512 to see what the masks cost, side by side",
    )
    p.add_argument("--tiny", action="store_true", help="tiny dims and few steps (CPU smoke run)")
    p.add_argument(
        "--warmup",
        type=int,
        help="untimed steps, compilation included (default: 10, or the longer of the metrics\n"
        "and progress-bar intervals when that is later)",
    )
    p.add_argument(
        "--steps",
        type=int,
        help="timed steps (default: 30, or twice the longer of the metrics and progress-bar\n"
        "intervals when that is longer)",
    )
    p.add_argument("--peak-flops", type=float, help="device peak FLOP/s (default: lmlab.flops)")
    p.add_argument(
        "--loss-chunk-size",
        type=int,
        nargs="+",
        help="module's loss_chunk_size, one run per value (default: each preset's; the\n"
        "module's, off on GPUs, but the decoder's 16384: its whole batch in one chunk);\n"
        "e.g. 0 16384 to compare the plain head with the fused head + loss",
    )
    p.add_argument(
        "--trace-steps",
        type=int,
        default=0,
        help="profile this many steps after the timed ones (torch.profiler, the Trainer's whole\n"
        "step): each run writes <run>.json.gz and prints timeline.py's summary (device busy,\n"
        "kernel time by kind, idle gaps by what the host launched next)",
    )
    p.add_argument(
        "--trace-dir", type=Path, help="where the traces go (default: a new temporary folder, kept)"
    )
    return p.parse_args(argv)


class Tracer(L.Callback):
    """Profiles the optimizer steps ``start + 1 .. start + steps`` (after a device sync at the end
    of step ``start``, and one at the last) and writes them as a gzipped Chrome trace. A profiler
    that fails is reported and the run goes on: the timed steps, before it, are the measurement."""

    def __init__(self, start: int, steps: int, path: Path) -> None:
        self.start, self.steps, self.path = start, steps, path
        self.profiler = None
        self.error: str | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return  # a micro-batch inside an optimizer step
        done = trainer.global_step
        try:
            if done == self.start:
                common.sync(pl_module.device)
                activities = [ProfilerActivity.CPU]
                if pl_module.device.type == "cuda":
                    activities.append(ProfilerActivity.CUDA)
                self.profiler = profile(activities=activities)
                self.profiler.start()
            elif done == self.start + self.steps and self.profiler is not None:
                common.sync(pl_module.device)
                profiler, self.profiler = self.profiler, None
                profiler.stop()
                profiler.export_chrome_trace(str(self.path))
        except Exception as e:  # a diagnostic must not cost the measurement
            self.error, self.profiler = f"{type(e).__name__}: {e}", None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A run that fails while profiling: the profiler stops here, not during the next run."""
        profiler, self.profiler = self.profiler, None
        if profiler is not None:
            try:
                profiler.stop()
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"


MASTERS = "+masters"  # a --precision value's suffix: bf16-true with optim.master_weights=true
EAGER = "-eager"  # ... and optim.compile_master_step=false


# Lightning's precisions a GPU benchmark takes (refused up front: Lightning refuses a typo only
# when the run's Trainer is built, after the runs before it)
PRECISIONS = ("bf16-mixed", "bf16-true", "16-mixed", "16-true", "32-true", "bf16", "16", "32")


def precision_parts(value: str) -> tuple[str, bool, bool]:
    """A --precision value as (Lightning's precision, optim.master_weights,
    optim.compile_master_step); SystemExit for masters on anything but bf16-true."""
    lightning, masters, compiled = value, False, True
    if value.endswith(MASTERS + EAGER):
        lightning, masters, compiled = value.removesuffix(MASTERS + EAGER), True, False
    elif value.endswith(MASTERS):
        lightning, masters = value.removesuffix(MASTERS), True
    if lightning not in PRECISIONS:
        raise SystemExit(
            f"--precision {value}: not a precision; use one of {', '.join(PRECISIONS)}, or "
            f"bf16-true{MASTERS} / bf16-true{MASTERS}{EAGER}"
        )
    if masters and lightning != "bf16-true":
        raise SystemExit(
            f"--precision {value}: master weights are fp32 copies of bf16 weights; use "
            f"bf16-true{MASTERS} (or bf16-true{MASTERS}{EAGER})"
        )
    return lightning, masters, compiled


def preset_shape(family: str, tiny: bool) -> tuple[int, int, int, int, dict]:
    """(vocabulary, batch, sequence length, target length or 0, model dims) of a family's preset,
    or of its tiny version."""
    pre = PRESETS[family]
    vocab, B, T = pre["vocab"], pre["batch"], pre["seq_len"]
    target_len = pre.get("target_len", 0)
    dims = dict(pre["dims"])
    if tiny:
        vocab, B, T, target_len = 512, 2, 64, 16 if target_len else 0
        dims |= TINY | dict(max_seq_len=T)
        if family == "encoder_decoder":
            dims |= dict(n_decoder_layers=TINY["n_layers"], max_target_len=target_len)
    return vocab, B, T, target_len, dims


def batch_label(family: str, tiny: bool, documents: int) -> str:
    """The table's batch column: a family's batch shape, and the documents packed in it."""
    _, B, T, target_len, _ = preset_shape(family, tiny)
    return (
        f"{B} x {T}"
        + (f" -> {target_len}" if target_len else "")
        + (f", documents of ~{documents}" if documents else "")
    )


def with_layers(family: str, dims: dict, layers: int | None) -> dict:
    """``dims`` with ``layers`` blocks per stack (None: as they are)."""
    if layers is None:
        return dims
    return (
        dims
        | dict(n_layers=layers)
        | (dict(n_decoder_layers=layers) if family == "encoder_decoder" else {})
    )


# the Trainer's settings at which a step waits for the GPU (both are the preset's log_every)
SYNC_KEYS = ("trainer.log_every_n_steps", "callbacks.progress_bar.refresh_rate")


def metrics_interval(family: str, args) -> int:
    """Steps between the steps that wait for the GPU: the longer of the preset's intervals or of
    ``--override``'s last ``trainer.log_every_n_steps`` (steps that write metrics) and
    ``callbacks.progress_bar.refresh_rate`` (progress-bar redraws)."""
    every = {key: PRESETS[family]["train"]["log_every"] for key in SYNC_KEYS}
    for override in args.override:
        key, _, value = override.partition("=")
        if key.lstrip("+") in every:
            every[key.lstrip("+")] = int(value)
    return max(every.values())


def schedule(family: str, args) -> tuple[int, int]:
    """(warm-up steps, timed steps) of a family's runs: the command line's, or by default a warm-up
    past the first step that writes metrics (whose first call compiles more: 0.7 s on an H200) and
    timed steps that hold the steps that wait for the GPU (writing, redrawing) in their share."""
    every = metrics_interval(family, args)
    warmup, steps = (2, 3) if args.tiny else (max(10, every), max(30, 2 * every))
    return (
        warmup if args.warmup is None else args.warmup,
        steps if args.steps is None else args.steps,
    )


class Run(NamedTuple):
    """One configuration that gpu.py measures."""

    family: str
    loss_chunk: int | None  # None: the module's default
    scope: str
    mode: str
    precision: str
    accumulate: int
    documents: int  # 0: one unmasked window
    attention: str


def family_runs(args) -> list[Run]:
    """Every run: each family's preset values where the command line gives none."""
    runs = []
    for family in args.family:
        preset = PRESETS[family]["train"]
        given = {key: getattr(args, key) or [preset[key]] for key in TRAIN_OPTIONS}
        runs += (  # flex takes document masks: not with one unmasked window (0)
            Run(*run)
            for run in itertools.product(
                [family],
                given["loss_chunk_size"],
                args.compile_scope,
                given["compile_mode"],
                given["precision"],
                args.accumulate,
                args.document_length,
                args.sdpa_backend,
            )
            if not (run[-2] == 0 and run[-1] == FLEX)
        )
    return runs


def described(run: Run, args) -> dict:
    """A run's configuration as its table row and progress lines say it (compile off: "off")."""
    return dict(
        family=run.family,
        loss_chunk="default" if run.loss_chunk is None else run.loss_chunk,
        scope=run.scope if args.compile else "off",
        mode=run.mode if args.compile else "off",
        precision=run.precision,
        attention=run.attention,
        accumulate=run.accumulate,
        shape=batch_label(run.family, args.tiny, run.documents),
    )


def run_family(run: Run, args, device: torch.device, out: Path) -> dict:
    family, loss_chunk, scope, mode, precision, accumulate, documents, attention = run
    pre = PRESETS[family]
    lightning_precision, masters, compiled_step = precision_parts(precision)
    vocab, B, T, target_len, dims = preset_shape(family, args.tiny)
    dims = with_layers(family, dims, args.layers)
    torch.manual_seed(0)
    model = common.lmlab_model(
        family,
        vocab_size=vocab,
        compile=args.compile and mode,
        compile_scope=scope,
        loss_chunk_size=loss_chunk,
        master_weights=masters,
        compile_master_step=compiled_step,
        **dims,
    )
    gen = torch.Generator().manual_seed(0)
    batches = [
        common.random_batch(
            pre["kind"],
            B,
            T,
            vocab,
            target_len=target_len,
            document_length=documents or None,
            generator=gen,
        )
        for _ in range(4)
    ]
    warmup, steps = schedule(family, args)
    timed = warmup + steps
    timer = common.StepTimer(warmup, last=timed)
    total_steps = timed + args.trace_steps
    name = f"{family}-{loss_chunk}-{scope}-{precision}-{mode}-{accumulate}-{documents}-{attention}"
    callbacks = [timer]
    tracer = None
    if args.trace_steps:
        tracer = Tracer(timed, args.trace_steps, args.trace_dir / f"{name}.json.gz")
        callbacks.append(tracer)
    trainer, how = common.lmlab_trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        precision=lightning_precision,
        max_steps=total_steps,
        output_dir=out / name,
        callbacks=callbacks,
        overrides=args.override,
        accumulate=accumulate,
        log_every=1 if args.tiny else PRESETS[family]["train"]["log_every"],  # tiny: 5 steps
    )
    # what training's `attention` key applies; compile traces the kernel chosen here
    backend = attention_kernel(attention, device.type == "cuda")
    if attention == FLEX:  # as lmlab.train.build_run sets it
        model.backbone.flex_masks = True
    t0 = time.perf_counter()
    with backend:
        trainer.fit(model, train_dataloaders=common.loader(batches, total_steps * accumulate))
    wall = time.perf_counter() - t0
    step_s = timer.total / steps  # an optimizer step: `accumulate` micro-batches
    tokens_per_s = accumulate * B * T / step_s
    peak = args.peak_flops or flops.peak_flops(device)
    mfu = None if not peak else flops.mfu(tokens_per_s, model.flops_per_token(batches[0]), peak)
    return dict(
        described(run, args),
        warmup_s=wall - timer.total,  # set-up, warm-up steps (compiling) and the run's end
        timed=(warmup + 1, timed),
        params=model.num_params(False),
        step_ms=1e3 * step_s,
        median_ms=common.median_ms(timer.times),
        steps_ms=[1e3 * t for t in timer.times],
        tokens_per_s=tokens_per_s,
        mfu=mfu,
        wall=wall,
        how=how,
        trace=tracer,
    )


def check_args(args: argparse.Namespace) -> None:
    """The command line's values, refused before any run (or any GPU is looked for); the lists
    lose repeated values (two runs of one configuration would share a run folder and trace)."""
    for key in ("family", "loss_chunk_size", "compile_scope", "compile_mode", "precision",
                "accumulate", "document_length", "sdpa_backend"):  # fmt: skip
        if getattr(args, key) is not None:  # None: not given, each preset's value
            setattr(args, key, list(dict.fromkeys(getattr(args, key))))
    for precision in args.precision or ():
        precision_parts(precision)
    if min(args.accumulate) < 1:
        raise SystemExit(f"--accumulate {min(args.accumulate)}: micro-batches per step, >= 1")
    for n in args.document_length:
        if n == 1 or n < 0:
            raise SystemExit(f"--document-length {n}: tokens, >= 2 (or 0: one unmasked window)")
    if max(args.document_length) and "encoder_decoder" in args.family:
        raise SystemExit(
            "--document-length: decoder and encoder only (their objectives pack documents); "
            "pass --family decoder encoder"
        )
    if max(args.document_length) and "flash" in args.sdpa_backend and args.device != "cpu":
        raise SystemExit(
            "--sdpa-backend flash --document-length: on GPUs the flash kernel takes no attention "
            "mask (training refuses attention=flash with document masks); use auto or efficient"
        )
    if FLEX in args.sdpa_backend and (max(args.document_length) == 0 or args.device == "cpu"):
        raise SystemExit(
            "--sdpa-backend flex: FlexAttention takes the document masks, on GPUs (no backward "
            "on CPUs): pass --document-length N (N >= 2; a 0 beside it runs the unmasked window "
            "with auto only)"
        )
    if args.trace_steps < 0:
        raise SystemExit(f"--trace-steps {args.trace_steps}: steps to profile, >= 0")


def main(argv=None) -> None:
    args = parse_args(argv)
    check_args(args)
    args.trace_dir = common.trace_folder(args.trace_dir, args.trace_steps, "lmlab-gpu-traces-")
    common.quiet()
    t_start = time.perf_counter()
    if args.compile is None:
        args.compile = not args.tiny
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; for a smoke run use --tiny --device cpu")
    use_tf32(True)  # as `python -m lmlab` does by default (tf32=true): fp32 leftovers of autocast
    if args.cold:
        torch._inductor.config.force_disable_caches = True
    print(
        f"gpu: lmlab presets{' (tiny sizes)' if args.tiny else ''}, "
        f"compile {'on' if args.compile else 'off'}"
    )
    print(f"machine: {common.machine()}")
    out = common.scratch_folder("lmlab-gpu-bench-")
    results = []
    for run in family_runs(args):
        d = described(run, args)
        label = (  # the run, as its table row says it
            f"  {run.family} (loss chunk {d['loss_chunk']}, compile {d['mode']} / {d['scope']}, "
            f"{run.precision}, accumulate {run.accumulate}"
            + (f", documents of ~{run.documents}" if run.documents else "")
            + (f", attention {run.attention}" if run.attention != "auto" else "")
            + ")"
        )
        try:
            r = run_family(run, args, device, out)
        except Exception as e:  # one failing configuration must not cost the others' figures
            said = "".join(traceback.format_exception_only(e)).strip()
            print(
                f"{label}: FAILED: {said}\n"
                + textwrap.indent("".join(traceback.format_tb(e.__traceback__)[-3:]), "    "),
                flush=True,
            )
            results.append(dict(d, failed=said))
            r = None
        if r is None:  # out of the except block, whose traceback holds the run's frames
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        results.append(r)
        first, last = r["timed"]
        print(
            f"{label}: {r['tokens_per_s']:,.0f} tokens/s (steps {first}-{last} timed; "
            f"{r['wall']:.0f} s with compilation; {time.perf_counter() - t_start:.0f} s so far)\n"
            # the host's time per step: steps that write metrics wait for the device, the
            # steps after them run ahead of it; a long one stands out here, not in the median
            f"    steps (ms, host): {' '.join(f'{ms:.1f}' for ms in r['steps_ms'])}",
            flush=True,
        )
        tracer = r["trace"]
        if tracer is not None:
            timeline.say(tracer.path, tracer.error, args.trace_steps)
    rows = []
    for r in results:
        ref, target, mfu_target = REFERENCE[r["family"]]
        if "failed" in r:
            head = [r["family"], r["shape"], r["loss_chunk"], r["scope"], r["mode"]]
            head += [r["attention"], r["precision"]]
            rows.append([*head, r["accumulate"], *["failed"] * 6, ref, "", "NO"])
            continue
        ok = r["tokens_per_s"] >= target and (
            mfu_target is None or (r["mfu"] is not None and r["mfu"] >= mfu_target)
        )
        rows.append(
            [
                r["family"],
                r["shape"],
                r["loss_chunk"],
                r["scope"],
                r["mode"],
                r["attention"],
                r["precision"],
                r["accumulate"],
                f"{r['params'] / 1e6:.1f}M",
                f"{r['warmup_s']:.1f}",
                f"{r['step_ms']:.1f}",
                f"{r['median_ms']:.1f}",
                f"{r['tokens_per_s']:,.0f}",
                "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                ref,
                f">= {target / 1e3:.0f}K"
                + (f", {100 * mfu_target:.0f}% MFU" if mfu_target else ""),
                "n/a (tiny)"
                if args.tiny
                else "n/a (--layers)"
                if args.layers is not None
                else ("yes" if ok else "NO"),
            ]
        )
    print()
    print(
        common.table(
            [
                "family",
                "batch",
                "loss chunk",
                "compile scope",
                "compile mode",
                "attention",
                "precision",
                "accumulate",
                "parameters",
                "warm-up s",
                "mean step ms",
                "median host step ms",
                "tokens/s",
                "MFU",
                "reference (H100, issue 4)",
                "target",
                "meets",
            ],
            rows,
        )
    )
    done = [r for r in results if "failed" not in r]
    if done:
        print(f"\nTrainer: {done[0]['how']}; callbacks on: {common.SPEED_CALLBACKS}.")
    print(f"Elapsed {time.perf_counter() - t_start:.0f} s.")
    if len(done) < len(results):
        raise SystemExit(f"{len(results) - len(done)} of {len(results)} runs failed (above)")


if __name__ == "__main__":
    main()
