"""Every shipped config composes, and what it names can be built."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf, open_dict

from lmlab.errors import ConfigError, refuse_unknown_top_keys
from lmlab.paths import CONF_DIR
from lmlab.registry import MODELS, OBJECTIVES, compatibility_table, valid_objectives
from lmlab.train import check_compatible, check_settings


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_groups_exist():
    for group in (
        "model",
        "objective",
        "data",
        "tokenizer",
        "trainer",
        "logger",
        "callbacks",
        "paths",
        "debug",
        "experiment",
        "optim",
        "hydra",
    ):
        assert options(group), group
    assert set(options("model")) == set(MODELS) and set(options("objective")) == set(OBJECTIVES)


@pytest.mark.parametrize(
    "override",
    [
        f"{g}={o}"
        for g in (
            "model",
            "objective",
            "data",
            "tokenizer",
            "trainer",
            "logger",
            "callbacks",
            "debug",
            "experiment",
            "hparams_search",
        )
        for o in options(g)
    ],
)
def test_every_option_composes_and_resolves(compose_cfg, override):
    group, option = override.split("=")
    extra = ["data.train=x.txt"] if override == "data=files" else []
    if group == "model":  # pair it with an objective it accepts
        extra.append(f"objective={valid_objectives(option)[0]}")
    elif group == "objective":
        extra.append(f"model={next(m for m in MODELS if option in valid_objectives(m))}")
    cfg = compose_cfg(override, *extra)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    refuse_unknown_top_keys(cfg, "train", "python -m lmlab")  # adds no key train.yaml lacks
    check_compatible(cfg)
    get_class(cfg.model._target_)
    get_class(cfg.objective._target_)


@pytest.mark.parametrize("logger", options("logger"))
def test_loggers_and_callbacks_instantiate(compose_cfg, logger, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_cfg(f"logger={logger}")
    loggers = [instantiate(c) for c in cfg.logger.values()]
    assert type(loggers[0]).__name__ == "ResumableCSVLogger"
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    assert {type(c).__name__ for c in callbacks} >= {"StepCheckpoint", "Throughput", "Samples"}
    with open_dict(cfg):
        assert cfg.trainer.pop("skip_nonfinite") is False  # lmlab's key, not the Trainer's
    trainer = instantiate(cfg.trainer, logger=loggers, callbacks=callbacks)
    assert trainer.max_steps == cfg.trainer.max_steps


def test_gpt2_preset_builds_the_right_model(compose_cfg):
    cfg = compose_cfg("experiment=gpt2_124m")
    assert cfg.seq_len == 1024 and cfg.compile and cfg.trainer.precision == "bf16-mixed"
    kw = OmegaConf.to_container(cfg.model, resolve=True)
    cls = get_class(kw.pop("_target_"))
    with torch.device("meta"):
        m = cls(vocab_size=cfg.tokenizer.vocab_size, special_ids={}, optim={}, **kw)
    c = m.config
    assert (c.n_layers, c.d_model, c.n_heads, c.max_seq_len) == (12, 768, 12, 1024)
    assert c.padded_vocab_size == 50304
    # GPT-2 small has 124M parameters with tied embeddings (ours has no biases, a SwiGLU MLP)
    assert 120e6 < m.num_params(non_embedding=False) < 130e6


def test_default_run_is_the_documented_one(compose_cfg):
    cfg = compose_cfg()
    assert (cfg.model.name, cfg.objective.name, cfg.data.name, cfg.tokenizer.kind) == (
        "decoder",
        "clm",
        "shakespeare",
        "bpe",
    )


def test_compatibility_table_rows():
    # invalid pairs and their messages are tested in test_families.py
    assert "| decoder | causal, prefix | clm, prefix_lm |" in compatibility_table()
    assert (
        "| encoder | masked | mlm, sop, nsp, sentence_distance, deshuffle, discourse, capital_word, tlm, ir_relevance, mcp |"
        in compatibility_table()
    )
    assert "| encoder_decoder | seq2seq | span, denoise |" in compatibility_table()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seq_len=2048", "seq_len=2048 exceeds model.max_seq_len=256"),
        ("data.batch_size=0", r"data\.batch_size=0 must be a whole number >= 1"),
        ("data.eval_batch_size=0", r"data\.eval_batch_size=0 must be a whole number >= 1"),
        ("data.num_workers=-1", r"data\.num_workers=-1 must be a whole number >= 0"),
        # a key of another source (forgot data=files) or a misspelt one: ignored before
        (
            "+data.train=corpus.txt",
            r"data\.train is not a setting of data=shakespeare \(source bundled\); its settings "
            r"are name, source, batch_size, eval_batch_size, num_workers, val_fraction$",
        ),
        ("+data.eval_batchsize=8", r"data\.eval_batchsize is not a setting of data=shakespeare"),
        ("data.source=web", r"unknown data\.source='web'; choose bundled, files, hf"),
        (
            "+optim.momentum=0.9",
            r"optim\.momentum is not a setting of optim; its settings are lr, weight_decay, betas",
        ),
        ("+sample.temp=0.5", r"sample\.temp is not a setting of sample; .*, temperature, "),
        # a misspelt top-level key, added with "+" as Hydra advises: ran with seq_len's default
        (
            "+seqlen=32",
            r"seqlen is not a setting of python -m lmlab; did you mean seq_len\? "
            r"`python -m lmlab --cfg job` prints them all",
        ),
        (
            "+tokenizer.min_freq=5",
            r"tokenizer\.min_freq is not a setting of any tokenizer; tokenizer=bpe's settings are "
            r"kind, vocab_size, num_sentinels, min_frequency$",
        ),
        ("model.pad_vocab_to=0", r"model\.pad_vocab_to must be >= 1, got 0"),
        ("model.mlp_hidden=0", r"model\.mlp_hidden must be >= 1, got 0"),
        ("loss_chunk_size=-1", "loss_chunk_size must be >= 0"),
        ("compile=fast", "compile='fast' is not a setting; use false, true .* max-autotune"),
        ("compile_scope=layers", "compile_scope='layers' is not a setting; use model or blocks"),
        ("trainer.gradient_clip_val=-1", r"trainer\.gradient_clip_val=-1 must be >= 0"),
        ("optim.weight_decay=-0.1", r"optim\.weight_decay=-0\.1 must be >= 0"),
        ("optim.min_lr_ratio=1.5", r"optim\.min_lr_ratio=1\.5 must be in \[0, 1\]"),
        ("optim.eps=0", r"optim\.eps=0 must be > 0"),
        ("optim.betas=[0.9]", r"optim\.betas=.* must be two numbers in \[0, 1\)"),
        ("optim.betas=[0.9,1.0]", r"optim\.betas=.* must be two numbers in \[0, 1\)"),
        ("optim.warmup_steps=-5", r"optim\.warmup_steps=-5 must be >= 0"),
        ("sample.top_p=1.5", r"sample\.top_p must be in \(0, 1\] or null, got 1\.5"),
        (
            "sample.temperature=-1",
            r"sample\.temperature must be a finite number >= 0 \(0: greedy\), got -1",
        ),
        ("sample.top_k=0", r"sample\.top_k must be a whole number >= 1 or null, got 0"),
        ("sample.max_new_tokens=-3", r"sample\.max_new_tokens=-3 must be a whole number >= 0"),
        ("optim.lr=3", "optim.lr=3"),
        ("optim.warmup_steps=600", r"optim\.warmup_steps=600 must be below trainer\.max_steps=500"),
    ],
)
def test_settings_out_of_range(compose_cfg, override, message):
    cfg = compose_cfg(override, "model.max_seq_len=256")
    with pytest.raises(ConfigError, match=message):
        check_settings(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["objective.noise_density=0.5"],
            r"objective=span with seq_len=32 makes targets of 33 tokens, more than "
            r"model\.max_target_len=32 \(the decoder's positions\); set model\.max_target_len=33",
        ),
        (
            ["objective=denoise", "model.max_target_len=4"],
            r"objective=denoise with seq_len=32 makes targets of 32 tokens, more than "
            r"model\.max_target_len=4",
        ),
    ],
)
def test_encoder_decoder_targets_must_fit_the_decoders_positions(compose_cfg, overrides, message):
    """A span target beyond max_target_len crashed in the first step, naming max_seq_len; denoising
    trained on targets longer than max_target_len, whose only effect was shorter samples."""
    cfg = compose_cfg("model=encoder_decoder", "objective=span", "seq_len=32", *overrides)
    with pytest.raises(ConfigError, match=message):
        check_settings(cfg)
    check_settings(compose_cfg("model=encoder_decoder", "objective=span", "seq_len=32"))


def test_another_tokenizer_kinds_setting_is_a_warning(compose_cfg, caplog):
    """An experiment's tokenizer.vocab_size under tokenizer=pretrained (or byte) does no harm."""
    check_settings(compose_cfg("tokenizer=byte", "++tokenizer.vocab_size=400"))
    assert (
        "tokenizer.vocab_size is a setting of another tokenizer kind; tokenizer=byte" in caplog.text
    )


@pytest.mark.parametrize("tokenizer", ["bpe", "byte"])
def test_debug_fast_sets_nothing_the_tokenizer_does_not_use(compose_cfg, caplog, tokenizer):
    """debug=fast set tokenizer.vocab_size, so `debug=fast tokenizer=byte` warned about a setting
    the user never gave."""
    check_settings(compose_cfg("debug=fast", f"tokenizer={tokenizer}"))
    assert "another tokenizer kind" not in caplog.text


def test_registry_command_prints_the_table_and_has_help(capsys):
    from lmlab.registry import main

    main([])
    assert capsys.readouterr().out.strip() == compatibility_table()
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "usage: python -m lmlab.registry" in capsys.readouterr().out


def test_readme_shows_the_compatibility_table_of_the_code():
    readme = (CONF_DIR.parent / "README.md").read_text()
    assert compatibility_table() in readme


def test_objective_step_budget_yields_to_the_command_line(compose_cfg):
    cfg = compose_cfg("model=encoder_decoder", "objective=denoise")
    assert (cfg.trainer.max_steps, cfg.trainer.val_check_interval) == (400, 200)
    assert compose_cfg("model=encoder_decoder", "objective=span").trainer.max_steps == 500
    cfg = compose_cfg("model=encoder_decoder", "objective=denoise", "trainer.max_steps=7")
    assert cfg.trainer.max_steps == 7


def test_mlm_learning_rate_yields_to_the_command_line_and_to_experiments(compose_cfg):
    assert compose_cfg("model=encoder", "objective=mlm").optim.lr == 3e-3
    assert compose_cfg("model=encoder", "objective=mlm", "optim.lr=1e-3").optim.lr == 1e-3
    assert compose_cfg().optim.lr == 6e-3  # other objectives keep the shared default
    bert = compose_cfg("experiment=bert_base")
    assert bert.objective.name == "mlm" and bert.optim.lr != 3e-3
