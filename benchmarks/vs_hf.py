"""lmlab's three families against Hugging Face transformers models of the same size: training tokens/s.

Per family, one training step (forward, loss, backward, clip at 1.0, AdamW step, zero_grad) of each
contender on the same random-token batch, with the same optimizer (lmlab's decay / no-decay groups,
fused AdamW in fp32) and precision. The HF models use ``attn_implementation="sdpa"`` and no dropout
(lmlab has none). lmlab's step is its LightningModule's loss (``LMModule.nll``: what
``training_step`` optimises) without the Trainer around it (``overhead.py`` measures the Trainer).

* decoder (``DecoderLM``)            vs ``LlamaForCausalLM``: same d_model, layers, heads, SwiGLU
  hidden, vocabulary, tied embeddings, RoPE; identical parameter counts.
* encoder (``EncoderLM``, MLM)       vs ``BertForMaskedLM`` (GELU MLP of 4 d, biases, LayerNorm,
  learned positions: a few % more parameters) or, with ``--encoder-ref modernbert``,
  ``ModernBertForMaskedLM`` (GeGLU, RoPE, global attention in every layer, sparse prediction).
  lmlab's MLM loss runs the output head on the ~15% selected positions only; BERT's runs it everywhere
  (ModernBERT's sparse prediction does the same as lmlab): part of what is compared.
* encoder-decoder (``EncoderDecoderLM``) vs ``T5ForConditionalGeneration`` (T5 v1.1 layout,
  ``gated-silu`` MLP of the same hidden size, relative position bias instead of RoPE).

lmlab's float32 products on a CPU take its oneDNN route (``lmlab/nn/matmul.py``, the ``cpu_matmul``
setting); ``--cpu-matmul onednn blas`` adds a row for PyTorch's own BLAS route, stepped in the same
rounds.

Tokens per second count the input tokens (for the encoder-decoder: encoder input tokens, as the
issue's T5 reference figure does). Steps alternate between contenders in rounds after a warm-up; the
median step time is reported.

    pip install -e .[bench]      # transformers, the optional `bench` extra
    python benchmarks/vs_hf.py   # CPU, about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import time

import common
import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--family",
        nargs="+",
        choices=["decoder", "encoder", "encoder_decoder"],
        default=["decoder", "encoder", "encoder_decoder"],
    )
    p.add_argument("--encoder-ref", choices=["bert", "modernbert"], default="bert")
    p.add_argument("--layers", type=int, default=4, help="layers (per stack for enc-dec)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192, help="a multiple of 64 (lmlab's padding)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument(
        "--target-len", type=int, default=64, help="decoder length (T5-base: 114 for 512)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both (default fp32)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per contender")
    p.add_argument(
        "--cpu-matmul",
        nargs="+",
        choices=["onednn", "blas"],
        default=["onednn"],
        help="lmlab's float32 CPU matmul route(s) (lmlab/nn/matmul.py); both: one row each",
    )
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--steps", type=int, default=1, help="timed steps per contender per round")
    return p.parse_args(argv)


def hf_model(family: str, args, mlp_hidden: int):
    try:
        import transformers
    except ImportError:
        raise SystemExit(
            "vs_hf.py needs Hugging Face transformers: pip install -e .[bench]"
        ) from None
    d, L, H, V = args.d_model, args.layers, args.heads, args.vocab
    common_kw = dict(vocab_size=V, tie_word_embeddings=True, pad_token_id=0)
    if family == "decoder":
        cfg = transformers.LlamaConfig(
            hidden_size=d,
            intermediate_size=mlp_hidden,
            num_hidden_layers=L,
            num_attention_heads=H,
            num_key_value_heads=H,
            hidden_act="silu",
            max_position_embeddings=args.seq_len,
            rms_norm_eps=1e-6,
            attention_bias=False,
            mlp_bias=False,
            attention_dropout=0.0,
            **common_kw,
        )
        cls = transformers.LlamaForCausalLM
    elif family == "encoder" and args.encoder_ref == "bert":
        cfg = transformers.BertConfig(
            hidden_size=d,
            num_hidden_layers=L,
            num_attention_heads=H,
            intermediate_size=4 * d,
            max_position_embeddings=args.seq_len,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            **common_kw,
        )
        cls = transformers.BertForMaskedLM
    elif family == "encoder":
        cfg = transformers.ModernBertConfig(
            hidden_size=d,
            num_hidden_layers=L,
            num_attention_heads=H,
            intermediate_size=mlp_hidden,
            max_position_embeddings=args.seq_len,
            global_attn_every_n_layers=1,  # every layer global, as lmlab's
            sparse_prediction=True,
            attention_dropout=0.0,
            mlp_dropout=0.0,
            embedding_dropout=0.0,
            **common_kw,
        )
        cls = transformers.ModernBertForMaskedLM
    else:
        cfg = transformers.T5Config(
            d_model=d,
            d_kv=d // H,
            d_ff=mlp_hidden,
            num_layers=L,
            num_decoder_layers=L,
            num_heads=H,
            feed_forward_proj="gated-silu",
            dropout_rate=0.0,
            decoder_start_token_id=common.SPECIAL_IDS["bos"],
            **common_kw,
        )
        cls = transformers.T5ForConditionalGeneration
    return cls._from_config(cfg, attn_implementation="sdpa"), cls.__name__


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def hf_loss(family: str):
    if family == "decoder":
        # HF shifts labels itself: input_ids as labels is the same next-token task (T - 1 targets)
        return lambda m, b: m(input_ids=b["input_ids"], labels=b["input_ids"]).loss
    if family == "encoder":
        return lambda m, b: (
            m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        )
    return lambda m, b: (
        m(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            decoder_input_ids=b["decoder_input_ids"],
            labels=b["labels"],
        ).loss
    )


def with_cpu_matmul(route: str, step):
    """``step`` with lmlab's float32 CPU matmul route set to ``route`` first."""
    from lmlab.nn.matmul import set_cpu_matmul

    def stepped(batch):
        set_cpu_matmul(route)
        step(batch)

    return stepped


def run_family(family: str, args, device: torch.device) -> list:
    kind = {"decoder": "causal", "encoder": "masked", "encoder_decoder": "seq2seq"}[family]
    dims = dict(
        n_layers=args.layers, d_model=args.d_model, n_heads=args.heads, max_seq_len=args.seq_len
    )
    if family == "encoder_decoder":
        dims |= dict(n_decoder_layers=args.layers, max_target_len=args.target_len)
    torch.manual_seed(0)
    ours = common.lmlab_model(family, vocab_size=args.vocab, **dims)
    theirs, hf_name = hf_model(family, args, ours.config.mlp_hidden)
    gen = torch.Generator().manual_seed(0)
    batch = common.random_batch(
        kind, args.batch, args.seq_len, args.vocab, target_len=args.target_len, generator=gen
    )
    batch = common.to_device(batch, device)
    lmlab_step = common.Stepper(ours, common.lmlab_loss, device, args.bf16)
    routes = args.cpu_matmul if device.type == "cpu" and not args.bf16 else ["onednn"]
    steppers = {}
    for route in routes:  # the same model and optimizer, stepped through each route
        label = f" ({route})" if len(routes) > 1 else ""
        steppers[f"lmlab {type(ours).__name__}{label}"] = with_cpu_matmul(route, lmlab_step)
    steppers[f"HF {hf_name}"] = common.Stepper(theirs, hf_loss(family), device, args.bf16)
    for step in steppers.values():
        for _ in range(args.warmup):
            step(batch)
    times = {name: [] for name in steppers}
    names = list(steppers)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            for _ in range(args.steps):
                common.sync(device)
                t = time.perf_counter()
                steppers[name](batch)
                common.sync(device)
                times[name].append(time.perf_counter() - t)
    tokens = args.batch * args.seq_len
    ms = {name: common.median_ms(t) for name, t in times.items()}
    base = ms[names[-1]]
    rows = []
    for name in names:
        model = theirs if name.startswith("HF") else ours
        rows.append(
            [
                family,
                name,
                f"{n_params(model) / 1e6:.2f}M",
                f"{ms[name]:.1f}",
                f"{tokens / ms[name] * 1e3:,.0f}",
                f"{base / ms[name]:.2f}x",
            ]
        )
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    print(
        f"vs_hf: {args.layers} layers x {args.d_model}, {args.heads} heads, vocab {args.vocab}, "
        f"batch {args.batch} x {args.seq_len} (enc-dec targets {args.target_len}), "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, {device}"
    )
    print(f"machine: {common.machine()}")
    t0 = time.perf_counter()
    rows = []
    for family in args.family:
        rows += run_family(family, args, device)
        print(f"  {family} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    print()
    print(
        common.table(
            ["family", "model", "parameters", "median step ms", "tokens/s", "lmlab / HF speed"],
            rows,
        )
    )
    print(
        f"\nTarget: lmlab >= 1.1x HF tokens/s. {args.rounds} alternating rounds x {args.steps} "
        f"steps after {args.warmup} warm-up steps per contender; {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
