"""lmlab.report on hand-written run folders (no training): exact table values, order, plot geometry."""

from __future__ import annotations

import csv
import json
import math
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


def test_curves_use_the_logged_tokens_seen_not_the_config(tmp_path: Path) -> None:
    """global_batch_size derives the accumulation at run time and trainer.devices=auto the device
    count: the config's product (4 x 32 = 128 per step here) is wrong, the logged count is not."""
    config = (
        "seq_len: 32\nglobal_batch_size: 24\ndata:\n  batch_size: 4\n"
        "trainer:\n  devices: auto\n  accumulate_grad_batches: 1\n"
    )
    per_step = 24 * 32  # what Throughput counted: 3 micro-batches x 2 devices x 4 x 32
    rows = []
    for s in range(6):
        rows.append({"step": s, "lr-AdamW": 1e-3})  # LearningRateMonitor: no tokens seen
        rows.append(
            {
                "epoch": 0,
                "step": s,
                "train/loss": 5 / (s + 1),
                "train/tokens_seen": per_step * (s + 1),
            }
        )
        if s in (2, 5):
            rows.append(
                {
                    "epoch": 0,
                    "step": s,
                    "val/bpb": 1 / (s + 1),
                    "train/tokens_seen": per_step * (s + 1),
                }
            )
    rows.append({"epoch": 0, "step": 6, "val/bpb": 0.125})  # the validation after training
    rows += [  # a resumed run logs steps 4 and 5 again: the last value of a step wins
        {"epoch": 0, "step": 4, "train/loss": 0.4, "train/tokens_seen": per_step * 5},
        {"epoch": 0, "step": 5, "train/loss": 0.3, "train/tokens_seen": per_step * 6},
    ]
    run_dir = tmp_path / "run"
    write_run(run_dir, [], [], None, config=config)
    with (run_dir / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(
            f,
            fieldnames=["epoch", "lr-AdamW", "step", "train/loss", "train/tokens_seen", "val/bpb"],
        )
        w.writeheader()
        w.writerows(rows)
    (run,) = collect_runs(run_dir)
    assert run.tokens_per_step == 4 * 32 and run.tokens_logged
    tokens, values = run.curves["train/loss"]
    assert tokens == [float(per_step * (s + 1)) for s in range(6)]
    assert values == [5.0, 2.5, 5 / 3, 1.25, 0.4, 0.3]
    # the final validation has no tokens of its own: the last ones logged (all 6 steps)
    assert run.curves["val/bpb"] == (
        [per_step * 3.0, per_step * 6.0, per_step * 6.0],
        [1 / 3, 1 / 6, 0.125],
    )
    assert run.curves["lr-AdamW"][0] == [float(per_step * (s + 1)) for s in range(6)]
    page = build_report(run_dir).read_text()
    assert "their x-axis counts steps" not in page


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
        for key, value in run.overrides.items():  # swept: a column; shared (seed=1): listed once
            if key == "seed":
                assert key not in cells
            else:
                assert cells[key]["data-kind"] == "override" and cells[key]["data-value"] == value
    summary = json.loads((sweep / "1" / "summary.json").read_text())
    assert float(page.rows[0][1]["val/acc"]["data-value"]) == summary["val/acc"]


@pytest.mark.parametrize("maximize", [False, True])
def test_a_diverged_run_ranks_after_every_run_with_a_value(maximize) -> None:
    """A run whose metric is NaN or infinite (it diverged) ranks with the runs without one, after
    every finite value in either direction (NaN compared as a number ranked it first)."""
    from lmlab.report import Run, sort_runs

    values = {"a": 0.5, "nan": math.nan, "b": 0.3, "none": None, "inf": math.inf, "c": 0.4}
    runs = [
        Run(k, Path(k), {}, {} if v is None else {"val/bpb": v}, {}, "finished")
        for k, v in values.items()
    ]
    ranked = [r.name for r in sort_runs(runs, "val/bpb", maximize=maximize)]
    finite = ["b", "c", "a"] if not maximize else ["a", "c", "b"]
    assert ranked == [*finite, "nan", "none", "inf"]  # the rest in their original order


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


# ---------------------------------------------------------------------------------------------------
# W&B Report (--wandb): built offline, inspected, never saved

GROUP = (
    "multirun-2025-01-31-12-00-00"  # sweep_identity of the fixture's multirun/2025-01-31/12-00-00
)
WANDB_CONFIG = """\
wandb_group: null
logger:
  wandb:
    project: lmlab
    entity: team
    group: ${wandb_group}
"""
HYDRA_MULTIRUN = """\
hydra:
  sweep:
    dir: %s
    subdir: ${hydra.job.num}
  mode: MULTIRUN
  job:
    num: %d
"""
DEFAULT_SWEEP_DIR = "${paths.root_dir}/multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}"  # conf/hydra


def as_wandb_sweep(root: Path, sweep_dir: str = DEFAULT_SWEEP_DIR, config: str = WANDB_CONFIG):
    """Make the fixture's runs look like a ``logger=wandb`` multirun (config.yaml, hydra.yaml)."""
    for run_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        (run_dir / ".hydra" / "config.yaml").write_text(CONFIG + config)
        (run_dir / ".hydra" / "hydra.yaml").write_text(
            HYDRA_MULTIRUN % (sweep_dir, int(run_dir.name))
        )
    return root


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails the test."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network call")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def no_credentials(monkeypatch, tmp_path: Path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def report_spec(report, monkeypatch) -> dict:
    """What ``report.save()`` would upload, without the network: the project-id look-ups of the run
    sets (the only server calls before the upload) answered here."""
    from wandb_workspaces.reports.v2 import interface

    queries = []

    def fake_graphql(api, query, variables):
        queries.append(variables)
        return {"project": {"internalId": "project-id"}}

    monkeypatch.setattr(interface, "_get_api", lambda: None)
    monkeypatch.setattr(interface, "execute_graphql", fake_graphql)
    spec = json.loads(report._to_model().spec.model_dump_json(by_alias=True, exclude_none=True))
    assert queries and all(q == {"entityName": "team", "projectName": "lmlab"} for q in queries)
    return spec


def test_wandb_report_filters_the_sweep_group_with_the_html_panels(
    sweep: Path, no_network, monkeypatch
) -> None:
    pytest.importorskip("wandb_workspaces")
    import wandb_workspaces.reports.v2 as wr

    from lmlab.report import build_wandb_report, wandb_target

    runs = collect_runs(as_wandb_sweep(sweep))
    target = wandb_target(runs)
    assert (target.entity, target.project, target.groups) == ("team", "lmlab", [GROUP])
    report = build_wandb_report(runs, target, metric="val/bpb")
    assert isinstance(report, wr.Report)
    assert (report.entity, report.project) == ("team", "lmlab") and GROUP in report.title
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    assert len(grids) == 2
    lines = [p for p in grids[0].panels if isinstance(p, wr.LinePlot)]
    assert [(p.x, p.y) for p in lines] == [
        ("train/tokens_seen", ["val/bpb"]),
        ("train/tokens_seen", ["train/loss"]),
    ]
    assert all(p.title_x == "tokens seen (train/tokens_seen)" for p in lines)
    scatters = [p for p in grids[1].panels if isinstance(p, wr.ScatterPlot)]
    assert [(p.x, p.y, p.log_x) for p in scatters] == [  # the HTML report's scatter plots
        (wr.Config("model"), wr.SummaryMetric("val/bpb"), None),
        (wr.Config("optim.lr"), wr.SummaryMetric("val/bpb"), True),
    ]

    spec = report_spec(report, monkeypatch)
    grid_specs = [b["metadata"] for b in spec["blocks"] if b["type"] == "panel-grid"]
    columns = ["config:model.value", "config:optim.lr.value", "summary:val/bpb"]
    for grid in grid_specs:
        (runset,) = grid["runSets"]
        assert runset["filters"]["filters"] == [
            {
                "key": {"section": "run", "name": "group"},
                "op": "IN",
                "value": [GROUP],
                "disabled": False,
            }
        ]
        assert runset["sort"]["keys"] == [
            {"key": {"section": "summary", "name": "val/bpb"}, "ascending": True}
        ]
        assert runset["runFeed"]["columnOrder"][:3] == columns
        summary_keys = {k for r in runs for k in r.summary}
        assert set(runset["runFeed"]["columnOrder"][2:]) == {f"summary:{k}" for k in summary_keys}
    panels = [[p["config"] for p in g["panelBankSectionConfig"]["panels"]] for g in grid_specs]
    assert [(c["xAxis"], c["metrics"]) for c in panels[0]] == [
        ("train/tokens_seen", ["val/bpb"]),
        ("train/tokens_seen", ["train/loss"]),
    ]
    # flat config keys as lmlab logs them: config["optim.lr"].value, not config["optim"].value.lr
    assert [(c["xAxis"], c["yAxis"]) for c in panels[1][:2]] == [
        ("config:model.value", "summary:val/bpb"),
        ("config:optim.lr.value", "summary:val/bpb"),
    ]
    assert [c["accessor"] for c in panels[1][2]["columns"]] == columns


def test_wandb_report_of_another_metric_adds_its_curve_and_order(sweep: Path, no_network) -> None:
    pytest.importorskip("wandb_workspaces")
    import wandb_workspaces.reports.v2 as wr

    from lmlab.report import build_wandb_report, wandb_target

    runs = collect_runs(as_wandb_sweep(sweep))
    report = build_wandb_report(runs, wandb_target(runs), metric="val/loss", maximize=True)
    grid = next(b for b in report.blocks if isinstance(b, wr.PanelGrid))
    assert [p.y for p in grid.panels] == [["val/bpb"], ["train/loss"], ["val/loss"]]
    (order,) = grid.runsets[0].order
    assert (order.name, order.ascending) == (wr.SummaryMetric("val/loss"), False)


@pytest.mark.parametrize(
    ("sweep_dir", "config", "group"),
    [
        ("/data/sweeps/lr=search", WANDB_CONFIG, "data-sweeps-lr=search"),  # absolute: as typed
        # relative (to the launch folder, which the logger resolves it against): the folder on disk
        ("sw/lr=search", WANDB_CONFIG, "multirun-2025-01-31-12-00-00"),
        (DEFAULT_SWEEP_DIR, WANDB_CONFIG.replace("wandb_group: null", "wandb_group: mine"), "mine"),
    ],
)
def test_wandb_group_follows_the_logger(
    sweep: Path, no_network, sweep_dir: str, config: str, group: str
) -> None:
    pytest.importorskip("wandb_workspaces")
    import wandb_workspaces.reports.v2 as wr

    from lmlab.report import build_wandb_report, saved_filters, wandb_target

    runs = collect_runs(as_wandb_sweep(sweep, sweep_dir, config))
    target = wandb_target(runs)
    assert target.groups == [group]
    grid = next(b for b in build_wandb_report(runs, target).blocks if isinstance(b, wr.PanelGrid))
    # wandb-workspaces would turn "lr=search" into "lr==search" when saving: the exact value is kept
    assert saved_filters(grid.runsets[0])["filters"][0]["value"] == [group]


def test_wandb_group_of_a_sweep_dir_through_a_link_is_the_loggers(
    sweep: Path, tmp_path: Path
) -> None:
    """The logger resolves the sweep folder (links, ..): the report must name the same group."""
    from lmlab.loggers import sweep_identity
    from lmlab.report import wandb_group

    real = tmp_path / "real" / "sw"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    as_wandb_sweep(sweep, str(tmp_path / "link" / "sw"))
    assert wandb_group(sweep / "0") == sweep_identity(str(real), "")[0]


def test_cli_wandb_server_errors_are_one_line_and_keep_the_html(
    sweep: Path, no_network, monkeypatch, capsys
) -> None:
    pytest.importorskip("wandb_workspaces")
    import wandb_workspaces.reports.v2 as wr

    def busy(self, **kw):
        raise RuntimeError("Failed to verify credentials: service process is busy\ntraceback...")

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(wr.Report, "save", busy)
    as_wandb_sweep(sweep)
    assert main([str(sweep), "--wandb"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the W&B Report could not be created (RuntimeError: Failed to")
    assert "the HTML report is written" in err and "traceback" not in err
    assert (sweep / "report.html").is_file()


def test_wandb_target_flags_config_and_environment(sweep: Path, monkeypatch) -> None:
    from lmlab.report import wandb_target

    as_wandb_sweep(sweep, config=WANDB_CONFIG.replace("entity: team", "entity: null"))
    runs = collect_runs(sweep)
    monkeypatch.setenv("WANDB_ENTITY", "env-team")
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    target = wandb_target(runs)
    assert (target.entity, target.project) == ("env-team", "lmlab")  # the config's project wins
    target = wandb_target(runs, entity="me", project="p", group="g")
    assert (target.entity, target.project, target.groups) == ("me", "p", ["g"])
    monkeypatch.delenv("WANDB_ENTITY")
    assert wandb_target(runs).entity is None  # the account's default, looked up before saving
    (sweep / "1" / ".hydra" / "config.yaml").write_text(
        CONFIG + WANDB_CONFIG.replace("project: lmlab", "project: other")
    )
    with pytest.raises(ConfigError, match=r"different W&B logger.wandb.project.*--project"):
        wandb_target(collect_runs(sweep))


def test_wandb_target_needs_wandb_runs_or_a_group(sweep: Path, tmp_path: Path, monkeypatch) -> None:
    from lmlab.report import wandb_target

    monkeypatch.delenv("WANDB_PROJECT", raising=False)

    runs = collect_runs(sweep)  # logger=csv runs
    with pytest.raises(ConfigError, match=r"no run of this sweep was logged to W&B.*--group"):
        wandb_target(runs)
    with pytest.raises(ConfigError, match=r"W&B project .*--project or set WANDB_PROJECT"):
        wandb_target(runs, group="g")
    assert wandb_target(runs, project="p", group="g").groups == ["g"]
    single = write_run(tmp_path / "single", [], rows_for([0], 1, 1.0), None, CONFIG + WANDB_CONFIG)
    with pytest.raises(ConfigError, match=r"cannot tell the W&B group of .*single.*--group"):
        wandb_target(collect_runs(single))


def test_wandb_without_credentials_fails_before_any_work(
    sweep: Path, no_network, no_credentials, capsys
) -> None:
    pytest.importorskip("wandb_workspaces")
    from lmlab.report import create_wandb_report

    as_wandb_sweep(sweep)
    assert main([str(sweep), "--wandb"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --wandb creates the report on the W&B server")
    assert "`wandb login`" in err and "WANDB_API_KEY" in err
    assert not (sweep / "report.html").exists()  # nothing done
    with pytest.raises(ConfigError, match="no credentials"):
        create_wandb_report(sweep)


def test_wandb_without_the_package_names_the_extra(sweep: Path, monkeypatch, capsys) -> None:
    from lmlab import report

    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # import fails
    report._workspaces.cache_clear()
    try:
        assert main([str(sweep), "--wandb"]) == 2
        assert 'pip install -e ".[wandb]"' in capsys.readouterr().err
    finally:
        report._workspaces.cache_clear()


def test_cli_wandb_saves_the_built_report(sweep: Path, no_network, monkeypatch, capsys) -> None:
    pytest.importorskip("wandb_workspaces")
    import wandb_workspaces.reports.v2 as wr

    saved = []
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(wr.Report, "save", lambda self, **kw: saved.append(self) or self)
    monkeypatch.setattr(wr.Report, "url", property(lambda self: "https://wandb.test/report"))
    as_wandb_sweep(sweep)
    assert main([str(sweep), "--wandb", "--project", "p2"]) == 0
    assert capsys.readouterr().out.split() == [
        str(sweep / "report.html"),
        "https://wandb.test/report",
    ]
    (report,) = saved
    assert (report.entity, report.project) == ("team", "p2")
    grid = next(b for b in report.blocks if isinstance(b, wr.PanelGrid))
    assert grid.runsets[0].project == "p2" and GROUP in grid.runsets[0].filters


def test_run_folders_are_found_in_numeric_order(tmp_path: Path) -> None:
    """Multirun jobs 0..11: job 2 before job 10 (text order put 10 and 11 after 1), the order the
    report keeps for runs without the metric."""
    from lmlab.report import find_run_dirs

    for job in range(12):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "summary.json").write_text("{}")
    (tmp_path / "trials" / "9").mkdir(parents=True)  # a search's trial folders likewise
    (tmp_path / "trials" / "9" / "metrics.csv").write_text("step\n")
    (tmp_path / "trials" / "10").mkdir()
    (tmp_path / "trials" / "10" / "metrics.csv").write_text("step\n")
    names = [p.relative_to(tmp_path).as_posix() for p in find_run_dirs(tmp_path)]
    assert names == [str(j) for j in range(12)] + ["trials/9", "trials/10"]


def test_jobs_that_failed_are_marked_so_and_listed_even_without_logs(tmp_path: Path) -> None:
    """sweep_summary.csv (lmlab.sweep) knows how each job ended: a job that failed after logging
    is "failed" with its error (it read "unfinished"), one that failed before writing anything is
    listed too (it was left out silently)."""
    import csv as csv_mod

    sweep = tmp_path / "sweep"
    for job, lr in (("0", "0.001"), ("1", "0.1")):
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / ".hydra" / "overrides.yaml").write_text(f"- optim.lr={lr}\n")
        (sweep / job / "metrics.csv").write_text("step,train/loss\n0,5.0\n")
    (sweep / "0" / "summary.json").write_text('{"val/bpb": 2.5}')
    rows = [
        ("0", "completed", "optim.lr=0.001", ""),
        ("1", "failed", "optim.lr=0.1", "NonFiniteLoss: training loss is nan at step 4: stopping"),
        ("2", "failed", "optim.lr=1.0", "ConfigError: optim.lr=1.0 is out of range"),
    ]
    with (sweep / "sweep_summary.csv").open("w", newline="") as f:
        w = csv_mod.writer(f)
        w.writerow(["job", "status", "overrides", "wall_s", "error", "output_dir"])
        for job, status, overrides, error in rows:
            w.writerow([job, status, overrides, 1.0, error, str(sweep / job)])
    runs = {r.name: r for r in collect_runs(sweep)}
    assert {name: r.status for name, r in runs.items()} == {
        "optim.lr=0.001": "finished",
        "optim.lr=0.1": "failed",
        "optim.lr=1.0": "failed",
    }
    assert runs["optim.lr=0.1"].notes == [rows[1][3]] and runs["optim.lr=1.0"].notes == [rows[2][3]]
    page = build_report(sweep).read_text()
    assert "failed; ConfigError: optim.lr=1.0 is out of range" in page  # its status cell


def test_the_metric_decides_the_order_and_a_contrary_flag_is_refused(sweep: Path, capsys) -> None:
    """val/acc is better higher: without --maximize the report ranked the lowest accuracy best."""
    from lmlab.report import maximize_metric

    assert maximize_metric("val/acc") is True and maximize_metric("val/bpb") is False
    assert maximize_metric("my/score", maximize=True) is True  # unknown: as the flags say
    assert maximize_metric("my/score") is False
    with pytest.raises(ConfigError, match=r"--metric val/acc is better higher: drop --minimize"):
        maximize_metric("val/acc", minimize=True)
    assert main([str(sweep), "--metric", "val/bpb", "--maximize"]) == 2
    assert "val/bpb is better lower: drop --maximize" in capsys.readouterr().err


def test_a_moved_sweep_folder_lists_each_failed_job_once(tmp_path: Path) -> None:
    """sweep_summary.csv records absolute folders: after the sweep was moved a failed job was
    listed twice (its folder, and a row of its own)."""
    import csv as csv_mod
    import shutil

    old = tmp_path / "old"
    for job, lr in (("0", "0.001"), ("1", "0.1")):
        write_run(old / job, [f"optim.lr={lr}"], rows_for([0, 1], 2, 1.0), None)
    (old / "0" / "summary.json").write_text('{"val/bpb": 2.5}')
    with (old / "sweep_summary.csv").open("w", newline="") as f:
        w = csv_mod.writer(f)
        w.writerow(["job", "status", "overrides", "wall_s", "error", "output_dir"])
        w.writerow(["0", "completed", "optim.lr=0.001", 1.0, "", str(old / "0")])
        w.writerow(["1", "preempted", "optim.lr=0.1", 1.0, "Preempted: stop", str(old / "1")])
    moved = tmp_path / "moved"
    shutil.move(old, moved)
    runs = collect_runs(moved)
    assert sorted((r.name, r.status) for r in runs) == [
        ("optim.lr=0.001", "finished"),
        ("optim.lr=0.1", "preempted"),
    ]


def test_a_job_that_failed_early_is_named_by_its_hydra_overrides(tmp_path: Path) -> None:
    """A value with a space: the space-joined overrides of sweep_summary.csv split inside it."""
    import csv as csv_mod

    sweep = tmp_path / "sweep"
    write_run(
        sweep / "0",
        ["model.n_heads=2", 'sample.prompts=["to be"]'],
        rows_for([0], 1, 1.0),
        {"val/bpb": 2.0},
    )
    (sweep / "1" / ".hydra").mkdir(parents=True)  # Hydra wrote it; the job failed before logging
    (sweep / "1" / ".hydra" / "overrides.yaml").write_text(
        '- model.n_heads=3\n- sample.prompts=["to be"]\n'
    )
    with (sweep / "sweep_summary.csv").open("w", newline="") as f:
        w = csv_mod.writer(f)
        w.writerow(["job", "status", "overrides", "wall_s", "error", "output_dir"])
        w.writerow(
            [
                "1",
                "failed",
                'model.n_heads=3 sample.prompts=["to be"]',
                1.0,
                "ConfigError: model.d_model=32 must be divisible by model.n_heads=3",
                str(sweep / "1"),
            ]
        )
    runs = collect_runs(sweep)
    assert sorted(r.name for r in runs) == ["model.n_heads=2", "model.n_heads=3"]
    assert swept_parameters(runs) == ["model.n_heads"]


def test_files_that_are_not_utf8_are_read_not_fatal(sweep: Path) -> None:
    (sweep / "0" / "summary.json").write_bytes(b'{"val/bpb": 1.0, "note": "\xff"}')
    with (sweep / "1" / "metrics.csv").open("ab") as f:
        f.write(b"0,9,\xfe\xff,,\n")
    runs = {r.path.name: r for r in collect_runs(sweep)}
    assert runs["0"].summary["val/bpb"] == 1.0


def test_runs_with_other_tokenizers_are_not_ranked_per_token_without_a_warning(
    tmp_path: Path, caplog
) -> None:
    """A byte and a BPE run: val/loss ranked the byte run best (fewer nats per easier token),
    val/bpb the BPE run; per-token metrics now carry a warning, bits per byte none."""
    import logging

    sweep = tmp_path / "sweep"
    for job, kind, loss, bpb in (("0", "byte", 5.3, 7.6), ("1", "bpe", 6.1, 5.7)):
        config = CONFIG + f"tokenizer:\n  kind: {kind}\n  vocab_size: 512\n"
        summary = {"val/loss": loss, "val/bpb": bpb}
        write_run(sweep / job, [f"tokenizer={kind}"], rows_for([0], 1, 1.0), summary, config)
    with caplog.at_level(logging.WARNING, logger="lmlab.report"):
        page = build_report(sweep, metric="val/loss").read_text()
    assert 'id="tokenizers"' in page and "rank them by bits per byte" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmlab.report"):
        page = build_report(sweep, metric="val/bpb").read_text()
    assert 'id="tokenizers"' not in page and not caplog.text


def test_equal_tokenizer_settings_with_other_trained_tokenizers_are_told_apart(
    tmp_path: Path, caplog
) -> None:
    """A data sweep: the same BPE settings trained on other splits give other tokenizers; the
    warning compared the settings only. The runs' tokenizer.json files tell them apart."""
    import logging

    sweep = tmp_path / "sweep"
    config = CONFIG + "tokenizer:\n  kind: bpe\n  vocab_size: 512\n"
    for job, fraction, vocab in (("0", "0.05", '{"a": 0}'), ("1", "0.5", '{"b": 0}')):
        summary = {"val/loss": 5.0 + int(job), "val/bpb": 6.0}
        run = write_run(
            sweep / job, [f"data.val_fraction={fraction}"], rows_for([0], 1, 1.0), summary, config
        )
        (run / "tokenizer.json").write_text(vocab)
    with caplog.at_level(logging.WARNING, logger="lmlab.report"):
        page = build_report(sweep, metric="val/loss").read_text()
    assert 'id="tokenizers"' in page and "rank them by bits per byte" in caplog.text
    (sweep / "1" / "tokenizer.json").write_text('{"a": 0}')  # the same file: no warning
    assert 'id="tokenizers"' not in build_report(sweep, metric="val/loss").read_text()


def test_a_resumed_sweeps_ckpt_path_is_not_a_swept_parameter_and_headers_are_escaped(
    tmp_path: Path,
) -> None:
    """Jobs resumed by a sweep re-run keep ckpt_path=auto in their overrides, finished ones not:
    ckpt_path showed as swept (a column, a scatter plot, in the best run's name). Header names
    come from overrides too and were not escaped."""
    write_run(tmp_path / "0", ["optim.lr=1e-3", "x<i>=1"], rows_for([0], 1, 1.0), {"val/bpb": 2.0})
    write_run(
        tmp_path / "1",
        ["optim.lr=2e-3", "x<i>=2", "ckpt_path=auto"],
        rows_for([0], 1, 1.0),
        {"val/bpb": 1.0},
    )
    runs = collect_runs(tmp_path)
    assert swept_parameters(runs) == ["optim.lr", "x<i>"]
    assert runs[1].name == "optim.lr=2e-3, x<i>=2"
    page = build_report(tmp_path).read_text()
    assert "ckpt_path" not in page and "<i>" not in page and "x&lt;i&gt;" in page


def test_overrides_every_run_shares_are_listed_once_not_as_columns(sweep: Path) -> None:
    """A sweep launched with debug=fast paths.cache_dir=... had a column of each, equal in every
    row; they are listed above the table."""
    page = build_report(sweep).read_text()
    assert '<p id="common">Every run: <code>seed=1</code></p>' in page
    assert 'data-key="seed"' not in page and 'data-key="optim.lr"' in page


def test_a_relative_sweep_folder_with_a_failed_twin_of_a_run_is_read(
    tmp_path: Path, monkeypatch
) -> None:
    """Two runs of the same overrides, one a failed job known from sweep_summary.csv alone (its
    absolute output_dir): named by their folders; with the sweep given as a relative path, this
    raised "not in the subpath" (a moved sweep's resumed rows made such twins)."""
    from lmlab.report import collect_runs

    root = tmp_path / "sw"
    rows = rows_for(list(range(4)), 2, 1.0)
    write_run(root / "0", ["optim.lr=0.1"], rows, summary_of(rows))
    with (root / "sweep_summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["job", "status", "overrides", "output_dir"])
        w.writeheader()
        w.writerow({"job": 0, "status": "completed", "overrides": "optim.lr=0.1",
                    "output_dir": str(root / "0")})  # fmt: skip
        w.writerow({"job": 1, "status": "failed", "overrides": "optim.lr=0.1",
                    "output_dir": str(root / "1")})  # fmt: skip
    monkeypatch.chdir(tmp_path)
    runs = collect_runs("sw")
    assert sorted((r.name, r.status) for r in runs) == [
        ("optim.lr=0.1 (0)", "finished"),
        ("optim.lr=0.1 (1)", "failed"),
    ]
