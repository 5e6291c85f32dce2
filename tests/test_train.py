"""Training end to end through ``train(cfg)``, then generate and evaluate from its checkpoint."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from lmlab.callbacks import Throughput
from lmlab.checkpoint import load_run
from lmlab.errors import ConfigError
from lmlab.evaluate import evaluate
from lmlab.generate import generate
from lmlab.models.base import LMModule
from lmlab.train import train

from .conftest import command_cfg

OUTPUTS = [
    "metrics.csv",
    "summary.json",
    "samples.txt",
    "tokenizer.json",
    "checkpoints/last.ckpt",
    "checkpoints/best.ckpt",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run shared by the tests below (about ten seconds)."""
    from .conftest import TINY, make_text

    root = tmp_path_factory.mktemp("train")
    files = []
    for i in range(6):
        p = root / f"doc{i}.txt"
        p.write_text(make_text(800, i))
        files.append(str(p))
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmlab.paths import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        # eval batches of 2: evaluate's limit_batches scores the windows the run validated on
        overrides = [
            "data=files",
            f"data.train=[{','.join(files)}]",
            *TINY,
            "data.eval_batch_size=2",
        ]
        cfg = compose("train", overrides=overrides)
    GlobalHydra.instance().clear()
    cfg.paths.output_dir = str(root / "run")
    cfg.paths.cache_dir = str(root / "cache")
    metrics, objects = train(cfg)
    return cfg, metrics, objects, root / "run"


def test_run_writes_every_output(trained):
    cfg, metrics, _objects, out = trained
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "val/loss",
        "val/ppl",
        "val/bpb",
        "train/loss",
        "train/tokens_per_sec",
        "trainer/global_step",
        "wall_s",
    ):
        assert key in summary, key
    assert summary["trainer/global_step"] == cfg.trainer.max_steps
    assert summary["val/ppl"] == pytest.approx(math.exp(summary["val/loss"]), rel=1e-5)
    assert summary == pytest.approx(metrics)
    # the last validation row of metrics.csv is the summary's
    rows = [r for r in csv.DictReader((out / "metrics.csv").open()) if r.get("val/loss")]
    assert [int(r["step"]) for r in rows] == [2, 5]  # after steps 3 and 6 (0-based step index)
    assert float(rows[-1]["val/loss"]) == pytest.approx(summary["val/loss"])
    samples = (out / "samples.txt").read_text()
    assert samples.count("=== step 3 sample") == 2 and samples.count("=== step 6 sample") == 2
    assert "ROMEO:" in samples


def test_the_trainer_writes_checkpoints_atomically(trained):
    """Lightning's checkpoints go through AtomicCheckpointIO (a temporary file, then a rename),
    so a kill mid-write leaves the previous checkpoint whole."""
    from lmlab.checkpoint_io import AtomicCheckpointIO

    _, _, objects, out = trained
    assert isinstance(objects["trainer"].strategy.checkpoint_io, AtomicCheckpointIO)
    assert not list((out / "checkpoints").glob("*.tmp*"))  # nothing left half-written


def test_samples_go_to_the_file_and_the_wandb_table_at_each_validation_only(
    tiny_cfg, tmp_path, monkeypatch
):
    """samples.txt and the W&B table hold the two prompts' samples of each validation (steps 3
    and 6), the table every validation's rows so far; the sanity check's validation before
    training writes none."""
    from lightning.pytorch.loggers import WandbLogger

    tables = []
    monkeypatch.setattr(
        WandbLogger, "log_text", lambda self, key, columns, data: tables.append((key, [*data]))
    )
    out = tmp_path / "samples"
    cfg = tiny_cfg("logger=wandb", "trainer.num_sanity_val_steps=1", output_dir=out)
    train(cfg)
    text = (out / "samples.txt").read_text()
    heads = [line for line in text.splitlines() if line.startswith("=== step")]
    want = [f"=== step {s} sample {i} ===" for s in (3, 6) for i in (0, 1)]
    assert heads == want
    blocks = [b.strip("\n") for b in text.split("=== step")[1:]]
    assert [key for key, _ in tables] == ["samples", "samples"]
    last = tables[-1][1]
    assert [row[:2] for row in last] == [[3, 0], [3, 1], [6, 0], [6, 1]]
    assert [row[2] for row in last] == [b.split("===\n", 1)[1] for b in blocks]
    assert tables[0][1] == last[:2]


def test_checkpoint_carries_tokenizer_and_config(trained):
    cfg, _, objects, out = trained
    module, tok, run_cfg = load_run(out / "checkpoints" / "last.ckpt")
    assert tok.to_str() == objects["tokenizer"].to_str()
    assert run_cfg.model.n_layers == cfg.model.n_layers
    ref = objects["model"].backbone.state_dict()
    for k, v in module.backbone.state_dict().items():
        assert torch.equal(v, ref[k].cpu()), k


def test_evaluate_reproduces_the_final_validation(trained):
    cfg, metrics, _, out = trained
    ecfg = command_cfg(
        "evaluate",
        ckpt_path=out / "checkpoints" / "last.ckpt",
        limit_batches=cfg.trainer.limit_val_batches,
        device="cpu",
        **{"paths.cache_dir": cfg.paths.cache_dir},
    )
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        m = evaluate(ecfg)
        assert torch.backends.cuda.matmul.allow_tf32  # the run's tf32=true, as it validated
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert m["loss"] == pytest.approx(metrics["val/loss"], rel=1e-5)
    assert m["bpb"] == pytest.approx(metrics["val/bpb"], rel=1e-5)
    # TINY scores 3 batches: the result says so (tokens and bytes are the split's)
    assert m["batches"] == cfg.trainer.limit_val_batches == 3 and m["whole_split"] == 0
    written = json.loads((out / "evaluate-files.json").read_text())
    assert written["loss"] == pytest.approx(m["loss"])


def test_bits_per_byte_of_a_tokenizer_that_does_not_spell_the_text(tiny_cfg, text_files, tmp_path):
    """A WordPiece tokenizer's pieces hold no spaces, so their byte counts fall short of the text's:
    training and evaluate both scale them to the validation text's bytes (TokenStore.byte_scale),
    and give the same bits per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials)
    tk.train([str(p) for p in text_files], trainer)
    path = tmp_path / "wordpiece.json"
    tk.save(str(path))
    cfg = tiny_cfg("tokenizer=pretrained", f"tokenizer.path={path}", "callbacks.samples=null")
    metrics, objects = train(cfg)
    scale = objects["model"].byte_scale
    assert 1.05 < scale < 1.5  # the spaces between words: text bytes over the pieces' bytes
    m = evaluate(
        command_cfg(
            "evaluate",
            ckpt_path=Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt",
            limit_batches=cfg.trainer.limit_val_batches,
            device="cpu",
            **{"paths.cache_dir": cfg.paths.cache_dir},
        )
    )
    assert m["bpb"] == pytest.approx(metrics["val/bpb"], rel=1e-5)
    assert m["loss"] == pytest.approx(metrics["val/loss"], rel=1e-5)


def test_evaluate_scores_windows_of_the_seq_len_it_is_given(trained, tmp_path):
    """evaluate's seq_len: the whole validation split in windows of 16 tokens is twice as many
    windows (so batches) as in the run's 32, and scores other contexts."""
    cfg, _, _, out = trained
    given = dict(
        ckpt_path=out / "checkpoints" / "last.ckpt",
        device="cpu",
        output_file=str(tmp_path / "evaluate.json"),
        **{"paths.cache_dir": cfg.paths.cache_dir},
    )
    short = evaluate(command_cfg("evaluate", seq_len=16, batch_size=1, **given))
    run_len = evaluate(command_cfg("evaluate", batch_size=1, **given))
    assert (short["seq_len"], run_len["seq_len"]) == (16, 32)
    assert short["whole_split"] == run_len["whole_split"] == 1
    assert short["batches"] == pytest.approx(2 * run_len["batches"], abs=2)
    assert short["loss"] != pytest.approx(run_len["loss"], rel=1e-4)  # 5.027 vs 5.022 here


def test_evaluate_scores_with_or_without_document_masks(trained, tmp_path, caplog):
    """evaluate's document_mask overrides the run's objective.document_mask (false here): true
    keeps each validation window's documents apart, which changes the loss of the windows that
    hold a document boundary; the result file records the objective it scored with (and says
    when it replaced an evaluation with other settings)."""
    import logging

    from .conftest import make_text

    cfg, _, _, out = trained
    val = tmp_path / "val.jsonl"  # twelve short documents: most windows hold a boundary
    val.write_text("".join(json.dumps({"text": make_text(16, i)}) + "\n" for i in range(12)))
    given = dict(
        ckpt_path=out / "checkpoints" / "last.ckpt",
        device="cpu",
        output_file=str(tmp_path / "evaluate.json"),
        data={"name": "files", "source": "files", "train": None, "val": str(val)},
        **{"paths.cache_dir": cfg.paths.cache_dir},
    )
    own = evaluate(command_cfg("evaluate", **given))
    off = evaluate(command_cfg("evaluate", document_mask=False, **given))
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        masked = evaluate(command_cfg("evaluate", document_mask=True, **given))
    assert own["documents"] == 12
    assert off["loss"] == own["loss"]
    assert masked["loss"] != pytest.approx(own["loss"], rel=1e-4)
    assert masked["tokens"] == own["tokens"] and masked["batches"] == own["batches"]
    written = json.loads((tmp_path / "evaluate.json").read_text())
    assert written["objective"]["document_mask"] is True and written["objective"]["name"] == "clm"
    assert (
        "held an evaluation on other objective ({'_target_'" in caplog.text
    )  # masked replaced off


@pytest.mark.parametrize(
    "family", [["model=decoder", "objective=clm"], ["model=encoder", "objective=mlm"]]
)
def test_a_run_trained_with_document_masks_validates_and_evaluates_with_them(
    tiny_cfg, tmp_path, family
):
    """objective.document_mask=true end to end on forty short documents (set on the command line,
    as a user would): training's batches carry doc_ids, the run's val/loss is evaluate's with the
    masks (its default for such a run, and document_mask=true), and document_mask=false scores the
    same windows without them."""
    from .conftest import make_text

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": make_text(24, i)}) + "\n" for i in range(40)))
    cfg = tiny_cfg(*family, f"data.train=[{docs}]", "objective.document_mask=true")
    metrics, objects = train(cfg)
    batch = next(iter(objects["datamodule"].train_dataloader()))
    assert (batch["input_ids"] == objects["tokenizer"].eos_id).sum() >= 3 and "doc_ids" in batch
    given = dict(
        ckpt_path=Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt",
        limit_batches=cfg.trainer.limit_val_batches,
        device="cpu",
        output_file=str(tmp_path / "evaluate.json"),
        **{"paths.cache_dir": cfg.paths.cache_dir},
    )
    own = evaluate(command_cfg("evaluate", **given))
    masked = evaluate(command_cfg("evaluate", document_mask=True, **given))
    plain = evaluate(command_cfg("evaluate", document_mask=False, **given))
    assert own["loss"] == pytest.approx(metrics["val/loss"], rel=1e-5)
    assert masked["loss"] == own["loss"]
    assert plain["loss"] != pytest.approx(own["loss"], rel=1e-4)


def test_evaluate_refuses_document_masks_for_objectives_without_them(tiny_cfg, tmp_path):
    """Refused before any data work: an objective without the setting (span), and one whose own
    checks refuse it (sop builds its inputs from segments)."""
    from lmlab.evaluate import objective_of

    span = tiny_cfg("model=encoder_decoder", "objective=span")
    with pytest.raises(ConfigError, match=r"document_mask=true: the run's objective=span has no"):
        objective_of(OmegaConf.create({"document_mask": True}), span)
    assert objective_of(OmegaConf.create({"document_mask": False}), span) == span.objective
    # a run from before the setting existed: its default, so that null and false record alike
    clm = tiny_cfg()
    with open_dict(clm):
        del clm.objective.document_mask
    null, false = (objective_of(OmegaConf.create({"document_mask": v}), clm) for v in (None, False))
    assert null == false and null.document_mask is False
    cfg = tiny_cfg("model=encoder", "objective=sop", "callbacks.samples=null")
    train(cfg)
    ecfg = command_cfg(
        "evaluate",
        ckpt_path=Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt",
        document_mask=True,
        device="cpu",
        **{"paths.cache_dir": str(tmp_path / "fresh_cache")},
    )
    with pytest.raises(ConfigError, match=r"objective=sop builds each input from its own segments"):
        evaluate(ecfg)
    assert not (tmp_path / "fresh_cache").exists()  # refused before any data work
    for value in ("yes", 1):
        with pytest.raises(ConfigError, match=rf"document_mask={value!r} must be true, false or"):
            evaluate(command_cfg("evaluate", ckpt_path="x.ckpt", document_mask=value))


def test_evaluate_on_other_files(trained, tmp_path, caplog):
    """The result file records what was scored: another evaluation on data of the same name
    replaced it without a trace (now with a warning)."""
    import logging

    cfg, _, _, out = trained
    other = tmp_path / "held_out.txt"
    other.write_text("Good night, sweet prince.\n" * 50)
    ecfg = command_cfg(
        "evaluate",
        ckpt_path=out / "checkpoints" / "last.ckpt",
        output_file=str(tmp_path / "e.json"),
        device="cpu",
        data={"name": "files", "source": "files", "train": None, "val": str(other)},
        **{"paths.cache_dir": cfg.paths.cache_dir},
    )
    m = evaluate(ecfg)
    assert m["bytes"] == len(other.read_bytes()) and m["documents"] == 1
    assert m["ppl"] == pytest.approx(math.exp(m["loss"]), rel=1e-5)
    written = json.loads((tmp_path / "e.json").read_text())
    assert written["data"]["val"] == str(other) and written["checkpoint"].endswith("last.ckpt")
    # the batch size used, not a data option's (evaluate's batch_size decides: null, the run's)
    assert written["batch_size"] == cfg.data.eval_batch_size == 2  # the run's
    assert "eval_batch_size" not in written["data"]
    with open_dict(ecfg):
        ecfg.data.eval_batch_size, ecfg.batch_size = 1, 3
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        evaluate(ecfg)  # the same data: no warning
    assert json.loads((tmp_path / "e.json").read_text())["batch_size"] == 3
    assert "held an evaluation on other data" not in caplog.text
    third = tmp_path / "third.txt"
    third.write_text("To be, or not to be.\n" * 50)
    with open_dict(ecfg):
        ecfg.data.val = str(third)
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        evaluate(ecfg)
    assert "held an evaluation on other data" in caplog.text


def test_evaluate_refuses_a_seq_len_beyond_the_models_positions_before_data_work(trained, tmp_path):
    *_, out = trained
    ecfg = command_cfg(
        "evaluate",
        ckpt_path=out / "checkpoints" / "last.ckpt",
        seq_len=100_000,
        device="cpu",
        **{"paths.cache_dir": str(tmp_path / "fresh_cache")},
    )
    with pytest.raises(ConfigError, match=r"seq_len=100000 exceeds the model's max_seq_len=\d+"):
        evaluate(ecfg)
    assert not (tmp_path / "fresh_cache").exists()  # no token store was built first


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"limit_batches": 0}, r"limit_batches=0 must be a whole number >= 1, or null"),
        ({"batch_size": -2}, r"batch_size=-2 must be a whole number >= 1, or null"),
        # "+limit_batch=1" (as Hydra advises for a misspelt key) scored the whole split
        (
            {"limit_batch": 1},
            r"limit_batch is not a setting of .*evaluate; did you mean limit_batches",
        ),
        (
            {"output_file": "/nonexistent/dir/e.json"},
            r"/nonexistent/dir is not a folder; create it",
        ),
        ({"output_file": 123}, r"output_file=123 is not a path; pass a file name"),  # TypeError
    ],
)
def test_evaluate_settings_are_refused_before_any_work(
    trained, tmp_path, settings, message, monkeypatch
):
    """The output folder too: a missing one failed after the whole evaluation, losing it. Before
    the weights are read, too (a GPT-2's 1.5 GB took 9 s to load before a refusal)."""
    import lmlab.evaluate

    def load_run(*args, **kwargs):
        raise AssertionError("the weights were read before the settings were checked")

    monkeypatch.setattr(lmlab.evaluate, "load_run", load_run)
    *_, out = trained
    cache = tmp_path / "fresh_cache"
    ecfg = command_cfg(
        "evaluate",
        ckpt_path=out / "checkpoints" / "last.ckpt",
        device="cpu",
        **settings,
        **{"paths.cache_dir": str(cache)},
    )
    with pytest.raises(ConfigError, match=message):
        evaluate(ecfg)
    assert not cache.exists()


def test_evaluate_writes_beside_a_checkpoint_outside_a_run_and_expands_home(
    trained, tmp_path, monkeypatch
):
    import shutil

    cfg, _, _, out = trained
    copy = tmp_path / "shared" / "model.ckpt"  # not in <run>/checkpoints/
    copy.parent.mkdir()
    shutil.copy(out / "checkpoints" / "last.ckpt", copy)
    common = {"device": "cpu", "limit_batches": 1, "paths.cache_dir": cfg.paths.cache_dir}
    m = evaluate(command_cfg("evaluate", ckpt_path=str(copy), **common))
    assert m["output_file"] == str(copy.parent / f"evaluate-{cfg.data.name}.json")
    monkeypatch.setenv("HOME", str(tmp_path))
    m = evaluate(command_cfg("evaluate", ckpt_path=str(copy), output_file="~/e.json", **common))
    assert m["output_file"] == str(tmp_path / "e.json") and (tmp_path / "e.json").is_file()


def test_evaluate_checks_its_data_against_the_runs_objective_before_reading_it(
    tiny_cfg, tmp_path, text_files
):
    """A run's objective that trains on pairs (tlm) was given text files to evaluate on: refused
    only after tokenizing them, naming data.train; now before, naming data.val. Pairs for an
    objective that cuts text into segments (sop), likewise."""
    from lmlab.evaluate import objective_of

    text = {"name": "files", "source": "files", "val": str(text_files[0])}
    tlm = tiny_cfg("model=encoder", "objective=tlm", "data.text_field=[en,fr]")
    ecfg = command_cfg("evaluate", ckpt_path="x.ckpt", data=text)
    with pytest.raises(
        ConfigError, match=r"trains on pairs of texts .* data=files data\.val=pairs"
    ):
        objective_of(ecfg, tlm)
    pairs = dict(text, text_field=["en", "fr"])
    sop = tiny_cfg("model=encoder", "objective=sop")
    with pytest.raises(ConfigError, match=r"objective=sop cuts text into segments"):
        objective_of(command_cfg("evaluate", ckpt_path="x.ckpt", data=pairs), sop)
    assert objective_of(command_cfg("evaluate", ckpt_path="x.ckpt", data=text), sop).name == "sop"


def test_evaluate_refuses_a_data_key_of_another_source(trained, tmp_path):
    *_, out = trained
    data = {"name": "shakespeare", "source": "bundled", "val": str(tmp_path / "x.txt")}
    ecfg = command_cfg(
        "evaluate", ckpt_path=out / "checkpoints" / "last.ckpt", device="cpu", data=data
    )
    with pytest.raises(ConfigError, match=r"data\.val is not a setting of data=shakespeare"):
        evaluate(ecfg)


def test_generate_from_checkpoint_is_greedy_and_deterministic(trained):
    _, _, objects, out = trained
    gcfg = command_cfg(
        "generate",
        ckpt_path=out / "checkpoints" / "last.ckpt",
        prompt="The king",
        max_new_tokens=10,
        temperature=0,
        num_samples=2,
        device="cpu",
    )
    a, b = generate(gcfg)
    assert a == b and a.startswith("The king")
    tok, model = objects["tokenizer"], objects["model"].cpu()
    ids = torch.tensor([tok.encode("The king")])
    ref = model.backbone.generate(ids, 10, temperature=0, eos_id=tok.eos_id)
    assert a == "The king" + tok.decode(
        [t for t in ref[0, ids.shape[1] :].tolist() if t != tok.eos_id]
    )


def test_a_prefix_lm_reads_prompts_as_its_prefix_in_samples_and_from_its_checkpoint(
    tiny_cfg, tmp_path, trained
):
    """objective=prefix_lm trains a decoder whose prefixes attend both ways: its samples and
    `python -m lmlab.generate` read the prompt so (greedy: the argmax of the uncached forward with
    the prompt as the prefix); a causal LM's checkpoint reads it causally."""
    out = tmp_path / "prefix"
    settings = ["objective=prefix_lm", "trainer.max_steps=2", "optim.warmup_steps=0"]
    _, objects = train(tiny_cfg(*settings, "trainer.precision=32-true", output_dir=out))
    assert objects["model"].prefix_prompts  # the samples at validation: generate_text below
    module, tok, _ = load_run(out / "checkpoints" / "last.ckpt")
    assert module.prefix_prompts
    assert not load_run(trained[3] / "checkpoints" / "last.ckpt")[0].prefix_prompts  # clm
    asked, generate = [], module.backbone.generate
    module.backbone.generate = lambda *a, **kw: asked.append(kw["prefix"]) or generate(*a, **kw)
    (text,) = module.generate_text(tok, ["The king"], max_new_tokens=6, temperature=0)
    assert asked == [True]  # (an untrained model's argmax may not tell the two readings apart)
    seq = torch.tensor([tok.encode("The king")])
    whole = torch.tensor([seq.shape[1]])
    for _ in range(6):
        logits = module.backbone(seq, prefix_len=whole)[:, -1, : tok.vocab_size]
        logits[:, [i for i in tok.special_ids if i != tok.eos_id]] = float("-inf")
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    new = [t for t in seq[0, whole.item() :].tolist() if t != tok.eos_id]
    assert text == "The king" + tok.decode(new)
    # a prefix LM's checkpoint from before the setting: read as one, and it resumes
    last = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    del ckpt["hyper_parameters"]["prefix_prompts"]
    torch.save(ckpt, last)
    assert load_run(last)[0].prefix_prompts
    metrics, _ = train(tiny_cfg(*settings, "trainer.precision=32-true", "trainer.max_steps=3",
                                "ckpt_path=last", output_dir=out))  # fmt: skip
    assert metrics["trainer/global_step"] == 3


def test_bad_checkpoint_files_are_clear_errors(tmp_path, trained):
    _, _, _, out = trained
    with pytest.raises(ConfigError, match="checkpoint not found"):
        load_run(tmp_path / "none.ckpt")
    trunc = tmp_path / "trunc.ckpt"
    trunc.write_bytes((out / "checkpoints" / "last.ckpt").read_bytes()[:1000])
    with pytest.raises(ConfigError, match="not a readable PyTorch checkpoint"):
        load_run(trunc)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ConfigError, match="not an lmlab checkpoint"):
        load_run(foreign)
    # a module saved through plain Lightning: a KeyError traceback
    plain = tmp_path / "plain.ckpt"
    torch.save({"lmlab": {}, "state_dict": {}, "hyper_parameters": {}}, plain)
    with pytest.raises(ConfigError, match=r"lacks what lmlab saves .* \(model_class, tokenizer"):
        load_run(plain)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.train=/nowhere/*.txt"], "matched no files"),
        (["seq_len=5000", "model.max_seq_len=1024"], "exceeds model.max_seq_len"),
        (
            ["tokenizer=pretrained", "tokenizer.path=/nowhere/tokenizer.json"],
            "tokenizer file not found",
        ),
        (
            ["seq_len=60000", "model.max_seq_len=60000", "tokenizer=byte"],
            "seq_len=60000 needs at least",
        ),
    ],
)
def test_bad_input_fails_before_training(tiny_cfg, tmp_path, overrides, message):
    out = tmp_path / "bad_run"
    cfg = tiny_cfg(*overrides, output_dir=out)
    with pytest.raises(ConfigError, match=message):
        train(cfg)
    assert not (out / "checkpoints").exists() and not (out / "metrics.csv").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tokenizer.vocab_size=200"], r"tokenizer\.vocab_size=200 is too small"),
        (["tokenizer=pretrained", "tokenizer.path=/nowhere/t.json"], "tokenizer file not found"),
        (["tokenizer=pretrained", "tokenizer.path=null"], "needs tokenizer.path"),
        (["tokenizer.kind=wordpiece"], "unknown tokenizer.kind='wordpiece'"),
        (["tokenizer.vocab_size=abc"], "tokenizer.vocab_size='abc' is not a whole number"),
        (["tokenizer=byte", "tokenizer.num_sentinels=-1"], "tokenizer.num_sentinels=-1 is not"),
    ],
)
def test_tokenizer_settings_are_refused_before_the_data_is_read(
    tiny_cfg, tmp_path, monkeypatch, overrides, message
):
    """A corpus can take hours to read (a streamed dataset): tokenizer errors come first."""

    def no_data(*args, **kwargs):
        raise AssertionError("the corpus was opened")

    monkeypatch.setattr("lmlab.train.make_corpus", no_data)
    out = tmp_path / "bad_tokenizer"
    with pytest.raises(ConfigError, match=message):
        train(tiny_cfg(*overrides, output_dir=out))
    assert not out.exists()


def test_empty_and_binary_files_fail_before_training(tiny_cfg, tmp_path, text_files):
    for content, message in ((b"   \n", "is empty"), (b"\x00\x00PK", "looks binary")):
        bad = text_files[0].parent / "zz_bad.txt"
        bad.write_bytes(content)
        out = tmp_path / "bad"
        cfg = tiny_cfg(output_dir=out)
        cfg.data.train = str(text_files[0].parent / "*.txt")
        with pytest.raises(ConfigError, match=message):
            train(cfg)
        assert not (out / "checkpoints").exists()


def test_resume_from_last_continues_and_keeps_the_log(tiny_cfg, tmp_path):
    out = tmp_path / "resumed"
    train(tiny_cfg(output_dir=out))
    rows_before = list(csv.DictReader((out / "metrics.csv").open()))
    metrics, _ = train(tiny_cfg("trainer.max_steps=9", "ckpt_path=last", output_dir=out))
    assert metrics["trainer/global_step"] == 9
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert rows[: len(rows_before)] == [
        {k: r.get(k, "") for k in rows[0]} for r in rows_before
    ]  # nothing already logged is lost
    steps = sorted({int(r["step"]) for r in rows if r.get("train/loss")})
    assert steps == list(range(9))  # steps 0-5 from the first run, 6-8 from the resumed one


def test_resume_last_without_checkpoint_is_an_error(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"ckpt_path=last but .*last\.ckpt does not exist"):
        train(tiny_cfg("ckpt_path=last", output_dir=tmp_path / "fresh"))


def test_wandb_offline_run_gets_config_tags_group_and_is_finished(tiny_cfg, tmp_path, monkeypatch):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    import lmlab.train as lmlab_train

    monkeypatch.setenv("WANDB_MODE", "offline")
    seen = {}
    finish = lmlab_train.finish_loggers

    def spy(trainer, status):
        (wb,) = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        run = wb.experiment
        seen.update(
            tags=set(run.tags),
            group=run.group,
            config=dict(run.config),
            summary={k: run.summary[k] for k in ("val/loss", "val/bpb")},
            status=status,
        )
        finish(trainer, status)

    monkeypatch.setattr(lmlab_train, "finish_loggers", spy)
    out = tmp_path / "wb"
    metrics, _ = lmlab_train.train(
        tiny_cfg("logger=wandb", "wandb_group=sweep-7", "tags=[mine]", output_dir=out)
    )
    assert seen["tags"] == {"model:decoder", "objective:clm", "data:files", "tokenizer:bpe", "mine"}
    assert seen["group"] == "sweep-7" and seen["status"] == "success"
    assert seen["config"]["model.n_layers"] == 2  # resolved and flat
    assert seen["config"]["paths.output_dir"] == str(out)
    assert seen["config"]["model.max_seq_len"] == 32  # ${seq_len} resolved
    assert seen["summary"]["val/loss"] == pytest.approx(metrics["val/loss"])
    assert wandb.run is None  # finished at the end of the job
    assert list((out / "wandb").glob("offline-run-*"))
    assert (out / "metrics.csv").is_file()  # csv stays on


def test_several_loggers_at_once_each_get_the_metrics(tiny_cfg, tmp_path, monkeypatch):
    """logger=[wandb,tensorboard]: Hydra merges both choices (each with the CSV logger); every
    backend records the run, TensorBoard the same final validation loss as summary.json."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "many"
    metrics, objects = train(tiny_cfg("logger=[wandb,tensorboard]", output_dir=out))
    kinds = sorted(type(x).__name__ for x in objects["trainer"].loggers)
    assert kinds == ["ResumableCSVLogger", "TensorBoardLogger", "WandbLogger"]
    assert (out / "metrics.csv").is_file() and list((out / "wandb").glob("offline-run-*"))
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert events.Scalars("val/loss")[-1].value == pytest.approx(metrics["val/loss"])


def test_a_crashed_run_is_finished_as_failed_in_wandb(tiny_cfg, tmp_path, monkeypatch):
    """A run that stops on an error (here a NaN loss) ends its W&B run with a failing exit code,
    not as a success."""
    import wandb

    from lmlab.errors import NonFiniteLoss

    monkeypatch.setenv("WANDB_MODE", "offline")
    codes, real_finish = [], wandb.finish

    def finish(*args, exit_code=None, **kw):
        codes.append(exit_code)
        return real_finish(*args, exit_code=exit_code, **kw)

    def nan_at_step_2(self, batch):
        out = original(self, batch)
        if self.training and self.global_step == 2:
            return (out[0] * float("nan"), *out[1:])
        return out

    original = LMModule.nll
    monkeypatch.setattr(wandb, "finish", finish)
    monkeypatch.setattr(LMModule, "nll", nan_at_step_2)
    with pytest.raises(NonFiniteLoss):
        train(tiny_cfg("logger=wandb", output_dir=tmp_path / "nan"))
    monkeypatch.setattr(LMModule, "nll", original)
    train(tiny_cfg("logger=wandb", output_dir=tmp_path / "fine"))
    assert codes == [1, 0]


def test_wandb_resume_continues_the_same_run_and_sweep_identity(tiny_cfg, tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    import lmlab.train as lmlab_train
    from lmlab.loggers import RUN_ID_FILE, sweep_identity

    monkeypatch.setenv("WANDB_MODE", "offline")
    ids = []
    finish = lmlab_train.finish_loggers

    def spy(trainer, status):
        ids.extend(lg.experiment.id for lg in trainer.loggers if isinstance(lg, WandbLogger))
        finish(trainer, status)

    monkeypatch.setattr(lmlab_train, "finish_loggers", spy)
    out = tmp_path / "wb"
    lmlab_train.train(tiny_cfg("logger=wandb", output_dir=out))
    lmlab_train.train(
        tiny_cfg("logger=wandb", "ckpt_path=last", "trainer.max_steps=9", output_dir=out)
    )
    assert len(ids) == 2 and ids[0] == ids[1] == (out / RUN_ID_FILE).read_text().strip()
    # a multirun job: group = the sweep folder (same for every job), name = the job's overrides
    assert sweep_identity("multirun/2026-11-26/12-00-00", "optim.lr=0.001") == (
        "multirun-2026-11-26-12-00-00",
        "optim.lr=0.001",
    )
    assert sweep_identity("/abs/sweeps/a b", "")[1] is None


def test_eval_batch_size_sets_the_validation_batches_not_the_metrics(tiny_cfg, tmp_path):
    """Validation sums over windows: 6 batches of 2 score the 12 windows of 3 batches of 4."""
    common = ["trainer.max_steps=2", "optim.warmup_steps=0", "callbacks.samples=null"]
    common += ["trainer.precision=32-true"]
    same, a = train(tiny_cfg(*common, output_dir=tmp_path / "a"))
    halves = ["data.eval_batch_size=2", "trainer.limit_val_batches=6"]
    other, b = train(tiny_cfg(*common, *halves, output_dir=tmp_path / "b"))
    assert b["datamodule"].val_dataloader().batch_size == 2
    assert a["datamodule"].val_dataloader().batch_size == 4  # null: data.batch_size
    assert other["val/loss"] == pytest.approx(same["val/loss"], rel=1e-5)


@pytest.mark.parametrize(
    "family",
    [
        ("model=decoder", "objective=clm"),
        ("model=decoder", "objective=prefix_lm"),
        ("model=encoder", "objective=mlm"),
        ("model=encoder", "objective=sop"),  # the pair loss: a mean per micro-batch
        ("model=encoder", "objective=nsp"),
        ("model=encoder", "objective=capital_word"),  # its labels vary per micro-batch
        ("model=encoder_decoder", "objective=span"),
        ("model=encoder_decoder", "objective=denoise"),
    ],
    ids=lambda family: family[1].removeprefix("objective="),
)
def test_gradient_accumulation_gives_the_large_batch_update(
    tiny_cfg, tmp_path, monkeypatch, family
):
    """One optimizer step on 8 sequences == two accumulated micro-batches of 4 (same windows), for
    every objective. With prefix LM the micro-batches have different target counts (random
    prefixes): each target must weigh alike, not each micro-batch's mean. Compared: each weight's
    update. AdamW with eps=1 and no weight decay makes the first update lr * g / (|g| + 1), about
    lr * g: the gradient itself (with the default eps=1e-8 it is lr * sign(g), and float noise
    in a gradient near zero flips a whole step)."""
    starts = []
    on_train_start = LMModule.on_train_start

    def keep_start(self):
        starts.append({k: v.clone() for k, v in self.state_dict().items()})
        on_train_start(self)

    monkeypatch.setattr(LMModule, "on_train_start", keep_start)
    common = [
        *family,
        "trainer.max_steps=1",
        "optim.warmup_steps=0",
        "optim.eps=1.0",
        "optim.weight_decay=0.0",
        "trainer.precision=32-true",
        "trainer.val_check_interval=1",
        "trainer.gradient_clip_val=null",
        "callbacks.samples=null",
    ]
    _, big = train(tiny_cfg(*common, "data.batch_size=8", output_dir=tmp_path / "big"))
    _, acc = train(
        tiny_cfg(*common, "data.batch_size=4", "global_batch_size=8", output_dir=tmp_path / "acc")
    )
    assert acc["trainer"].accumulate_grad_batches == 2
    a, b = big["model"].state_dict(), acc["model"].state_dict()
    for k in starts[0]:
        assert torch.equal(starts[0][k], starts[1][k]), k  # the same start
    moved = 0
    for k, start in starts[0].items():
        da, db = a[k] - start, b[k] - start
        scale = float(da.abs().max())
        torch.testing.assert_close(
            da, db, rtol=1e-4, atol=1e-4 * scale, msg=lambda m, k=k: f"{k}: {m}"
        )
        moved += int(da.abs().max() > 0)
    assert moved > len(a) // 2  # most tensors are weights that moved


def test_a_step_cut_short_by_limit_train_batches_is_the_mean_over_its_own_targets(
    tiny_cfg, tmp_path
):
    """limit_train_batches=1 with 2 micro-batches per step: Lightning's one step has one micro-batch
    (and divides its loss by 2); the update must be that batch's own, as without accumulation
    (AdamW eps=1: the update is about lr * g, see above; with prefix LM's varying counts). Allowed
    with validations per epoch only (check_step_batches)."""
    common = ["objective=prefix_lm", "trainer.max_steps=1", "optim.warmup_steps=0"]
    common += ["optim.eps=1.0", "optim.weight_decay=0.0", "trainer.precision=32-true"]
    common += ["trainer.val_check_interval=1.0", "trainer.check_val_every_n_epoch=1"]
    common += ["trainer.gradient_clip_val=null"]
    common += ["callbacks.samples=null", "data.batch_size=4"]
    _, one = train(tiny_cfg(*common, output_dir=tmp_path / "one"))
    short = ["global_batch_size=8", "trainer.limit_train_batches=1"]
    _, cut = train(tiny_cfg(*common, *short, output_dir=tmp_path / "cut"))
    assert cut["trainer"].accumulate_grad_batches == 2 and cut["trainer"].global_step == 1
    a, b = one["model"].state_dict(), cut["model"].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["global_batch_size=10", "data.batch_size=4"],
            r"global_batch_size=10 is not a multiple of .* = 4 x 1 x 1 = 4",
        ),
        (  # both set, disagreeing: the trainer's was silently overridden
            ["global_batch_size=8", "data.batch_size=4", "trainer.accumulate_grad_batches=4"],
            r"global_batch_size=8 sets the gradient accumulation to 2 .* but "
            r"trainer\.accumulate_grad_batches=4; set only one",
        ),
        (  # each epoch would end inside a step, and validations move into later steps
            ["global_batch_size=8", "data.batch_size=4", "trainer.limit_train_batches=5"],
            r"limit_train_batches=5 does not make whole optimizer steps of 2 accumulated .* "
            r"use a multiple of 2 \(4 or 6\) \(or validate per epoch",
        ),
        (
            [
                "trainer.accumulate_grad_batches=3",
                "trainer.check_val_every_n_epoch=1",
                "trainer.val_check_interval=0.5",
            ],
            r"val_check_interval=0.5 .* can fall inside an optimizer step of 3 .*\(an integer\)",
        ),
        (
            ["trainer.accumulate_grad_batches=3", "trainer.limit_train_batches=0.5"],
            r"limit_train_batches=0.5 does not .* give it as a number of batches, a multiple of 3",
        ),
    ],
)
def test_impossible_global_batch_is_refused(tiny_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(tiny_cfg(*overrides))


@pytest.mark.parametrize(
    ("devices", "gpus", "accelerator", "nodes", "expected"),
    [
        (2, 0, "cpu", 1, 4),
        ("2", 0, "cpu", 1, 4),
        ("auto", 4, "gpu", 1, 2),
        (-1, 4, "gpu", 1, 2),
        ("0,1", 4, "gpu", 1, 4),
        ([0, 1, 2, 3], 4, "gpu", 1, 2),
        (2, 4, "gpu", 2, 2),  # 2 devices on each of 2 nodes: 32 / (4 x 2 x 2)
        ("auto", 4, "gpu", 2, 1),
        ("auto", 4, "cpu", 1, 8),  # a CPU run is one process, whatever GPUs the machine has
        (-1, 4, "cpu", 2, 4),
    ],
)
def test_global_batch_counts_the_devices_lightning_will_start(
    monkeypatch, devices, gpus, accelerator, nodes, expected
):
    """trainer=ddp's devices=auto is every visible GPU: 32 sequences of 4 per process on 4 GPUs is
    2 micro-batches each, not the 8 a count of one device would give (an 4x larger batch); every
    node starts as many processes."""
    from lmlab.train import accumulation

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    trainer = {"accelerator": accelerator, "devices": devices, "num_nodes": nodes}
    cfg = OmegaConf.create({"global_batch_size": 32, "data": {"batch_size": 4}, "trainer": trainer})
    assert accumulation(cfg) == expected


def test_flops_per_token_matches_a_hand_count_and_mfu():
    from lmlab import flops
    from lmlab.models.decoder import DecoderLM

    dims = dict(vocab_size=100, special_ids={}, optim={}, n_layers=2, d_model=32, n_heads=4)
    m = DecoderLM(**dims, max_seq_len=64)
    # by hand: per block the matmul weights qkv 32x96 + out 32x32 + gate_up 32x256 + down 128x32,
    # and the output head 128x32 once (vocab padded to 128); norms and the lookup do no matmul
    n = 2 * (32 * 96 + 32 * 32 + 32 * 256 + 128 * 32) + 128 * 32
    batch = {"input_ids": torch.zeros(3, 64, dtype=torch.long)}
    assert m.flops_per_token(batch) == 6 * n + 12 * 2 * 32 * 64 == 270336
    # an untied embedding is a lookup: the same count (it was counted as a second head)
    untied = DecoderLM(**dims, max_seq_len=64, tie_embeddings=False)
    assert untied.flops_per_token(batch) == 270336
    # 1M tokens/s of that model on 2 devices of 1 TFLOP/s each
    assert flops.mfu(1e6, 270336, 1e12, world_size=2) == pytest.approx(0.135168)
    assert flops.peak_flops(torch.device("cpu")) is None


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),  # was the SXM part's 989
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_the_peak_is_the_devices_own(monkeypatch, name, peak):
    from lmlab import flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    assert flops.peak_flops(torch.device("cuda", 0)) == peak


def test_flops_follow_the_tokens_each_part_sees():
    """MLM: the head only at the selected positions. Encoder-decoder: the encoder and the
    cross-attention keys/values over the S inputs, the rest of the decoder and the head over the T
    targets, attention over S x S (encoder) and T x T + T x S (decoder) pairs."""
    from lmlab.data.collate import IGNORE
    from lmlab.models.encoder import EncoderLM
    from lmlab.models.encoder_decoder import EncoderDecoderLM

    dims = dict(vocab_size=100, special_ids={}, optim={}, n_layers=2, d_model=32, n_heads=4)
    block = 32 * 96 + 32 * 32 + 32 * 256 + 128 * 32  # as in the decoder's hand count
    head = 128 * 32
    labels = torch.full((3, 64), IGNORE)
    labels[:, :5] = 7  # 15 targets
    mlm = EncoderLM(**dims, max_seq_len=64)
    batch = {"input_ids": torch.zeros(3, 64, dtype=torch.long), "labels": labels}
    want = 3 * 64 * (6 * 2 * block + 12 * 2 * 32 * 64) + 6 * head * 15
    assert mlm.step_flops(batch) == want
    assert mlm.step_flops({**batch, "n_targets": 15}) == want  # the count taken on the host

    s2s = EncoderDecoderLM(**dims, max_seq_len=64, n_decoder_layers=3, max_target_len=16)
    cross = 32 * 32 + 32 * 64 + 32 * 32  # q, kv, out of the decoder's cross-attention
    kv = 32 * 64
    batch = {
        "input_ids": torch.zeros(2, 64, dtype=torch.long),
        "decoder_input_ids": torch.zeros(2, 16, dtype=torch.long),
    }
    encoder = 2 * 64 * (6 * (2 * block + 3 * kv) + 12 * 2 * 32 * 64)
    decoder = 2 * 16 * (6 * (3 * (block + cross - kv) + head) + 12 * 3 * 32 * (16 + 64))
    assert s2s.step_flops(batch) == encoder + decoder
    assert s2s.flops_per_token(batch) == (encoder + decoder) / (2 * 64)


@pytest.mark.parametrize(
    "family",
    [
        ("model=decoder", "objective=clm"),
        ("model=encoder", "objective=mlm"),
        ("model=encoder_decoder", "objective=span"),
    ],
)
def test_training_steps_read_no_device_values_between_redraws_and_logs(
    tiny_cfg, monkeypatch, family
):
    """Reading a tensor's value (`item`, `bool`, ...) is where a GPU run waits for the device.
    Between logging steps, training reads only host tensors (the batch before its transfer, the
    pinned NaN flag) and, at each progress-bar redraw, the bar's metrics. Counted on the CPU as the
    aten calls behind every such read; the GPU test counts real synchronisations. (Padded batches,
    as denoise makes, also read their mask on the host in `key_padding_mask`: test_nn.py.)"""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    from lmlab.callbacks import ProgressBar

    reads, redraws = [], []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name == "aten::_local_scalar_dense":
                names = {f.name for f in traceback.extract_stack()}
                if names & {"on_before_batch_transfer", "value"}:
                    reads.append("host")
                else:
                    reads.append("bar" if "get_metrics" in names else "other")
            return func(*args, **(kwargs or {}))

    mode = Reads()
    window = (3, 11)  # global steps: from the start of the 4th batch to the end of the 11th

    def start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == window[0]:
            mode.__enter__()

    def end(
        self, trainer, pl_module, outputs, batch, batch_idx, _end=Throughput.on_train_batch_end
    ):
        _end(self, trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == window[1]:
            mode.__exit__(None, None, None)

    def get_metrics(self, trainer, pl_module, _get=ProgressBar.get_metrics):
        if window[0] <= trainer.global_step <= window[1]:
            redraws.append(trainer.global_step)
        return _get(self, trainer, pl_module)

    monkeypatch.setattr(Throughput, "on_train_batch_start", start, raising=False)
    monkeypatch.setattr(Throughput, "on_train_batch_end", end)
    monkeypatch.setattr(ProgressBar, "get_metrics", get_metrics)
    train(
        tiny_cfg(
            *family,
            "trainer.max_steps=12",
            "trainer.val_check_interval=12",
            "trainer.log_every_n_steps=50",
            "trainer.enable_progress_bar=true",
            "callbacks.progress_bar={_target_:lmlab.callbacks.ProgressBar,refresh_rate:4}",
            "callbacks.samples=null",
        )
    )
    assert redraws == [4, 8]  # after batches 4 and 8
    assert reads.count("other") == 0
    assert reads.count("bar") == len(redraws)  # train/loss (MFU is logged on logging steps)


def _record_training_metrics(monkeypatch) -> tuple[list, dict, list]:
    """(steps and names of the module's `log` calls, each optimizer step's loss over all its
    micro-batches' targets, (step, loss) shown at each training redraw of the progress bar)."""
    from lmlab.callbacks import ProgressBar

    logged, losses, shown = [], {}, []

    def log(self, name, value, *args, _log=LMModule.log, **kwargs):
        logged.append((self.trainer.global_step, name))
        return _log(self, name, value, *args, **kwargs)

    sums = {}

    def nll(self, batch, _nll=LMModule.nll):
        out = _nll(self, batch)
        if self.training:  # summed over the micro-batches of the optimizer step it is part of
            step = sums.setdefault(self.trainer.global_step + 1, [0.0, 0, 0.0])
            step[0] += float(out[0])
            step[1] += int(out[1])
            step[2] += float(out[2])  # the targets' UTF-8 bytes
            losses[self.trainer.global_step + 1] = step[0] / step[1]
            losses["bpb", self.trainer.global_step + 1] = step[0] / (math.log(2) * step[2])
        return out

    def get_metrics(self, trainer, pl_module, _get=ProgressBar.get_metrics):
        metrics = _get(self, trainer, pl_module)
        if trainer.training and "train/loss" in metrics:
            shown.append((trainer.global_step, metrics["train/loss"]))
        return metrics

    monkeypatch.setattr(LMModule, "log", log)
    monkeypatch.setattr(LMModule, "nll", nll)
    monkeypatch.setattr(ProgressBar, "get_metrics", get_metrics)
    return logged, losses, shown


@pytest.mark.parametrize("accumulate", [1, 2])
def test_training_metrics_are_logged_on_logging_steps_and_the_bar_shows_the_last_step(
    tiny_cfg, monkeypatch, accumulate
):
    """train/loss, ppl and bpb go through Lightning's `log` (~0.25 ms of host time per call) only
    on the steps whose metrics are written, once per optimizer step, over all the step's
    micro-batches; the progress bar shows each redraw's own step loss all the same, the run's
    summary the last step's, and train/tokens still sums every step's targets."""
    logged, losses, shown = _record_training_metrics(monkeypatch)
    metrics, _ = train(
        tiny_cfg(
            "trainer.max_steps=8",
            "trainer.val_check_interval=8",
            "trainer.log_every_n_steps=3",
            f"trainer.accumulate_grad_batches={accumulate}",
            "trainer.enable_progress_bar=true",
            "callbacks.progress_bar={_target_:lmlab.callbacks.ProgressBar,refresh_rate:2}",
            "callbacks.samples=null",
        )
    )
    assert [step for step, name in logged if name == "train/loss"] == [3, 6]  # after steps 3, 6
    assert {name for _, name in logged if name.startswith("train/")} >= {
        "train/loss",
        "train/ppl",
        "train/bpb",
        "train/tokens",
    }
    redrawn = [step for step, _ in shown]
    assert {2, 4, 8} <= set(redrawn)  # redraws at steps that do not log
    for step, value in shown:
        assert value == pytest.approx(losses[step], rel=1e-6), step
    assert metrics["train/tokens"] == 8 * accumulate * 4 * 32  # batches of 4 windows of 32 targets
    # the values written: the step's loss, its exponential, its nats per byte in bits
    out = Path(tiny_cfg().paths.output_dir)
    rows = [r for r in csv.DictReader((out / "metrics.csv").open()) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [2, 5]  # Lightning's index: after steps 3 and 6
    for r in rows:
        step = int(r["step"]) + 1
        assert float(r["train/loss"]) == pytest.approx(losses[step], rel=1e-6)
        assert float(r["train/ppl"]) == pytest.approx(math.exp(losses[step]), rel=1e-5)
        assert float(r["train/bpb"]) == pytest.approx(losses["bpb", step], rel=1e-6)
    # the summary's training loss is the last step's, a step that did not log
    assert metrics["train/loss"] == pytest.approx(losses[8], rel=1e-6)


def test_a_stop_asked_for_by_a_callback_logs_that_steps_metrics(tiny_cfg, monkeypatch):
    """A callback that stops the run at a step's end (a time limit, early stopping) makes
    Lightning write that step's metrics: the loss written is that step's, not the last logging
    step's."""
    _, losses, _ = _record_training_metrics(monkeypatch)

    def end(
        self, trainer, pl_module, outputs, batch, batch_idx, _end=Throughput.on_train_batch_end
    ):
        _end(self, trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == 5:
            trainer.should_stop = True

    monkeypatch.setattr(Throughput, "on_train_batch_end", end)
    cfg = tiny_cfg("trainer.max_steps=8", "trainer.log_every_n_steps=3")
    train(cfg)
    out = Path(cfg.paths.output_dir)
    rows = [r for r in csv.DictReader((out / "metrics.csv").open()) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [2, 4]  # Lightning's rows: after steps 3 and 5
    assert float(rows[-1]["train/loss"]) == pytest.approx(losses[5], rel=1e-6)


def test_the_last_steps_metrics_outlive_the_step_outputs_they_came_from():
    """Under compile=reduce-overhead, nll's outputs live in a CUDA graph's memory, overwritten at
    its next replay: what the module keeps past the step (the progress bar's and summary's last
    step values, the epoch's target count) must be copies. The overwrite is played here by
    filling those outputs with NaN after the step."""
    from lmlab.models.decoder import DecoderLM

    torch.manual_seed(0)
    m = DecoderLM(
        vocab_size=64, special_ids={}, optim={}, n_layers=1, d_model=16, n_heads=2, max_seq_len=8
    )
    m.set_token_bytes(torch.ones(64, dtype=torch.long))
    outputs = []

    def nll(batch, _nll=m.nll):
        out = _nll(batch)
        outputs.extend(out)
        return out

    m.nll = nll
    ids = torch.randint(0, 64, (2, 8))
    m.training_step({"input_ids": ids, "labels": ids}, 0)
    before = {k: v.item() for k, v in m.latest_train_metrics().items()}
    targets = m._epoch_targets.item()
    for t in outputs:
        t.fill_(float("nan") if t.is_floating_point() else -1)
    assert {k: v.item() for k, v in m.latest_train_metrics().items()} == before
    assert m._epoch_targets.item() == targets == 16 and math.isfinite(before["train/bpb"])


def test_enable_progress_bar_false_alone_turns_the_bar_off(tiny_cfg):
    """TINY drops the bar callback itself; here it is back, and the trainer flag alone suffices
    (Lightning refuses a progress-bar callback with enable_progress_bar=False)."""
    from lightning.pytorch.callbacks import ProgressBar

    cfg = tiny_cfg(
        "callbacks.progress_bar={_target_:lmlab.callbacks.ProgressBar}",
        "trainer.enable_progress_bar=false",
    )
    assert cfg.callbacks.progress_bar._target_ == "lmlab.callbacks.ProgressBar"
    _, objects = train(cfg)
    assert not any(isinstance(c, ProgressBar) for c in objects["trainer"].callbacks)


def test_enable_checkpointing_false_alone_turns_checkpoints_off(tiny_cfg):
    """Lightning refuses Checkpoint callbacks (lmlab's ModelCheckpoints and Preemption) with
    enable_checkpointing=False: the flag alone drops them, and nothing is written."""
    cfg = tiny_cfg("+trainer.enable_checkpointing=false")
    metrics, _ = train(cfg)
    assert metrics["trainer/global_step"] == 6
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_progress_bar_shows_the_latest_training_metrics_first():
    import types

    from lmlab.callbacks import ProgressBar

    bar = ProgressBar(metrics=("train/loss", "train/mfu", "train/absent"))
    trainer = types.SimpleNamespace(
        callback_metrics={"train/loss": torch.tensor(2.5), "train/mfu": torch.tensor(0.25)},
        progress_bar_metrics={"val/loss": 3.0},
        loggers=[],
    )
    shown = bar.get_metrics(trainer, None)
    assert shown == {"train/loss": 2.5, "train/mfu": 0.25, "val/loss": 3.0}
    assert list(shown) == ["train/loss", "train/mfu", "val/loss"]


def test_mfu_is_logged_with_a_known_peak(tiny_cfg):
    metrics, objects = train(tiny_cfg("callbacks.throughput.peak_flops=1e12"))
    B, T = objects["cfg"].data.batch_size, objects["cfg"].seq_len
    fpt = objects["model"].flops_per_token({"input_ids": torch.zeros(B, T)})
    expected = metrics["train/tokens_per_sec"] * fpt / 1e12
    assert metrics["train/mfu"] == pytest.approx(expected, rel=1e-5)


def test_throughput_logs_only_on_the_steps_lightning_writes(tiny_cfg, tmp_path, monkeypatch):
    """`log` of a number makes a device tensor, which on a GPU waits for the queued kernels: the
    callback calls it only on the steps whose metrics the loggers receive, and they lose nothing."""
    logged = []
    real_log = LMModule.log

    def log(self, name, value, *args, **kwargs):
        if name in ("train/tokens_seen", "train/tokens_per_sec", "train/mfu"):
            logged.append((self.trainer.validating, self.global_step, name))
        return real_log(self, name, value, *args, **kwargs)

    monkeypatch.setattr(LMModule, "log", log)
    out = tmp_path / "every2"
    metrics, objects = train(
        tiny_cfg(
            "trainer.log_every_n_steps=2", "callbacks.throughput.peak_flops=1e12", output_dir=out
        )
    )
    # Steps 0..5 are written at 1, 3, 5 (Lightning's (step + 1) % 2 == 0), when 2, 4, 6 optimizer
    # steps are done.
    seen, rate, mfu = "train/tokens_seen", "train/tokens_per_sec", "train/mfu"
    train_logs = [(step, name) for validating, step, name in logged if not validating]
    assert train_logs == [(s, name) for s in (2, 4, 6) for name in (seen, rate, mfu)]
    with (out / "metrics.csv").open(newline="") as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f) if r["train/loss"]}
    assert sorted(rows) == [1, 3, 5]
    assert [float(rows[s][seen]) for s in (1, 3, 5)] == [2 * 128, 4 * 128, 6 * 128]
    assert all(rows[s][rate] and rows[s][mfu] for s in (1, 3, 5))
    throughput = next(c for c in objects["trainer"].callbacks if isinstance(c, Throughput))
    assert throughput.tokens_seen == 6 * 128 == metrics["train/tokens_seen"]


def test_tokens_per_sec_leaves_out_validation_and_what_follows_it(monkeypatch):
    """Validating, then the samples and the checkpoints written after it (other callbacks'
    on_validation_end, which run after Throughput's): none of it is training time (the samples'
    and checkpoints' time counted before, ~40% of tokens/s in short runs)."""
    import types

    import lmlab.callbacks as callbacks_mod

    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(callbacks_mod.time, "perf_counter", lambda: clock.now)
    trainer = types.SimpleNamespace(
        world_size=2, _logger_connector=types.SimpleNamespace(should_update_logs=False)
    )
    batch = {"input_ids": torch.zeros(4, 8, dtype=torch.long)}  # 32 tokens per device
    meter = Throughput(window=3)

    def step(seconds: float) -> None:
        clock.now += seconds
        meter.on_train_batch_end(trainer, None, None, batch, 0)

    for _ in range(3):
        step(0.5)  # 64 tokens per 0.5 s
    meter.on_validation_start(trainer, None)
    clock.now += 100.0  # validation
    meter.on_validation_end(trainer, None)
    clock.now += 50.0  # samples, checkpoints
    meter.on_train_batch_start(trainer, None, batch, 0)
    step(0.5)
    assert meter.tokens_per_sec == pytest.approx(128.0)  # 3 x 64 tokens over 1.5 s of training
    step(0.25)
    assert meter.tokens_per_sec == pytest.approx(3 * 64 / 1.25)  # the window keeps 3 intervals


def test_mfu_counts_every_devices_peak(monkeypatch):
    """tokens/s counts the tokens of every device, so MFU divides by all devices' peak: two
    devices at 128 tokens/s of 1000 FLOPs each, 1e6 FLOP/s peak each, are at 6.4%."""
    import types

    import lmlab.callbacks as callbacks_mod

    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(callbacks_mod.time, "perf_counter", lambda: clock.now)
    trainer = types.SimpleNamespace(
        world_size=2, _logger_connector=types.SimpleNamespace(should_update_logs=True)
    )
    logged = {}
    module = types.SimpleNamespace(
        log=lambda name, value: logged.__setitem__(name, value), flops_per_token=lambda b: 1000
    )
    batch = {"input_ids": torch.zeros(4, 8, dtype=torch.long)}  # 32 tokens per device
    meter = Throughput(window=3, peak_flops=1e6)
    for _ in range(3):
        clock.now += 0.5  # 64 tokens (both devices) per 0.5 s
        meter.on_train_batch_end(trainer, module, None, batch, 0)
    assert logged["train/tokens_per_sec"] == pytest.approx(128.0)
    assert logged["train/mfu"] == pytest.approx(128.0 * 1000 / (1e6 * 2))
    assert logged["train/tokens_seen"] == 3 * 64


def test_tokens_seen_counts_every_step_is_logged_with_validation_and_resumes(tiny_cfg, tmp_path):
    out = tmp_path / "tokens"
    metrics, _ = train(tiny_cfg(output_dir=out))  # 6 steps of 4 x 32 tokens, validation at 3 and 6
    per_step = 4 * 32
    assert metrics["train/tokens_seen"] == 6 * per_step

    def rows():
        with (out / "metrics.csv").open(newline="") as f:
            return [r for r in csv.DictReader(f) if r["train/tokens_seen"]]

    train_rows = {int(r["step"]): float(r["train/tokens_seen"]) for r in rows() if r["train/loss"]}
    assert train_rows == {s: (s + 1) * per_step for s in range(6)}  # log_every_n_steps=1
    # Each validation row carries the tokens trained on before it: the x axis of val/bpb curves.
    val_rows = [(float(r["train/tokens_seen"])) for r in rows() if r["val/bpb"]]
    assert val_rows == [3 * per_step, 6 * per_step]
    resumed, _ = train(
        tiny_cfg(
            "ckpt_path=last", "trainer.max_steps=8", "trainer.val_check_interval=4", output_dir=out
        )
    )
    assert resumed["train/tokens_seen"] == 8 * per_step  # continued from the checkpoint's count


def test_val_check_interval_counts_optimizer_steps_under_gradient_accumulation(
    tiny_cfg, monkeypatch
):
    """Lightning counts val_check_interval in micro-batches; lmlab's configs mean optimizer steps
    (a validation inside an accumulation would also checkpoint half a gradient)."""
    seen = []

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0 and self.trainer.state.fn == "fit":
            seen.append(self.global_step)
        return original(self, batch, batch_idx)

    original = LMModule.validation_step
    monkeypatch.setattr(LMModule, "validation_step", validation_step)
    metrics, _ = train(tiny_cfg("data.batch_size=2", "global_batch_size=4"))  # 2 micro-batches
    assert seen == [3, 6] and metrics["trainer/global_step"] == 6


def test_debug_default_trains_one_step(tiny_cfg, compose_cfg):
    from lmlab.train import check_settings

    check_settings(compose_cfg("debug=default"))  # as shipped (it set a 50-step warmup for 1 step)
    metrics, _ = train(tiny_cfg("debug=default", "optim.warmup_steps=0"))  # TINY sets 2
    assert metrics["trainer/global_step"] == 1 and math.isfinite(metrics["val/loss"])


def test_the_final_validation_after_training_is_logged_with_the_tokens_seen(tiny_cfg):
    """train() validates once more when the last step was not validated; that row carries
    train/tokens_seen like the others, so curves against tokens include the final point."""
    cfg = tiny_cfg("trainer.val_check_interval=4")  # 6 steps: step 6 validated after fit
    train(cfg)
    rows = list(csv.DictReader((Path(cfg.paths.output_dir) / "metrics.csv").open()))
    val = [r for r in rows if r.get("val/loss")]
    assert len(val) == 2
    assert [float(r["train/tokens_seen"]) for r in val] == [4 * 4 * 32, 6 * 4 * 32]
    # under the last step's index, as in training (the validation after 4 steps is at 3)
    assert [int(r["step"]) for r in val] == [3, 5]
    # extending the finished run keeps that row (the resumed run drops rows from its step on)
    train(tiny_cfg("trainer.val_check_interval=4", "trainer.max_steps=8", "ckpt_path=last"))
    rows = list(csv.DictReader((Path(cfg.paths.output_dir) / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r.get("val/loss")] == [3, 5, 7]


def test_a_finished_run_started_again_trains_nothing_and_keeps_its_summary(tiny_cfg, tmp_path):
    out = tmp_path / "done"
    train(tiny_cfg(output_dir=out))
    summary, rows = (out / "summary.json").read_text(), (out / "metrics.csv").read_text()
    again, _ = train(tiny_cfg("ckpt_path=auto", output_dir=out))  # e.g. a requeued job
    assert again == json.loads(summary) and "train/loss" in again
    assert (out / "summary.json").read_text() == summary
    assert (out / "metrics.csv").read_text() == rows  # no validation run again
    more, _ = train(tiny_cfg("ckpt_path=last", "trainer.max_steps=8", output_dir=out))
    assert more["trainer/global_step"] == 8  # a larger max_steps still continues


def test_validation_metrics_are_logged_once_per_validation_and_start_afresh(monkeypatch):
    """Each validation logs its four metrics once (not at every batch: each `log` call costs host
    time), over its own batches only: validating on B after A, and after a validation stopped
    half-way, gives B's loss, which equals the summed NLL over B's targets divided by their
    count."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lmlab.models.decoder import DecoderLM

    calls = []

    def log(self, name, value, *args, _log=LMModule.log, **kwargs):
        calls.append(name)
        return _log(self, name, value, *args, **kwargs)

    monkeypatch.setattr(LMModule, "log", log)
    torch.manual_seed(0)
    m = DecoderLM(
        vocab_size=64, special_ids={}, optim={}, n_layers=1, d_model=16, n_heads=2, max_seq_len=8
    )
    m.set_token_bytes(torch.ones(64, dtype=torch.long))
    g = torch.Generator().manual_seed(0)

    def batches(n):
        out = []
        for _ in range(n):
            ids = torch.randint(0, 64, (2, 8), generator=g)
            out.append({"input_ids": ids, "labels": torch.where(ids % 5 == 0, -100, ids)})
        return out

    a, b = batches(3), batches(4)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    loss = lambda data: trainer.validate(m, DataLoader(data, batch_size=None), verbose=False)[0]
    loss(a)
    with (
        torch.inference_mode()
    ):  # a validation stopped half-way (an exception, a signal) leaves state
        m.validation_step(a[0], 0)
    got = loss(b)
    assert calls == ["val/loss", "val/ppl", "val/bpb", "val/acc"] * 2
    with torch.no_grad():
        m.eval()
        nll, count = map(sum, zip(*[m.nll(batch)[:2] for batch in b], strict=True))
    assert got["val/loss"] == pytest.approx((nll / count).item(), rel=1e-6)
    assert got["val/ppl"] == pytest.approx(math.exp((nll / count).item()), rel=1e-5)


@pytest.mark.parametrize("bad", [3, 4])
def test_a_skipped_micro_batch_leaves_nothing_in_the_losses_and_the_token_count(
    tiny_cfg, monkeypatch, bad
):
    """skip_nonfinite with gradient accumulation: when a step's last micro-batch is skipped (a
    NaN loss), the step's own micro-batches end there; the next step's train/loss is over its
    own targets only. train/tokens counts the targets trained on, whichever micro-batch of a step
    was skipped (it counted a skipped first one, and dropped a whole step at a skipped last one)."""
    calls, steps = [0], {}

    def nll(self, batch, _nll=LMModule.nll):
        out = _nll(self, batch)
        if not self.training:
            return out
        calls[0] += 1
        if calls[0] == bad:  # the first or second micro-batch of the second optimizer step
            return (out[0] * float("nan"), *out[1:])
        step = steps.setdefault(self.trainer.global_step + 1, [0.0, 0])
        step[0] += float(out[0])
        step[1] += int(out[1])
        return out

    monkeypatch.setattr(LMModule, "nll", nll)
    cfg = tiny_cfg(
        "trainer.skip_nonfinite=true", "trainer.accumulate_grad_batches=2", "trainer.max_steps=4"
    )
    metrics, _ = train(cfg)
    rows = csv.DictReader((Path(cfg.paths.output_dir) / "metrics.csv").open())
    logged = {int(r["step"]) + 1: float(r["train/loss"]) for r in rows if r.get("train/loss")}
    assert set(steps) <= set(logged) and len(steps) >= 3
    for step, (total, count) in steps.items():
        assert logged[step] == pytest.approx(total / count, rel=1e-6), step
    assert metrics["train/tokens"] == sum(count for _, count in steps.values())


@pytest.mark.parametrize("objective", ["clm", "prefix_lm"])
@pytest.mark.parametrize("bad", [1, 2])
def test_a_skipped_micro_batch_leaves_the_gradient_of_the_trained_targets_mean(
    tiny_cfg, monkeypatch, bad, objective
):
    """skip_nonfinite with gradient accumulation: the other micro-batch's loss was divided by the
    whole step's targets, skipped ones included, so the step's gradient was half the mean over the
    targets trained on (and the logged train/loss, that mean, disagreed with it). Under prefix_lm
    the micro-batches have other target counts: the factor is the step's targets over the trained
    ones, not the accumulation."""
    calls, kept, got = [0], {}, {}

    def nll(self, batch, _nll=LMModule.nll):
        out = _nll(self, batch)
        if self.training:
            calls[0] += 1
            if calls[0] == bad:
                return (out[0] * float("nan"), *out[1:])
            kept["batch"] = {k: v.clone() for k, v in batch.items()}
        return out

    def after(self, optimizer, _hook=LMModule.on_before_optimizer_step):
        _hook(self, optimizer)
        params = [p for p in self.parameters() if p.grad is not None]
        got["applied"] = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        nll_sum, count, *_ = _nll_plain(self, kept["batch"])
        (nll_sum / count).backward()  # the mean over the targets trained on
        got["want"] = [p.grad.clone() for p in params]
        for p, g in zip(params, got["applied"], strict=True):
            p.grad = g.clone()  # clipped next, in place

    _nll_plain = LMModule.nll
    monkeypatch.setattr(LMModule, "nll", nll)
    monkeypatch.setattr(LMModule, "on_before_optimizer_step", after)
    cfg = tiny_cfg(
        f"objective={objective}",
        "trainer.skip_nonfinite=true",
        "trainer.accumulate_grad_batches=2",
        "trainer.max_steps=1",
        "trainer.precision=32-true",
        "optim.warmup_steps=0",
        "callbacks.samples=null",
    )
    train(cfg)
    for applied, want in zip(got["applied"], got["want"], strict=True):
        torch.testing.assert_close(applied, want, rtol=1e-4, atol=1e-7)
