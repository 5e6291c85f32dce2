"""Issue 4's two GPU reference implementations measured on this card: training tokens/s and MFU.

Issue 4's GPU targets are anchored on figures measured on an H100 (GPT-2 124M, batch 16 x 1024,
bf16 autocast, fused AdamW, compiled): nanoGPT 470K tokens/s (40.6% MFU of 989 TFLOP/s) and
Hugging Face's GPT-2 385K. This script measures both on the card it runs on, so that lmlab's
figures (``gpu.py``) can be compared on the same card:

* ``nanogpt``: GPT-2 written here in nanoGPT's style: token and learned position embeddings,
  pre-LayerNorm blocks (LayerNorm with bias), a fused qkv Linear,
  ``F.scaled_dot_product_attention(is_causal=True)``, a 4x GELU MLP (tanh's approximation, as
  GPT-2 and Hugging Face's model compute it; nanoGPT's repository uses the exact GELU, erf's:
  fused into the same elementwise kernel, the same memory traffic), a final LayerNorm and
  the output head tied to the token embedding; biases on the Linear layers, GPT-2's init (std 0.02,
  residual projections 0.02 / sqrt(2 n_layer)), no dropout; the loss computed in its forward.
* ``hf-gpt2``: Hugging Face's ``GPT2LMHeadModel`` of the same size, ``attn_implementation="sdpa"``,
  no dropout (needs transformers: ``pip install -e .[bench]``; skipped without it).

Each is trained in a plain PyTorch loop as nanoGPT's ``train.py`` trains: random tokens (vocabulary
50304, GPT-2's 50257 padded to a multiple of 64), the model ``torch.compile``d whole with its
cross-entropy loss, bf16 autocast, TF32 matmuls, clipping at 1.0, ``torch.optim.AdamW`` (fused on
CUDA; lr 6e-4, betas (0.9, 0.95), weight decay 0.1 on the >= 2-D parameters only); ``--warmup``
untimed steps (compilation happens there), then ``--steps`` timed ones between two device
synchronisations. Mean step ms is that window over the steps, and tokens/s its batch x sequence over
it; MFU is lmlab's (``lmlab.flops``: PaLM's ``6 N + 12 L d T`` per token, N the matrix-product
weights with the tied head once, as ``DecoderLM.step_flops`` counts them) over the card's bf16 peak.
``--trace-steps N`` profiles N more steps after the timed ones (``torch.profiler``, out of the timed
figures), writes ``<trace-dir>/<contender>.json.gz`` and prints ``timeline.py``'s summary (device
busy, kernel time by kind, idle gaps), to set nanoGPT's step against lmlab's (``gpu.py``'s traces).

    python benchmarks/reference.py                       # on a GPU: both, 16 x 1024 (~1.5 min)
    python benchmarks/reference.py --tiny --device cpu   # smoke run on a CPU (tiny sizes, no compile)
    python benchmarks/reference.py --contender nanogpt --trace-steps 3 --trace-dir traces
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import textwrap
import time
import traceback
from pathlib import Path

import common
import timeline
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lmlab import flops
from lmlab.models.base import param_groups
from lmlab.parallel import use_tf32

CONTENDERS = ("nanogpt", "hf-gpt2")
# GPT-2 124M (vocabulary padded to a multiple of 64, as nanoGPT pads it) and the tiny smoke size
GPT2 = dict(n_layer=12, n_embd=768, n_head=12, vocab=50304, batch=16, seq_len=1024)
TINY = dict(n_layer=2, n_embd=64, n_head=2, vocab=512, batch=2, seq_len=64)
# issue 4's H100 figures: (tokens/s, as the table cites them)
H100_REF = {"nanogpt": (470e3, "470K (40.6%)"), "hf-gpt2": (385e3, "385K")}
LMLAB_DECODER_TARGET = 520e3  # issue 4's H100 target for lmlab's decoder (GPT-2 124M)
OPTIM = dict(lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)  # nanoGPT's GPT-2 settings
HEADERS = [
    "contender",
    "parameters",
    "batch",
    "warm-up s",
    "mean step ms",
    "median step ms",
    "tokens/s",
    "MFU",
    "H100 ref (issue 4)",
    "ratio to H100 ref",
]


# -- contender 1: GPT-2 in nanoGPT's style ------------------------------------------------------
# Module names follow Hugging Face's GPT-2 (without its ``transformer.`` prefix), so the tests can
# load one's weights into the other.
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)  # q, k, v in one product
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            for t in self.c_attn(x).split(C, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's GELU


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)  # with bias, as GPT-2's
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """GPT-2 as nanoGPT writes it. ``forward(idx)``: logits; ``forward(idx, targets)``: the mean
    cross-entropy of predicting ``targets`` (token t + 1 of the text) from ``idx`` up to t."""

    def __init__(self, vocab: int, seq_len: int, n_layer: int, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_layer, self.n_embd, self.seq_len = n_layer, n_embd, seq_len
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(seq_len, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one Parameter
        self.apply(self._init)
        residual_std = 0.02 / math.sqrt(2 * n_layer)  # two residual projections per block
        for block in self.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(proj.weight, 0.0, residual_std)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits if targets is None else lm_loss(logits, targets)

    def matmul_weights(self) -> int:
        """PaLM's N as lmlab counts it (``DecoderLM.step_flops``): the blocks' matrices and the
        output head once; no embedding lookups, biases or norm gains."""
        return flops.matmul_weights(self.h) + self.lm_head.weight.numel()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Both contenders' loss: the mean cross-entropy over every position, in float32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# -- contender 2: Hugging Face's GPT2LMHeadModel ------------------------------------------------
def hf_model(vocab: int, seq_len: int, n_layer: int, n_embd: int, n_head: int) -> nn.Module:
    """``GPT2LMHeadModel`` of these dims, sdpa attention where this transformers takes the
    argument, no dropout. ImportError without transformers."""
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=seq_len,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        bos_token_id=None,  # GPT-2's 50256 is out of a tiny vocabulary; generation only anyway
        eos_token_id=None,
    )
    cls = transformers.GPT2LMHeadModel
    try:
        return cls._from_config(cfg, attn_implementation="sdpa")
    except (TypeError, ValueError, ImportError):  # an older transformers: its default attention
        return cls(cfg)


class HFGPT2(nn.Module):
    """Hugging Face's GPT-2 with the same loss as :class:`NanoGPT`: F.cross_entropy over its logits
    against the next tokens, computed in this forward so that compile takes the whole model and loss
    (as nanoGPT's forward has it). Not its ``labels=`` loss: that shifts inside, dropping the last
    position, where the same targets as nanoGPT's are wanted."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.hf(input_ids=idx, use_cache=False).logits
        return logits if targets is None else lm_loss(logits, targets)

    def matmul_weights(self) -> int:
        """As :meth:`NanoGPT.matmul_weights`; GPT-2's blocks multiply by ``Conv1D`` weights."""
        blocks = sum(
            m.weight.numel()
            for m in self.hf.transformer.h.modules()
            if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
        )
        return blocks + self.hf.lm_head.weight.numel()


# -- the training step ---------------------------------------------------------------------------
def n_params(model: nn.Module) -> int:
    """Every parameter once (the tied head is the embedding)."""
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared one once


def optimizer(model: nn.Module, device: torch.device) -> torch.optim.AdamW:
    """nanoGPT's AdamW: weight decay on the >= 2-D parameters (matrices and embeddings) only, as
    lmlab groups them."""
    return torch.optim.AdamW(
        param_groups(model, OPTIM["weight_decay"]),
        lr=OPTIM["lr"],
        betas=OPTIM["betas"],
        fused=device.type == "cuda",
    )


def build(name: str, dims: dict) -> nn.Module:
    kw = dict(vocab=dims["vocab"], seq_len=dims["seq_len"], n_layer=dims["n_layer"])
    kw |= dict(n_embd=dims["n_embd"], n_head=dims["n_head"])
    return NanoGPT(**kw) if name == "nanogpt" else HFGPT2(hf_model(**kw))


def profile_steps(step, batches: list, device: torch.device, path: Path) -> str | None:
    """Run ``step`` over ``batches`` under ``torch.profiler`` (between two device synchronisations)
    and write the gzipped Chrome trace to ``path``. None, or what failed: a profiler that fails is
    reported and the contender's figures (timed before this) stand."""
    profiler = None
    try:
        common.sync(device)
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        profiler = profile(activities=activities)
        profiler.start()
        try:
            for batch in batches:
                step(batch)
        except Exception as e:
            raise RuntimeError(f"a profiled step: {type(e).__name__}: {e}") from e
        common.sync(device)
        running, profiler = profiler, None
        running.stop()
        running.export_chrome_trace(str(path))
    except Exception as e:  # a diagnostic must not cost the measurement
        return f"{type(e).__name__}: {e}"
    finally:  # started, then failed: stopped here, not during the next contender
        if profiler is not None:
            with contextlib.suppress(Exception):
                profiler.stop()
    return None


def run_contender(name: str, args, dims: dict, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build(name, dims).to(device).train()
    opt = optimizer(model, device)
    compiled = torch.compile(model) if args.compile else model
    params = list(model.parameters())
    bf16 = device.type == "cuda"

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = compiled(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    B, T, V = dims["batch"], dims["seq_len"], dims["vocab"]
    gen = torch.Generator().manual_seed(0)
    texts = [torch.randint(0, V, (B, T + 1), generator=gen).to(device) for _ in range(4)]
    # inputs, and the next token of each (two contiguous tensors, as nanoGPT's get_batch makes)
    batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in texts]
    stream = [batches[i % len(batches)] for i in range(args.warmup + args.steps)]
    t0 = time.perf_counter()
    times, total = common.timed_loop(step, stream, args.warmup, device)
    wall = time.perf_counter() - t0
    trace = None
    if args.trace_steps:  # after the timed window, out of its figures
        path = args.trace_dir / f"{name}.json.gz"
        start = args.warmup + args.steps
        more = [batches[(start + i) % len(batches)] for i in range(args.trace_steps)]
        trace = dict(path=path, error=profile_steps(step, more, device, path))
    step_s = total / args.steps
    tokens_per_s = B * T / step_s
    per_token = flops.flops_per_token(model.matmul_weights(), dims["n_layer"], dims["n_embd"], T)
    peak = args.peak_flops or flops.peak_flops(device)
    attention = getattr(getattr(model, "hf", None), "config", None)
    attention = getattr(attention, "_attn_implementation", None)
    return dict(
        name=name,
        params=n_params(model),
        warmup_s=wall - total,  # the warm-up steps (compilation) and their synchronisation
        step_ms=1e3 * step_s,
        median_ms=common.median_ms(times),
        tokens_per_s=tokens_per_s,
        mfu=flops.mfu(tokens_per_s, per_token, peak) if peak else None,
        attention=attention,
        trace=trace,
    )


# -- the script ----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--contender", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, help="sequences per step (default 16; --tiny: 2)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 1024; --tiny: 64)")
    p.add_argument("--steps", type=int, help="timed steps per contender (default 50; --tiny: 5)")
    p.add_argument(
        "--warmup",
        type=int,
        help="untimed steps first, compilation included (default 10; --tiny: 2)",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="2 layers x 64, 2 heads, vocab 512, batch 2 x 64, no compile (CPU smoke run)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile each model (default: on, off with --tiny)",
    )
    p.add_argument("--peak-flops", type=float, help="device peak FLOP/s (default: lmlab.flops)")
    p.add_argument(
        "--trace-steps",
        type=int,
        default=0,
        help="profile this many steps after the timed ones (torch.profiler): each contender\n"
        "writes <contender>.json.gz and prints timeline.py's summary (device busy, kernel time\n"
        "by kind, idle gaps by what the host launched next)",
    )
    p.add_argument(
        "--trace-dir", type=Path, help="where the traces go (default: a new temporary folder, kept)"
    )
    args = p.parse_args(argv)
    args.contender = list(dict.fromkeys(args.contender))
    if args.steps is None:
        args.steps = 5 if args.tiny else 50
    if args.warmup is None:
        args.warmup = 2 if args.tiny else 10
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps: at least 1 step each")
    if args.trace_steps < 0:
        raise SystemExit(f"--trace-steps {args.trace_steps}: steps to profile, >= 0")
    if args.compile is None:
        args.compile = not args.tiny
    return args


def row(r: dict, shape: str, tiny: bool) -> list:
    ref, cited = H100_REF[r["name"]]
    if "failed" in r:
        return [r["name"], "failed", shape, *["failed"] * 5, cited, "-"]
    return [
        r["name"],
        f"{r['params'] / 1e6:.2f}M",
        shape,
        f"{r['warmup_s']:.1f}",
        f"{r['step_ms']:.1f}",
        f"{r['median_ms']:.1f}",
        f"{r['tokens_per_s']:,.0f}",
        "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
        cited,
        "-" if tiny else f"{r['tokens_per_s'] / ref:.2f}",
    ]


def main(argv=None) -> None:
    args = parse_args(argv)
    args.trace_dir = common.trace_folder(args.trace_dir, args.trace_steps, "lmlab-reference-")
    common.quiet()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; for a smoke run use --tiny --device cpu")
    if device.type == "cuda":
        use_tf32(True)  # as nanoGPT's train.py: fp32 matmuls (autocast's leftovers) on TF32
    dims = dict(TINY if args.tiny else GPT2)
    dims["batch"] = args.batch or dims["batch"]
    dims["seq_len"] = args.seq_len or dims["seq_len"]
    shape = f"{dims['batch']} x {dims['seq_len']}"
    print(
        f"reference: GPT-2 {dims['n_layer']} x {dims['n_embd']}, {dims['n_head']} heads, "
        f"vocab {dims['vocab']}, batch {shape}, "
        f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, compile={args.compile}, "
        f"{args.warmup} warm-up + {args.steps} timed steps"
        + (f" + {args.trace_steps} profiled" if args.trace_steps else "")
        + f", {device}"
        + (" (tiny sizes)" if args.tiny else "")
    )
    print(f"machine: {common.machine()}")
    t_start = time.perf_counter()
    results = []
    for name in args.contender:
        if name == "hf-gpt2":
            try:
                import transformers  # noqa: F401
            except ImportError:
                print("  hf-gpt2: skipped (needs transformers: pip install -e .[bench])")
                continue
        r = None
        try:
            r = run_contender(name, args, dims, device)
        except Exception as e:  # one failing contender must not cost the other's figures
            said = "".join(traceback.format_exception_only(e)).strip()
            print(
                f"  {name}: FAILED: {said}\n"
                + textwrap.indent("".join(traceback.format_tb(e.__traceback__)[-3:]), "    "),
                flush=True,
            )
            results.append(dict(name=name, failed=said))
        # out of the except block (its traceback holds the run's frames): free model, optimizer
        # and compiled graphs before the next contender
        gc.collect()
        if args.compile:
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if r is None:
            continue
        results.append(r)
        how = f", {r['attention']} attention" if r["attention"] else ""
        print(
            f"  {name}: {r['tokens_per_s']:,.0f} tokens/s ({r['warmup_s']:.0f} s warm-up{how}; "
            f"{time.perf_counter() - t_start:.0f} s so far)",
            flush=True,
        )
        trace = r["trace"]
        if trace is not None:
            timeline.say(trace["path"], trace["error"], args.trace_steps)
    print()
    print(common.table(HEADERS, [row(r, shape, args.tiny) for r in results]))
    nano = next((r for r in results if r["name"] == "nanogpt" and "failed" not in r), None)
    if nano is not None and not args.tiny:
        scaled = LMLAB_DECODER_TARGET * nano["tokens_per_s"] / H100_REF["nanogpt"][0]
        print(f"\nlmlab's decoder target scaled to this card by nanoGPT: {scaled:,.0f} tokens/s")
    print(f"Elapsed {time.perf_counter() - t_start:.0f} s.")
    failed = sum("failed" in r for r in results)
    if failed:
        raise SystemExit(f"{failed} of {len(results)} contenders failed (above)")


if __name__ == "__main__":
    main()
