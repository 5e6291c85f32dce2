"""Where a training step's time goes: kernel time per step by kind, for one family at its GPU preset.

The step is lmlab's without the Trainer (``overhead.py`` measures that): ``LMModule.nll`` as
``training_step`` optimises it (compiled as ``compile=true`` compiles it), backward, clipping at 1.0
and the fused AdamW, on random tokens, under bf16 autocast on a GPU (``--precision bf16-true``: bf16
weights, ``bf16-true+masters``: and AdamW over fp32 copies, its step compiled under compile;
``bf16-true+masters-eager``: not). After ``--warmup`` steps,
``torch.profiler`` records ``--steps`` more. On a GPU the table sums the kernels' device time by kind
(matrix products, attention, fused elementwise and reductions, optimizer, copies, other) and gives
the share of the step's wall time the device was busy; on a CPU it sums each operator's own CPU
time, with the Python and autograd around them as a kind of its own. The longest kernels follow.

    python benchmarks/breakdown.py --family decoder          # GPU: GPT-2 124M, 16 x 1024
    python benchmarks/breakdown.py --tiny --device cpu       # smoke run on a CPU (seconds)
"""

from __future__ import annotations

import argparse
import collections
import time

import common
import torch
from common import kind_of
from gpu import PRESETS, precision_parts, preset_shape
from torch.profiler import ProfilerActivity, profile

from lmlab.parallel import COMPILE_SCOPES, use_tf32

PRECISIONS = ("bf16-mixed", "bf16-true", "bf16-true+masters", "bf16-true+masters-eager")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--family", choices=list(PRESETS), default="decoder")
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="default: on a GPU")
    p.add_argument(
        "--compile-scope",
        choices=COMPILE_SCOPES,
        default="model",
        help="lmlab's compile_scope: model (one graph) or blocks (each block + the head and loss)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="bf16-mixed",
        help="bf16-mixed: bf16 autocast (on a GPU; a CPU runs fp32); bf16-true: the model's\n"
        "weights in bf16; bf16-true+masters: and AdamW over fp32 copies (optim.master_weights;\n"
        "under --compile its step compiled), bf16-true+masters-eager: with the eager step",
    )
    p.add_argument("--tiny", action="store_true", help="tiny dims (CPU smoke run)")
    p.add_argument("--warmup", type=int, default=10, help="unrecorded steps (compilation included)")
    p.add_argument("--steps", type=int, default=5, help="recorded steps")
    p.add_argument("--top", type=int, default=15, help="longest kernels listed")
    return p.parse_args(argv)


def build(args, device: torch.device):
    """The family's module at its preset (or tiny) size, one random batch on ``device``, and the
    step (a closure): ``common.Stepper`` with lmlab's loss, bf16 autocast on a GPU."""
    vocab, B, T, target_len, dims = preset_shape(args.family, args.tiny)
    torch.manual_seed(0)
    model = common.lmlab_model(
        args.family,
        vocab_size=vocab,
        compile=args.compile,
        compile_scope=args.compile_scope,
        **dims,
    )
    model.configure_model()  # compiles nll as under the Trainer
    gen = torch.Generator().manual_seed(0)
    kind = PRESETS[args.family]["kind"]
    batch = common.random_batch(kind, B, T, vocab, target_len=target_len, generator=gen)
    # what the Trainer does with a batch before the step: the host-side hook, then the move
    batch = common.to_device(model.on_before_batch_transfer(batch, 0), device)
    lightning, masters, compiled_step = precision_parts(args.precision)
    stepper = common.Stepper(
        model,
        common.lmlab_loss,
        device,
        bf16=device.type == "cuda",
        bf16_weights=lightning == "bf16-true",
        masters=masters,
        compiled_step=bool(args.compile) and compiled_step,
    )
    shape = f"{B} x {T}" + (f" -> {target_len}" if target_len else "")
    return lambda: stepper(batch), shape, model.num_params(False)


def kernel_times(prof, device: torch.device, steps: int) -> dict[str, tuple[float, int]]:
    """{kernel or operator name: (ms per step, calls per step)}: device kernels on a GPU, operators'
    own CPU time on a CPU."""
    out = {}
    for e in prof.key_averages():
        if device.type == "cuda":
            # a range the code names (record_function: the optimizer's step, the profiler's step
            # markers) also has a device-side entry spanning its kernels: not a kernel of its own
            if e.device_type != torch.autograd.DeviceType.CUDA or e.is_user_annotation:
                continue
            us = getattr(e, "self_device_time_total", None)
            us = e.self_cuda_time_total if us is None else us  # torch < 2.4
        else:
            if e.key.startswith("ProfilerStep"):
                continue
            us = e.self_cpu_time_total
        if us > 0:
            out[e.key] = (us / steps / 1e3, e.count / steps)
    return out


def precision_said(precision: str, device: torch.device, compiled: bool) -> str:
    lightning, masters, compiled_step = precision_parts(precision)
    if lightning == "bf16-mixed":
        return "bf16 autocast" if device.type == "cuda" else "fp32"
    if not masters:
        return "bf16 weights"
    step = "compiled" if compiled and compiled_step else "eager"
    return f"bf16 weights, fp32 masters ({step} step)"


def main(argv=None) -> None:
    args = parse_args(argv)
    common.quiet()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; for a smoke run use --tiny --device cpu")
    if args.compile is None:
        args.compile = device.type == "cuda" and not args.tiny
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    use_tf32(True)  # as training does by default (tf32=true): autocast's fp32 leftovers on GPUs
    step, shape, n_params = build(args, device)
    for _ in range(args.warmup):
        step()
    common.sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        common.sync(device)
        wall_ms = (time.perf_counter() - t0) / args.steps * 1e3
    times = kernel_times(prof, device, args.steps)
    by_kind: dict[str, float] = collections.defaultdict(float)
    for name, (ms, _) in times.items():
        by_kind[kind_of(name, device.type == "cuda")] += ms
    total = sum(by_kind.values())

    print(
        f"breakdown: {args.family} {shape}, {n_params / 1e6:.1f}M parameters, "
        f"{precision_said(args.precision, device, bool(args.compile))}, "
        f"compile={args.compile} ({args.compile_scope}), "
        f"{device}; {args.steps} profiled steps after {args.warmup}"
    )
    print(f"machine: {common.machine()}")
    what = "GPU kernel time" if device.type == "cuda" else "operators' own CPU time"
    rows = [
        [kind, f"{ms:.2f}", f"{100 * ms / total:.1f}%"]
        for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])
    ]
    rows.append(["all", f"{total:.2f}", "100.0%"])
    print()
    print(common.table(["kind", "ms per step", "share"], rows))
    print(
        f"\n{what} {total:.2f} ms per step; step wall time under the profiler {wall_ms:.2f} ms"
        + (f" (device busy {100 * total / wall_ms:.0f}%)" if device.type == "cuda" else "")
    )
    longest = sorted(times.items(), key=lambda kv: -kv[1][0])[: args.top]
    print()
    print(
        common.table(
            ["ms per step", "calls per step", "kind", "kernel" if device.type == "cuda" else "op"],
            [
                [f"{ms:.2f}", f"{calls:g}", kind_of(name, device.type == "cuda"), name[:100]]
                for name, (ms, calls) in longest
            ],
        )
    )


if __name__ == "__main__":
    main()
