"""The command lines a user types, run as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TINY


def run(args: list[str], tmp_path: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, LMLAB_CACHE=str(tmp_path / "cache"), WANDB_MODE="offline")
    p = subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    return p


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    from .conftest import make_text

    tmp = tmp_path_factory.mktemp("cli")
    for i in range(4):
        (tmp / f"d{i}.txt").write_text(make_text(600, i))
    out = tmp / "run"
    p = run(["lmlab", "data=files", "data.train=d*.txt", *TINY, f"hydra.run.dir={out}"], tmp)
    return tmp, out, p


def test_train_command_writes_every_output(cli_run):
    _tmp, out, p = cli_run
    for name in (
        ".hydra/config.yaml",
        "metrics.csv",
        "summary.json",
        "samples.txt",
        "tokenizer.json",
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
    ):
        assert (out / name).is_file(), name
    log = p.stdout + p.stderr
    assert "Model: decoder" in log and "Tokens per step: 128" in log
    assert "Final: val/loss" in log and "Sample at step 6" in log and "Throughput:" in log
    # Lightning's lines once each: its own handler (on "lightning" from 2.6) is dropped
    assert log.count("GPU available:") == 1
    assert "seq_len: 32" in log  # the composed config is printed
    # torch's FutureWarning about Lightning's own use of LeafSpec, at every fit, is not shown
    assert "LeafSpec" not in log
    assert "litlogger" not in log  # Lightning's advertisement at every Trainer


def test_a_refused_resume_leaves_the_run_folder_as_it_was(cli_run):
    """Hydra writes the attempt's .hydra files before lmlab refuses it, and the tokenizer was saved
    before the resume checks: the run's overrides and tokenizer.json were the refused attempt's."""
    tmp, out, _ = cli_run
    names = (".hydra/overrides.yaml", ".hydra/config.yaml", "tokenizer.json")
    before = {name: (out / name).read_bytes() for name in names}
    args = ["lmlab", "data=files", "data.train=d*.txt", *TINY, f"hydra.run.dir={out}"]
    p = run([*args, "ckpt_path=last", "tokenizer=byte"], tmp, check=False)
    assert p.returncode != 0 and "different tokenizer" in p.stdout + p.stderr
    assert {name: (out / name).read_bytes() for name in names} == before


def test_generate_and_evaluate_commands(cli_run):
    tmp, out, _ = cli_run
    ckpt = out / "checkpoints" / "last.ckpt"
    g = run(
        [
            "lmlab.generate",
            f"ckpt_path={ckpt}",
            "prompt=The king",
            "max_new_tokens=12",
            "temperature=0",
        ],
        tmp,
    )
    assert g.stdout.startswith("The king") and len(g.stdout) > len("The king\n")
    assert not g.stderr
    # conf/generate.yaml turns Hydra's job logging off (stdout: the text only), which silenced
    # lmlab's warnings: a prompt cut to fit the model's 32 positions was never said
    long = run(["lmlab.generate", f"ckpt_path={ckpt}", f"prompt={'The king ' * 20}"], tmp)
    assert "warning: the prompt is " in long.stderr and "the model has 32 positions" in long.stderr
    assert long.stdout.startswith("The king The king")
    (tmp / "held.txt").write_text("Now is the winter of our discontent.\n" * 20)
    e = run(["lmlab.evaluate", f"ckpt_path={ckpt}", "data=files", "data.val=held.txt"], tmp)
    assert "bits/byte" in e.stdout and "(whole split: " in e.stdout
    result = json.loads((out / "evaluate-files.json").read_text())
    assert result["bytes"] == len("Now is the winter of our discontent.\n") * 20


def test_bad_input_is_one_clear_line(tmp_path):
    p = run(
        ["lmlab", "data=files", "data.train=missing/*.txt", f"hydra.run.dir={tmp_path}/r"],
        tmp_path,
        check=False,
    )
    assert p.returncode == 2
    assert "data.train='missing/*.txt' matched no files" in p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    g = run(["lmlab.generate", f"ckpt_path={tmp_path}/nope.ckpt"], tmp_path, check=False)
    assert g.returncode == 2 and "checkpoint not found" in g.stderr


@pytest.mark.parametrize(
    ("command", "says"), [("lmlab.generate", "prompt: ''"), ("lmlab.evaluate", "data=files | hf")]
)
def test_generate_and_evaluate_help_show_their_own_usage(tmp_path, command, says):
    """Not Hydra's stock text, which listed training's config groups that neither command reads."""
    p = run([command, "--help"], tmp_path)
    assert f"Usage: python -m {command} ckpt_path=" in p.stdout and says in p.stdout
    assert "model: decoder" not in p.stdout and "Compose your configuration" not in p.stdout


def test_help_lists_config_groups(tmp_path):
    p = run(["lmlab", "--help"], tmp_path)
    for group in (
        "model: decoder",
        "objective: capital_word, clm, denoise, deshuffle, discourse, ir_relevance, mcp, mlm,",
        "data: files, hf, shakespeare",
        "tokenizer: bpe, byte, pretrained",
        "hydra/launcher: slurm",  # Hydra's own groups are not in its list
    ):
        assert group in p.stdout, group


def test_evaluate_warns_on_stderr_when_the_runs_data_holds_out_other_documents(cli_run):
    """conf/evaluate.yaml turns Hydra's job logging off (stdout: the result line only), which also
    silenced this warning: it never reached the user."""
    from .conftest import make_text

    tmp, out, _ = cli_run
    added = [tmp / f"d{i}.txt" for i in range(4, 14)]  # the split now holds out other documents
    try:
        for i, path in enumerate(added, start=4):
            path.write_text(make_text(600, i))
        ckpt = out / "checkpoints" / "last.ckpt"
        e = run(["lmlab.evaluate", f"ckpt_path={ckpt}", "limit_batches=1"], tmp)
    finally:
        for path in added:
            path.unlink(missing_ok=True)
    assert "warning: the evaluated documents are not the ones" in e.stderr
    last = e.stdout.strip().splitlines()[-1]
    assert last.startswith("loss ") and "(first 1 batches of the split's " in last


def test_a_resume_with_other_values_warns_naming_them(cli_run):
    """A sweep re-run with another value list resumes each job's folder by its number: a job then
    continued another job's run with its own values, without a word."""
    tmp, out, _ = cli_run
    tiny = [o for o in TINY if not o.startswith("trainer.max_steps=")]
    args = ["lmlab", "data=files", "data.train=d*.txt", *tiny, f"hydra.run.dir={out}"]
    p = run([*args, "trainer.max_steps=7", "ckpt_path=last"], tmp)
    log = p.stdout + p.stderr
    assert "with other values than its latest start: trainer.max_steps=7 (was 6)" in log
    # ModelCheckpoint's warning at every resume (the folder is always the run's own) is not shown
    assert "exists and is not empty" not in log
