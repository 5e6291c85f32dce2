"""lmlab's data pipeline against what training consumes: batches per second of the real DataModules.

Builds the run's data exactly as ``python -m lmlab`` does (``lmlab.train.prepare_data`` on a config
composed from ``conf/``: the bundled Shakespeare corpus, the trained BPE tokenizer and the token
stores, cached under ``LMLAB_CACHE``), then iterates the training ``DataLoader`` that Lightning would
get (``datamodule.train_dataloader()``: random windows, the objective's ``make_batch`` as collate
function, ``num_workers`` as configured, pinned host memory where a GPU is present, as training on
it builds them) for a fixed time, at the GPU presets' batch shapes:

* clm  16 x 1024 (conf/experiment/gpt2_124m.yaml): demand of the decoder target, 520K tokens/s
* mlm  32 x 512  (conf/experiment/bert_base.yaml): demand of the encoder target, 450K tokens/s
* span 32 x 512  (conf/experiment/t5_base.yaml):   demand of the encoder-decoder target, 300K tokens/s

The demand is the target tokens/s on one H100 divided by the batch's tokens (16 x 1024 at 520K
tokens/s is 31.7 batches/s). Target: the loader delivers >= 20x that demand.

    python benchmarks/data.py                      # all three objectives, num_workers as configured (0)
    python benchmarks/data.py --num-workers 4      # as the GPU presets configure it
"""

from __future__ import annotations

import argparse
import itertools
import time

import common
import torch

# objective: (batch, seq_len, the family's H100 target in tokens/s from issue 4)
SHAPES = {
    "clm": (16, 1024, 520e3),
    "mlm": (32, 512, 450e3),
    "span": (32, 512, 300e3),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--objective", nargs="+", choices=SHAPES, default=list(SHAPES))
    p.add_argument(
        "--num-workers", type=int, help="DataLoader workers (default: data.num_workers, 0)"
    )
    p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per objective")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    p.add_argument(
        "overrides", nargs="*", help="extra Hydra overrides, e.g. tokenizer=byte data=files ..."
    )
    return p.parse_args(argv)


def compose(objective: str, batch: int, seq_len: int, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lmlab.paths import CONF_DIR

    out = common.scratch_folder("lmlab-data-bench-")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(
            "train",
            overrides=[
                f"objective={objective}",
                f"seq_len={seq_len}",
                f"data.batch_size={batch}",
                f"paths.output_dir={out}",
                *overrides,
            ],
        )


def measure(objective: str, args) -> list:
    from lmlab.train import build_datamodule, prepare_data

    batch, seq_len, target = SHAPES[objective]
    cfg = compose(objective, batch, seq_len, args.overrides)
    workers = cfg.data.num_workers if args.num_workers is None else args.num_workers
    tokenizer, train, val = prepare_data(cfg)
    dm = build_datamodule(cfg, tokenizer, train, val, num_workers=workers)
    dm.pin_memory = torch.cuda.is_available()  # as training on a GPU builds them
    loader = dm.train_dataloader()

    def batches():  # epochs one after another, as the fit loop does
        for epoch in itertools.count():
            loader.sampler.set_epoch(epoch)
            yield from loader

    it = batches()
    for _ in range(args.warmup):
        next(it)
    n, tokens, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        b = next(it)
        n += 1
        # a full batch's input tokens (an epoch's last batch can be short: not the one to count)
        tokens = max(tokens, b["input_ids"].numel())
    elapsed = time.perf_counter() - t0
    per_s = n / elapsed
    demand = target / tokens
    return [
        objective,
        f"{batch} x {seq_len}",
        workers,
        f"{per_s:,.1f}",
        f"{per_s * tokens / 1e6:,.2f}M",
        f"{demand:.1f}",
        f"{per_s / demand:,.1f}x",
        "yes" if per_s / demand >= 20 else "NO",
    ]


def main(argv=None) -> None:
    args = parse_args(argv)
    common.quiet()
    print(f"data: lmlab training DataLoaders, {args.seconds:.0f} s per objective")
    print(f"machine: {common.machine()}")
    t0 = time.perf_counter()
    rows = [measure(o, args) for o in args.objective]
    print()
    print(
        common.table(
            [
                "objective",
                "batch",
                "workers",
                "batches/s",
                "tokens/s",
                "H100 demand (batches/s)",
                "supply / demand",
                ">= 20x",
            ],
            rows,
        )
    )
    print(
        "\nDemand: the family's H100 target tokens/s (issue 4: decoder 520K, encoder 450K, "
        f"encoder-decoder 300K) over the batch's input tokens; {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
