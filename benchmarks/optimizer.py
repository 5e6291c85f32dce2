"""The optimizer step alone (clipping at 1.0 and AdamW), side by side in one process, on a family's
preset parameters (GPT-2 124M for the decoder) or ``--tiny`` ones:

- ``bf16-mixed``: torch's fused AdamW on fp32 weights after ``clip_grad_norm_`` of their fp32
  gradients (the step under ``trainer.precision=bf16-mixed``);
- ``bf16-true``: the same on bf16 weights, gradients and moments (``bf16-true`` without master
  weights: the fewest bytes, and updates below bf16's resolution lost);
- ``masters, eager``: ``optim.master_weights`` without compile: the bf16 gradients copied into
  fp32, clipped (a factor the step applies in place), torch's fused AdamW on the fp32 masters,
  the masters rounded into the bf16 weights;
- ``masters, compiled``: its step under ``compile=true``: ``lmlab.optim.master_adamw`` compiled,
  reading the bf16 gradients and writing the bf16 weights in one fused pass.

Each contender's gradients are set once (random, the model's dtype); a timed step is the
clipping and ``step()`` as LMModule's hooks call them. The contenders alternate in rounds after a
warm-up that compiles; the table gives median ms per step, the bytes a step must move per weight
(reads + writes, the norm included) and the bandwidth that makes. Prints a Markdown table."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import common
import torch
from gpu import PRESETS, preset_shape

from lmlab.optim import MasterWeightAdamW

# Bytes a step moves per weight: reads + writes of every pass (4 fp32, 2 bf16)
BYTES = {
    # norm (4) + scale (4 + 4) + fused AdamW (grad, weight, 2 moments: 16 read, 12 written)
    "bf16-mixed": 4 + 8 + 28,
    # the same in bf16: norm (2) + scale (2 + 2) + fused AdamW (8 read, 6 written)
    "bf16-true": 2 + 4 + 14,
    # copy into fp32 (2 + 4), norm (4), scale (8), fused AdamW (28), round back (4 + 2)
    "masters, eager": 6 + 4 + 8 + 28 + 6,
    # norm of the bf16 gradients (2); the step reads 2 + 12 and writes 12 + 2
    "masters, compiled": 2 + 28,
}
CONTENDERS = tuple(BYTES)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--family", choices=list(PRESETS), default="decoder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny dims (a smoke run in seconds)")
    p.add_argument(
        "--warmup", type=int, default=3, help="untimed steps each (compilation included)"
    )
    p.add_argument("--rounds", type=int, default=5, help="timed rounds")
    p.add_argument("--steps", type=int, default=4, help="steps per contender per round")
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    return p.parse_args(argv)


def contender(name: str, family: str, dims: dict, vocab: int, device) -> tuple[Callable, int]:
    """(one clipped optimizer step, the number of weights) of contender ``name``."""
    torch.manual_seed(0)
    model = common.lmlab_model(family, vocab_size=vocab, **dims)
    masters = name.startswith("masters")
    bf16 = masters or name == "bf16-true"
    model = model.to(device, torch.bfloat16 if bf16 else torch.float32)
    opt = common.adamw(model, masters=masters, compiled_step=name == "masters, compiled")
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device).manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype) * 1e-3

    def step() -> None:
        if isinstance(opt, MasterWeightAdamW):  # as LMModule's hooks call them
            opt.pull_grads()
            opt.clip_grad_norm_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step, sum(p.numel() for p in params)


def main(argv=None) -> None:
    args = parse_args(argv)
    common.quiet()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; use --device cpu")
    if min(args.rounds, args.steps) < 1 or args.warmup < 0:
        raise SystemExit("--rounds and --steps must be >= 1 and --warmup >= 0")
    vocab, _, _, _, dims = preset_shape(args.family, args.tiny)
    steps, n_weights, warm_s = {}, 0, {}
    for name in args.contenders:
        steps[name], n_weights = contender(name, args.family, dims, vocab, device)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            steps[name]()
        common.sync(device)
        warm_s[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in args.contenders}
    for _ in range(args.rounds):
        for name, step in steps.items():
            common.sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            common.sync(device)
            times[name].append((time.perf_counter() - t0) / args.steps)

    base = args.contenders[0]
    print(
        f"optimizer: {args.family} ({n_weights:,} weights), clip at 1.0 + AdamW, "
        f"{device}; median of {args.rounds} rounds x {args.steps} steps after {args.warmup}"
    )
    print(f"machine: {common.machine()}")
    print()
    rows = []
    for name in args.contenders:
        ms = common.median_ms(times[name])
        gb = BYTES[name] * n_weights / 1e9
        rows.append(
            [
                name,
                f"{ms:.2f}",
                f"{common.median_ms(times[base]) / ms:.2f}x",
                BYTES[name],
                f"{gb / (ms / 1e3):.0f}",
                f"{warm_s[name]:.1f}",
            ]
        )
    headers = ["step", "ms", f"speed vs {base}", "bytes / weight", "GB/s", "warm-up s"]
    print(common.table(headers, rows))


if __name__ == "__main__":
    main()
