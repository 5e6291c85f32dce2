"""What lmlab's Lightning path costs per training step over a hand-written PyTorch loop.

Both contenders train the same backbone (``lmlab.nn.decoder.Decoder``, built by ``DecoderLM`` from the
same seed) on the same random-token batches from the same kind of ``DataLoader``, with the same
AdamW (lmlab's decay / no-decay groups, betas, eps, fused exactly when lmlab fuses), the same
warmup + cosine schedule, gradient clipping at 1.0 and the same precision:

* lmlab: a ``lightning.Trainer`` fitting ``DecoderLM``, built like ``lmlab.train.build_run`` from
  ``conf/`` (trainer=cpu|gpu, callbacks=default, logger=csv) with validation and the callbacks that act
  only at validation / checkpoint time turned off; see ``common.SPEED_CALLBACKS``.
* plain: forward, cross entropy, backward, clip, step, schedule, zero_grad (nanoGPT's loop). The
  loss is computed as ``LMModule.nll`` computes it on that device: the head and the cross-entropy
  fused in chunks on a CPU (``lmlab.nn.loss``, ``CPU_LOSS_CHUNK``), the plain head elsewhere; this
  script compares the loops around the same arithmetic (``vs_hf.py`` compares the arithmetic).

Rounds alternate which contender runs first; each round warms up and then times every step (end of
one step to the end of the next). The table gives the median step time over all timed steps and the
median over rounds of each round's mean (its window bracketed by device synchronisations); the
comparison uses the medians on a CPU and the round means on a GPU (``step_basis``).

    python benchmarks/overhead.py                    # CPU: the default 4 x 128 decoder, 16 x 256 tokens
    python benchmarks/overhead.py --preset gpt2      # GPU: GPT-2 124M, 16 x 1024, bf16-mixed, compile
"""

from __future__ import annotations

import argparse
import time

import common
import torch
import torch.nn.functional as F

from lmlab.models.base import CPU_LOSS_CHUNK, lr_lambda
from lmlab.nn.loss import linear_cross_entropy

PRESETS = {
    # conf/model/decoder.yaml with conf/train.yaml's seq_len and conf/data/shakespeare.yaml's batch;
    # vocabulary: conf/tokenizer/bpe.yaml
    "tiny": dict(
        n_layers=4, d_model=128, n_heads=2, vocab=2048, batch=16, seq_len=256, device="cpu"
    ),
    # conf/experiment/gpt2_124m.yaml
    "gpt2": dict(
        n_layers=12, d_model=768, n_heads=12, vocab=50257, batch=16, seq_len=1024, device="cuda"
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="tiny")
    p.add_argument("--device", help="cpu | cuda (default: the preset's)")
    p.add_argument(
        "--precision",
        choices=["32-true", "bf16-mixed"],
        help="the same for both contenders (default: 32-true on CPU, bf16-mixed on GPU)",
    )
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="default: on GPU")
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds per contender")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each round")
    p.add_argument("--steps", type=int, default=15, help="timed steps per round")
    p.add_argument("--layers", type=int, help="override the preset's n_layers")
    p.add_argument("--d-model", type=int, help="override the preset's d_model")
    p.add_argument("--batch", type=int, help="override the preset's batch size")
    p.add_argument("--seq-len", type=int, help="override the preset's sequence length")
    p.add_argument(
        "--no-hydra",
        action="store_true",
        help="build the Trainer by hand even when Hydra is installed",
    )
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    common.quiet()
    pre = dict(PRESETS[args.preset])
    for key, value in (
        ("n_layers", args.layers),
        ("d_model", args.d_model),
        ("batch", args.batch),
        ("seq_len", args.seq_len),
    ):
        if value is not None:
            pre[key] = value
    device = torch.device(args.device or pre["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--preset gpt2 needs a CUDA GPU; on CPU use the default preset")
    precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    compile_ = device.type == "cuda" if args.compile is None else args.compile
    B, T = pre["batch"], pre["seq_len"]
    per_round = args.warmup + args.steps
    lit_model, plain_step, batches = contenders(pre, device, precision, compile_, per_round)

    out = common.scratch_folder("lmlab-overhead-")
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    times: dict[str, list[float]] = {"lmlab": [], "plain": []}
    totals: dict[str, list[float]] = {"lmlab": [], "plain": []}
    how = ""
    print(
        f"overhead: decoder {pre['n_layers']} x {pre['d_model']}, {pre['n_heads']} heads, vocab "
        f"{pre['vocab']}, batch {B} x {T}, {precision}, compile={compile_}, {device}; "
        f"{lit_model.num_params(False) / 1e6:.2f}M parameters"
    )
    print(f"machine: {common.machine()}")
    t0 = time.perf_counter()
    for r in range(args.rounds):
        order = ["lmlab", "plain"] if r % 2 == 0 else ["plain", "lmlab"]
        for who in order:
            if who == "lmlab":
                timer = common.StepTimer(args.warmup)
                trainer, how = common.lmlab_trainer(
                    accelerator=accelerator,
                    precision=precision,
                    max_steps=per_round,
                    output_dir=out / f"round{r}",
                    callbacks=[timer],
                    use_hydra=not args.no_hydra,
                )
                trainer.fit(lit_model, train_dataloaders=common.loader(batches, per_round))
                step_times, total = timer.times, timer.total
            else:
                plain_step.reset()
                step_times, total = common.timed_loop(
                    plain_step, common.loader(batches, per_round), args.warmup, device
                )
            times[who] += step_times
            totals[who].append(total / len(step_times))
    elapsed = time.perf_counter() - t0

    lm, pl = common.median_ms(times["lmlab"]), common.median_ms(times["plain"])
    lm_mean, pl_mean = common.median_ms(totals["lmlab"]), common.median_ms(totals["plain"])
    basis, pl_t, lm_t = step_basis(device, (pl, lm), (pl_mean, lm_mean))
    ratio = lm_t / pl_t
    rows = [
        [
            "plain PyTorch loop",
            f"{pl:.2f}",
            f"{pl_mean:.2f}",
            f"{B * T / pl_t * 1e3:,.0f}",
            "1.000",
        ],
        [
            "lmlab (Lightning)",
            f"{lm:.2f}",
            f"{lm_mean:.2f}",
            f"{B * T / lm_t * 1e3:,.0f}",
            f"{ratio:.3f}",
        ],
    ]
    print()
    print(
        common.table(
            [
                "contender",
                "median step ms",
                "round-mean step ms",
                "tokens/s",
                "step time vs plain",
            ],
            rows,
        )
    )
    overhead = ratio - 1
    verdict = "meets" if overhead <= 0.03 else "misses"
    print(
        f"\nlmlab overhead: {100 * overhead:+.1f}% per step, by the "
        f"{basis} ({verdict} the target of at most +3%); "
        f"{args.rounds} alternating rounds x {args.steps} timed steps after {args.warmup} warm-up "
        f"steps each; {elapsed:.0f} s"
    )
    print(f"lmlab Trainer: {how}; callbacks on: {common.SPEED_CALLBACKS}")


def contenders(pre: dict, device: torch.device, precision: str, compile_: bool, steps: int):
    """lmlab's ``DecoderLM``, the plain loop's step over a backbone with the same initial weights
    (scheduled over ``steps`` steps, as a round's ``trainer.fit``), and the batches both train on.
    From the same weights, the two make the same updates (tests/test_benchmarks.py)."""
    B, T = pre["batch"], pre["seq_len"]
    dims = dict(
        n_layers=pre["n_layers"], d_model=pre["d_model"], n_heads=pre["n_heads"], max_seq_len=T
    )
    gen = torch.Generator().manual_seed(0)
    batches = [common.random_batch("causal", B, T, pre["vocab"], generator=gen) for _ in range(4)]
    torch.manual_seed(0)
    lit_model = common.lmlab_model("decoder", vocab_size=pre["vocab"], compile=compile_, **dims)
    torch.manual_seed(0)
    plain_model = common.lmlab_model("decoder", vocab_size=pre["vocab"], **dims).backbone.to(device)
    plain_step = make_plain_step(
        plain_model, lit_model.optim_cfg, device, precision, steps, compile_
    )
    return lit_model, plain_step, batches


def step_basis(
    device: torch.device, medians: tuple[float, float], round_means: tuple[float, float]
) -> tuple[str, float, float]:
    """Which step times the comparison uses, and the (plain, lmlab) pair: the medians on a CPU,
    which runs each step before the host goes on (a step's time is the step; the median keeps a
    noisy machine's outliers out); the round means on a GPU, whose host queues kernels and runs
    ahead of the device, waiting only where a value is read (lmlab's metric-reading steps), so a
    step's host time is not the device's, and only a window bracketed by synchronisations (a round)
    measures the work."""
    if device.type == "cuda":
        return "round means", *round_means
    return "medians", *medians


class make_plain_step:
    """nanoGPT's training step with lmlab's optimizer settings; ``reset()`` restarts the schedule
    and the optimizer state as a new ``trainer.fit`` does for lmlab."""

    def __init__(
        self, model, optim: dict, device, precision: str, total_steps: int, compile_: bool
    ) -> None:
        self.model, self.o, self.device, self.total = model, optim, device, total_steps
        # As LMModule.configure_model: forward and loss compiled together
        self.loss = torch.compile(self._loss) if compile_ else self._loss
        self.autocast = precision == "bf16-mixed"
        # As LMModule.configure_optimizers: the fused AdamW on CPU and CUDA (bf16 included)
        self.fused = device.type in ("cuda", "cpu")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.reset()

    def _loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.flatten()
        hidden = self.model(input_ids, head=False).flatten(0, 1)  # (B*T, C)
        if hidden.device.type == "cpu":  # as LMModule.nll with loss_chunk_size=None
            weight = self.model.lm_head.weight
            nll = linear_cross_entropy(hidden, weight, labels, chunk_size=CPU_LOSS_CHUNK)[0]
            return nll / labels.numel()
        return F.cross_entropy(self.model.lm_head(hidden).float(), labels)

    def reset(self) -> None:
        o = self.o
        self.opt = common.adamw(self.model, o, fused=self.fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt,
            lambda s: lr_lambda(s, o["warmup_steps"], self.total, o["min_lr_ratio"]),
        )

    def __call__(self, batch: dict) -> None:
        batch = common.to_device(batch, self.device)
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.loss(batch["input_ids"], batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
