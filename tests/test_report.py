"""lmlab.report on hand-written run folders (no training): exact table values, order, plot geometry."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lmlab.errors import ConfigError
from lmlab.report import build_report, collect_runs, main, swept_parameters

METRICS = ["train/loss", "val/loss", "val/bpb"]
CONFIG = """\
seq_len: 32
data:
  name: files
  batch_size: 4
trainer:
  accumulate_grad_batches: 2
  devices: 1
  num_nodes: 1
"""
TOKENS_PER_STEP = 4 * 32 * 2


def write_run(
    run_dir: Path,
    overrides: list[str],
    rows: list[dict],
    summary: dict | None,
    config: str | None = CONFIG,
) -> Path:
    """A run folder as training leaves it: metrics.csv, .hydra/*, summary.json when finished."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        "".join(f"- {o}\n" for o in overrides) if overrides else "[]\n"
    )
    if config is not None:
        (run_dir / ".hydra" / "config.yaml").write_text(config)
    with (run_dir / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["epoch", "step", *METRICS])
        w.writeheader()
        for row in rows:
            w.writerow(row)
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return run_dir


def rows_for(steps: list[int], val_every: int, scale: float) -> list[dict]:
    """train/loss rows at every step, val rows every ``val_every`` steps (Lightning's layout)."""
    rows = []
    for s in steps:
        rows.append({"epoch": 0, "step": s, "train/loss": scale * 5 / (s + 1)})
        if (s + 1) % val_every == 0:
            rows.append(
                {"epoch": 0, "step": s, "val/loss": scale * 4 / (s + 1), "val/bpb": scale / (s + 1)}
            )
    return rows


def summary_of(rows: list[dict], **extra: float) -> dict:
    last = {}
    for r in rows:
        last.update({k: v for k, v in r.items() if k in METRICS})
    return {**last, "trainer/global_step": float(rows[-1]["step"] + 1), "wall_s": 1.25, **extra}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Four jobs of multirun/<date>/<time>/<n>: lr swept (log range), model swept (strings),
    seed constant; job 2 unfinished; job 3 resumed (steps 4..5 logged twice)."""
    root = tmp_path / "multirun" / "2025-01-31" / "12-00-00"
    specs = [
        (["optim.lr=0.0001", "model=gpt", "seed=1"], 1.0, 8),
        (["optim.lr=0.001", "model=llama", "seed=1"], 0.5, 8),
        (["optim.lr=0.01", "model=gpt", "seed=1"], 0.8, 6),  # unfinished
        (["optim.lr=0.1", "model=llama", "seed=1"], 0.7, 8),  # resumed
    ]
    for n, (overrides, scale, n_steps) in enumerate(specs):
        rows = rows_for(list(range(n_steps)), 2, scale)
        if n == 3:  # a resume from the step-4 checkpoint logs steps 4.. again, with new values
            rows = rows_for(list(range(6)), 2, 9.0) + rows_for(list(range(4, 8)), 2, scale)
        summary = None if n == 2 else summary_of(rows, **({"val/acc": 0.25} if n == 1 else {}))
        write_run(root / str(n), overrides, rows, summary)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


class Page(HTMLParser):
    """Collects the runs table (cells' data-* attributes), row classes and SVG elements."""

    def __init__(self, text: str):
        super().__init__()
        self.rows: list[tuple[list[str], dict[str, dict[str, str]]]] = []
        self.svgs: dict[str, dict] = {}
        self.unfinished: list[str] = []
        self._in_table = False
        self._svg: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs_list: list) -> None:
        attrs = {k: v or "" for k, v in attrs_list}
        if tag == "table" and attrs.get("id") == "runs":
            self._in_table = True
        elif self._in_table and tag == "tr" and "class" in attrs:
            self.rows.append((attrs["class"].split(), {}))
        elif self._in_table and tag == "td" and self.rows:
            self.rows[-1][1][attrs["data-key"]] = attrs
        elif tag == "svg":
            self._svg = attrs["id"]
            self.svgs[self._svg] = {"attrs": attrs, "polylines": {}, "circles": []}
        elif self._svg and tag == "polyline":
            points = [tuple(map(float, p.split(","))) for p in attrs["points"].split()]
            self.svgs[self._svg]["polylines"][attrs["data-run"]] = points
        elif self._svg and tag == "circle" and "data-run" in attrs:
            self.svgs[self._svg]["circles"].append(attrs)
        elif tag == "li" and "data-run" in attrs:
            self.unfinished.append(attrs["data-run"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_table = False
        elif tag == "svg":
            self._svg = None


def render(sweep: Path, **kw) -> Page:
    return Page(build_report(sweep, **kw).read_text())


def test_collect_runs_reads_every_folder(sweep: Path) -> None:
    runs = {r.path.name: r for r in collect_runs(sweep)}
    assert sorted(runs) == ["0", "1", "2", "3"]
    assert runs["0"].name == "optim.lr=0.0001, model=gpt"  # named by what differs: seed=1 is shared
    assert runs["0"].overrides == {"optim.lr": "0.0001", "model": "gpt", "seed": "1"}
    assert [runs[n].status for n in "0123"] == ["finished", "finished", "unfinished", "finished"]
    assert runs["2"].summary == {}
    assert runs["1"].summary == json.loads((sweep / "1" / "summary.json").read_text())
    assert all(r.tokens_per_step == TOKENS_PER_STEP for r in runs.values())
    tokens, values = runs["0"].curves["train/loss"]
    assert tokens == [float((s + 1) * TOKENS_PER_STEP) for s in range(8)]
    assert values == [5 / (s + 1) for s in range(8)]
    tokens, values = runs["0"].curves["val/bpb"]
    assert tokens == [float(s * TOKENS_PER_STEP) for s in (2, 4, 6, 8)]
    assert values == [1.0 / s for s in (2, 4, 6, 8)]


def test_resumed_run_keeps_last_value_of_each_step(sweep: Path) -> None:
    run = next(r for r in collect_runs(sweep) if r.path.name == "3")
    tokens, values = run.curves["train/loss"]
    assert tokens == [float((s + 1) * TOKENS_PER_STEP) for s in range(8)]  # 8 steps, not 12
    assert values[:4] == [9.0 * 5 / (s + 1) for s in range(4)]  # before the resume
    assert values[4:] == [0.7 * 5 / (s + 1) for s in range(4, 8)]  # the re-logged steps win
    assert run.curves["val/bpb"][1] == [9.0 / 2, 9.0 / 4, 0.7 / 6, 0.7 / 8]


def test_tokens_per_step_defaults_to_one_for_missing_or_non_int_keys(tmp_path: Path) -> None:
    config = (
        "seq_len: ${data.window}\ndata:\n  batch_size: 3\n  window: 16\ntrainer:\n  devices: auto\n"
    )
    write_run(tmp_path / "a", [], rows_for([0, 1], 1, 1.0), None, config=config)
    write_run(tmp_path / "b", [], rows_for([0, 1], 1, 1.0), None, config=None)
    a, b = collect_runs(tmp_path)
    assert (a.tokens_per_step, b.tokens_per_step) == (3 * 16, 1)  # interpolation resolved
    assert (a.name, b.name) == ("a", "b")  # no overrides: the folder name
    assert b.curves["train/loss"][0] == [1.0, 2.0]


def test_swept_parameters_are_the_keys_that_differ(sweep: Path) -> None:
    runs = collect_runs(sweep)
    assert swept_parameters(runs) == ["model", "optim.lr"]
    page = render(sweep)
    assert sorted(k for k in page.svgs if k.startswith("scatter-")) == [
        "scatter-model",
        "scatter-optim.lr",
    ]  # seed is constant: no plot
    assert page.svgs["scatter-optim.lr"]["attrs"]["data-scale"] == "log"
    assert page.svgs["scatter-model"]["attrs"]["data-scale"] == "categorical"
    # one point per finished run; categories evenly spaced, gpt left of llama
    circles = page.svgs["scatter-model"]["circles"]
    assert len(circles) == 3
    xs = {c["data-x"]: float(c["cx"]) for c in circles}
    assert xs["gpt"] < xs["llama"]
    # log axis: the four decades 1e-4, 1e-3, 1e-1 (1e-2 unfinished) are equally spaced per decade
    lr = {float(c["data-x"]): float(c["cx"]) for c in page.svgs["scatter-optim.lr"]["circles"]}
    assert lr[1e-3] - lr[1e-4] == pytest.approx((lr[1e-1] - lr[1e-3]) / 2, abs=0.02)


def test_a_key_missing_from_some_runs_is_swept(tmp_path: Path) -> None:
    write_run(tmp_path / "0", ["a=1", "b=x"], rows_for([0], 1, 1.0), None)
    write_run(tmp_path / "1", ["a=1"], rows_for([0], 1, 1.0), None)
    assert swept_parameters(collect_runs(tmp_path)) == ["b"]


def test_table_values_equal_summaries_sorted_best_first(sweep: Path) -> None:
    page = render(sweep)
    by_name = {r.name: r for r in collect_runs(sweep)}
    names = [cells["run"]["data-value"] for _, cells in page.rows]
    bpb = [by_name[n].summary.get("val/bpb") for n in names]
    finished = [b for b in bpb if b is not None]
    assert finished == sorted(finished) and len(finished) == 3
    assert bpb[-1] is None  # the unfinished run last
    assert names[0] == "optim.lr=0.001, model=llama"  # scale 0.5: lowest val/bpb
    all_keys = {k for r in by_name.values() for k in r.summary}
    for classes, cells in page.rows:
        run = by_name[cells["run"]["data-value"]]
        assert ("best" in classes) == (cells is page.rows[0][1])
        assert run.status in classes and cells["status"]["data-value"] == run.status
        for key in all_keys:  # every summary key is a column, exact values, empty when absent
            assert cells[key]["data-kind"] == "metric"
            if key in run.summary:
                assert float(cells[key]["data-value"]) == run.summary[key]
            else:
                assert "data-value" not in cells[key]
        for key, value in run.overrides.items():
            assert cells[key]["data-kind"] == "override" and cells[key]["data-value"] == value
    summary = json.loads((sweep / "1" / "summary.json").read_text())
    assert float(page.rows[0][1]["val/acc"]["data-value"]) == summary["val/acc"]


def test_maximize_reverses_the_order(sweep: Path) -> None:
    page = render(sweep, metric="val/loss", maximize=True)
    names = [cells["run"]["data-value"] for _, cells in page.rows]
    assert names[0] == "optim.lr=0.0001, model=gpt"  # scale 1.0: highest val/loss
    assert "best" in page.rows[0][0]


def test_unfinished_run_is_listed_and_marked(sweep: Path) -> None:
    page = render(sweep)
    assert page.unfinished == ["optim.lr=0.01, model=gpt"]
    classes, cells = page.rows[-1]
    assert "unfinished" in classes and "best" not in classes
    assert cells["run"]["data-value"] == "optim.lr=0.01, model=gpt"


@pytest.mark.parametrize("metric", ["val/bpb", "train/loss"])
def test_curve_plots_one_line_per_run_spanning_the_axis(sweep: Path, metric: str) -> None:
    page = render(sweep)
    svg = page.svgs[f"curve-{metric}"]
    left, right = float(svg["attrs"]["data-left"]), float(svg["attrs"]["data-right"])
    runs = collect_runs(sweep)
    assert set(svg["polylines"]) == {r.name for r in runs}
    lo = min(t for r in runs for t in r.curves[metric][0])
    hi = max(t for r in runs for t in r.curves[metric][0])
    for r in runs:
        tokens = r.curves[metric][0]
        points = svg["polylines"][r.name]
        assert len(points) == len(tokens)  # one point per (de-duplicated) logged step
        xs = [x for x, _ in points]
        assert xs == sorted(xs)
        for t, x in ((tokens[0], xs[0]), (tokens[-1], xs[-1])):
            assert x == pytest.approx(left + (t - lo) / (hi - lo) * (right - left), abs=0.01)
    assert min(p[0][0] for p in svg["polylines"].values()) == left
    assert max(p[-1][0] for p in svg["polylines"].values()) == right
    # the curves fall: their last point is drawn lower (SVG y grows downwards)
    assert all(p[0][1] < p[-1][1] for p in svg["polylines"].values())


def test_report_is_self_contained(sweep: Path) -> None:
    text = build_report(sweep, out=sweep / "sub" / "r.html").read_text()
    assert (sweep / "sub" / "r.html").is_file()
    assert (
        "<script" not in text
        and "<link" not in text
        and "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    )
    assert text.count("<svg") == 2 + 2  # two curves + two swept parameters
    assert build_report(sweep) == sweep / "report.html"  # default location
    assert len(collect_runs(sweep)) == 4  # the report is not taken for a run


def test_metric_that_no_run_has_is_an_error(sweep: Path) -> None:
    with pytest.raises(ConfigError, match=r"val/nope.*choose one of: .*val/bpb"):
        build_report(sweep, metric="val/nope")


def test_missing_or_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'nope'} does not exist"):
        collect_runs(tmp_path / "nope")
    (tmp_path / "empty" / "0" / ".hydra").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"empty holds no runs.*summary\.json or a metrics\.csv"):
        build_report(tmp_path / "empty")
    assert main([str(tmp_path / "nope")]) == 2


def test_cli_writes_the_report_and_fails_cleanly(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    ok = subprocess.run(
        [sys.executable, "-m", "lmlab.report", str(sweep), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(out)
    assert len(Page(out.read_text()).rows) == 4
    bad = subprocess.run(
        [sys.executable, "-m", "lmlab.report", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: sweep folder ") and str(tmp_path / "missing") in bad.stderr
