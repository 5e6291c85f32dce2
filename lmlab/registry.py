"""Names users type (``model=…``, ``objective=…``) and the classes behind them.

The compatibility table is derived, not written down: an objective fits a model when the batch kind its
DataModule yields is one the model's LightningModule accepts. ``python -m lmlab.registry`` prints it.
"""

from __future__ import annotations

from hydra.utils import get_class

from lmlab.errors import ConfigError

MODELS = {
    "decoder": "lmlab.models.decoder.DecoderLM",
    "encoder": "lmlab.models.encoder.EncoderLM",
    "encoder_decoder": "lmlab.models.encoder_decoder.EncoderDecoderLM",
}
OBJECTIVES = {
    "clm": "lmlab.data.clm.CausalLMDataModule",
    "prefix_lm": "lmlab.data.prefix_lm.PrefixLMDataModule",
    "mlm": "lmlab.data.mlm.MaskedLMDataModule",
    "sop": "lmlab.data.sentences.SentenceOrderDataModule",
    "nsp": "lmlab.data.sentences.NextSentenceDataModule",
    "sentence_distance": "lmlab.data.sentences.SentenceDistanceDataModule",
    "deshuffle": "lmlab.data.sentences.DeshuffleDataModule",
    "discourse": "lmlab.data.discourse.DiscourseDataModule",
    "capital_word": "lmlab.data.capital.CapitalWordDataModule",
    "tlm": "lmlab.data.tlm.TranslationLMDataModule",
    "ir_relevance": "lmlab.data.relevance.RelevanceDataModule",
    "mcp": "lmlab.data.columns.MaskedColumnDataModule",
    "span": "lmlab.data.span.SpanCorruptionDataModule",
    "denoise": "lmlab.data.denoise.DenoisingDataModule",
}


def valid_objectives(model: str) -> list[str]:
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    accepts = get_class(MODELS[model]).accepts
    return [o for o, path in OBJECTIVES.items() if get_class(path).batch_kind in accepts]


def compatibility_table() -> str:
    """Markdown table: one row per model, its batch kinds and the objectives it trains on."""
    rows = ["| model | accepts batches | objectives |", "|---|---|---|"]
    for m, path in MODELS.items():
        accepts = ", ".join(get_class(path).accepts)
        rows.append(f"| {m} | {accepts} | {', '.join(valid_objectives(m))} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    import argparse

    argparse.ArgumentParser(
        prog="python -m lmlab.registry",
        description="Print which objectives each model trains on (a markdown table derived from "
        "the batch kinds each objective yields and each model accepts).",
    ).parse_args(argv)
    print(compatibility_table())


if __name__ == "__main__":
    main()
