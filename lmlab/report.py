"""``python -m lmlab.report <sweep_dir> [--out report.html] [--metric val/bpb]``: compare the runs of a sweep.

Builds one self-contained HTML file (no network, no external JS/CSS; the plots are inline SVG written
here) from every run folder under ``sweep_dir`` (Hydra's ``multirun/<date>/<time>/<job num>/``, at any
depth): a table of final metrics sorted by the optimised metric, learning curves against tokens seen,
and one scatter plot per swept parameter. A folder is a run when it holds ``summary.json`` (written at
the end of training: finished) or ``metrics.csv`` (written while training: unfinished without a summary).
The sweep's ``sweep_summary.csv`` (lmlab.sweep) marks the jobs that failed or were preempted, with
their error, and lists those that failed before writing either.

``--wandb`` also creates a W&B Report (``wandb-workspaces``, ``pip install -e ".[wandb]"``) for the
sweep's W&B group with the same panels: :func:`build_wandb_report` builds it without any network call,
only ``Report.save()`` talks to the server.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import html
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from lmlab.errors import ConfigError

log = logging.getLogger(__name__)

# the x axis of the learning curves: input tokens trained on, logged by lmlab.callbacks.Throughput
# on the training rows it writes and with every validation
TOKENS_SEEN = "train/tokens_seen"
# Runs from before that column: keys whose product is the number of tokens one optimizer step
# consumes (1 where missing / not an int). Only an estimate: wrong where the accumulation is derived
# at run time (global_batch_size) or the device count is not an int (trainer.devices=auto).
TOKENS_PER_STEP_KEYS = (
    "data.batch_size",
    "seq_len",
    "trainer.accumulate_grad_batches",
    "trainer.devices",
    "trainer.num_nodes",
)
CURVES = ("val/bpb", "train/loss")  # always plotted against tokens seen
# matplotlib's tab10: distinguishable, colour-blind-friendlier than a rainbow
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


# ---------------------------------------------------------------------------------------------------
# reading runs


@dataclass
class Run:
    """One run folder of a sweep."""

    name: str  # overrides joined by ", ", or the folder name when there are none
    path: Path
    overrides: dict[
        str, str
    ]  # key -> value as typed (``+``/``++``/``~`` prefixes dropped from keys)
    summary: dict[str, float]  # summary.json; empty for an unfinished run
    curves: dict[str, tuple[list[float], list[float]]]  # metric -> (tokens seen, values), by step
    status: str  # "finished" (summary.json present), "unfinished", or as sweep_summary.csv says
    # of a job that did not finish: "failed", "preempted"
    tokens_per_step: int = 1  # from the config: the x axis where train/tokens_seen is missing
    tokens_logged: bool = False  # metrics.csv has train/tokens_seen: the x axis is exact
    notes: list[str] = field(default_factory=list)  # problems met while reading the folder
    tokenizer: str | None = None  # the config's tokenizer settings (None: unreadable)


def find_run_dirs(sweep_dir: Path) -> list[Path]:
    """Folders under ``sweep_dir`` (itself included) holding ``summary.json`` or ``metrics.csv``.

    A run folder's own subfolders (checkpoints, .hydra, ...) are not searched further."""
    found = []
    for root, dirs, files in os.walk(sweep_dir):
        if "summary.json" in files or "metrics.csv" in files:
            found.append(Path(root))
            dirs.clear()
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found, key=_natural)


def _natural(path: Path) -> list:
    """Sort key of a path that orders numbered folders as numbers: job 2 before job 10."""
    return [
        [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", part) if t]
        for part in path.parts
    ]


# Keys that say how a job was started, not what it trains: left out of the runs' overrides (as of
# their names, conf/hydra/default.yaml's exclude_keys); a resumed sweep's jobs carry ckpt_path=auto
# and its finished ones not, which made it look swept.
START_KEYS = ("ckpt_path",)


def parse_overrides(lines: list) -> dict[str, str]:
    """``["optim.lr=0.001", "+x=1", "~y"]`` -> ``{"optim.lr": "0.001", "x": "1", "y": ""}``
    (:data:`START_KEYS` left out)."""
    out = {}
    for item in lines:
        key, _, value = str(item).partition("=")
        if key.lstrip("+~") not in START_KEYS:
            out[key.lstrip("+~")] = value
    return out


# Metrics per token: they do not compare between runs whose tokenizers differ (val/bpb does)
PER_TOKEN = ("val/loss", "val/ppl", "val/acc", "train/loss", "train/ppl")


def read_overrides(path: Path) -> dict[str, str]:
    """A ``.hydra/overrides.yaml`` (or a kept copy of one) as key -> value; raises
    ``yaml.YAMLError`` or ``TypeError`` for a file that is not a YAML list."""
    return parse_overrides(yaml.safe_load(path.read_text(errors="replace")) or [])


def read_config(config_path: Path) -> Any:
    """The run's saved ``.hydra/config.yaml``; None when missing or unreadable (a truncated file
    must not stop the report)."""
    if not config_path.is_file():
        return None
    try:
        return OmegaConf.load(config_path)
    except Exception as e:
        log.warning("cannot read %s: %s", config_path, e)
        return None


def tokenizer_of(cfg: Any, run_dir: Path | None = None) -> str | None:
    """What tells runs whose tokens differ apart: the hash of the run's ``tokenizer.json`` (a BPE
    is trained on each run's training split, so equal settings can give other tokenizers), else
    its tokenizer settings (``tokenizer`` of its config) as one string; None without either."""
    saved = run_dir / "tokenizer.json" if run_dir is not None else None
    if saved is not None and saved.is_file():
        return hashlib.sha256(saved.read_bytes()).hexdigest()
    try:
        section = OmegaConf.select(cfg, "tokenizer", default=None) if cfg is not None else None
        if section is None:
            return None
        return json.dumps(OmegaConf.to_container(section, resolve=False), sort_keys=True)
    except Exception:  # not a mapping, or interpolations that do not resolve
        return None


def mixed_tokenizers(runs: list[Run], metric: str) -> str | None:
    """A warning when ``metric`` counts per token and the runs' tokenizers differ."""
    if metric not in PER_TOKEN or len({r.tokenizer for r in runs if r.tokenizer}) < 2:
        return None
    return (
        f"the runs use different tokenizers: {metric} is per token and does not compare across "
        "them (a coarser tokenizer has fewer, harder tokens); rank them by bits per byte "
        "(--metric val/bpb)"
    )


def tokens_per_step_of(cfg: Any) -> int:
    """Product of the keys in ``TOKENS_PER_STEP_KEYS`` in the run's config (1 for each missing one,
    and 1 without a config)."""
    if cfg is None:
        return 1
    total = 1
    for key in TOKENS_PER_STEP_KEYS:
        try:  # the saved config may hold interpolations: resolve them, give up on custom resolvers
            value = OmegaConf.select(cfg, key, default=None)
        except Exception:
            value = None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            total *= value
    return total


def read_metrics_csv(path: Path) -> dict[str, dict[int, float]]:
    """metric -> {step: value}. A step logged twice (a resumed run) keeps its last value; empty
    cells (a row holds a subset of the metrics) and non-finite values are skipped."""
    return {m: {s: v for s, (_, v) in by_step.items()} for m, by_step in _read_rows(path).items()}


def _read_rows(path: Path) -> dict[str, dict[int, tuple[float | None, float]]]:
    """metric -> {step: (train/tokens_seen of the same row or None, value)}, as read_metrics_csv."""
    by_metric: dict[str, dict[int, tuple[float | None, float]]] = {}
    with path.open(newline="", errors="replace") as f:
        for row in csv.DictReader(f):
            try:
                step = int(float(row.get("step") or ""))
            except ValueError:
                continue
            values = {}
            for key, cell in row.items():
                if key in (None, "step", "epoch") or not cell:
                    continue
                try:
                    value = float(cell)
                except (TypeError, ValueError):
                    continue
                if math.isfinite(value):
                    values[key] = value
            tokens = values.get(TOKENS_SEEN)
            for key, value in values.items():
                by_metric.setdefault(key, {})[step] = (tokens, value)
    return by_metric


def last_logged(path: Path, prefix: str) -> dict[str, float]:
    """The value at the last logged step of each ``prefix`` metric of a metrics.csv (none without
    the file)."""
    rows = _read_rows(path) if path.is_file() else {}
    return {k: by_step[max(by_step)][1] for k, by_step in rows.items() if k.startswith(prefix)}


def read_curves(
    path: Path, tokens_per_step: int
) -> tuple[dict[str, tuple[list[float], list[float]]], bool]:
    """(metric -> (tokens seen, values) by step, whether tokens seen were logged) from metrics.csv.

    Each value is placed at the ``train/tokens_seen`` logged in its own row (Lightning writes a
    validation's metrics and tokens seen in one row); a row without it (the learning rate, the
    validation after training) takes the last one logged at its step or before. Only runs that
    never logged it (older runs) fall back to ``(step + 1) * tokens_per_step`` from the config:
    Lightning's ``step`` counts the optimizer steps finished before the row's step."""
    rows = _read_rows(path)
    logged = sorted((s, t) for s, (t, _) in rows.get(TOKENS_SEEN, {}).items() if t is not None)
    curves = {}
    for metric, by_step in rows.items():
        steps = sorted(by_step)
        xs = []
        for s in steps:
            tokens = by_step[s][0]
            if tokens is None:
                before = [t for ls, t in logged if ls <= s]
                tokens = before[-1] if before else float((s + 1) * tokens_per_step)
            xs.append(float(tokens))
        curves[metric] = (xs, [by_step[s][1] for s in steps])
    return curves, bool(logged)


def read_run(path: Path, sweep_dir: Path) -> Run:
    notes: list[str] = []
    overrides: dict[str, str] = {}
    ov_path = path / ".hydra" / "overrides.yaml"
    if ov_path.is_file():
        try:
            overrides = read_overrides(ov_path)
        except (yaml.YAMLError, TypeError) as e:
            notes.append(f"unreadable .hydra/overrides.yaml: {e}")
    summary: dict[str, float] = {}
    status = "unfinished"
    if (path / "summary.json").is_file():
        try:
            raw = json.loads((path / "summary.json").read_text(errors="replace"))
            summary = {
                k: float(v)
                for k, v in raw.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
            status = "finished"
        except (json.JSONDecodeError, AttributeError) as e:
            notes.append(f"unreadable summary.json: {e}")
    config = read_config(path / ".hydra" / "config.yaml")
    tokens_per_step = tokens_per_step_of(config)
    curves, tokens_logged = {}, False
    if (path / "metrics.csv").is_file():
        curves, tokens_logged = read_curves(path / "metrics.csv", tokens_per_step)
    rel = path.relative_to(sweep_dir).as_posix()
    name = ", ".join(f"{k}={v}" for k, v in overrides.items()) or (path.name if rel == "." else rel)
    return Run(
        name,
        path,
        overrides,
        summary,
        curves,
        status,
        tokens_per_step,
        tokens_logged,
        notes,
        tokenizer_of(config, path),
    )


def job_overrides(out: Path, joined: str) -> dict[str, str]:
    """A job's overrides: its ``.hydra/overrides.yaml`` (Hydra writes it before the job runs),
    else the space-joined ones of its ``sweep_summary.csv`` row (a value with spaces is split)."""
    path = out / ".hydra" / "overrides.yaml"
    if path.is_file():
        try:
            return read_overrides(path)
        except (yaml.YAMLError, TypeError):
            pass
    return parse_overrides(joined.split())


def job_outcomes(runs: list[Run], sweep_dir: Path) -> list[Run]:
    """What ``sweep_summary.csv`` (lmlab.sweep) says of the jobs that did not finish: a run without
    a summary is marked ``failed`` or ``preempted``, with the error as a note; a job that failed
    before writing anything gets a row of its own (returned), named by its overrides."""
    path = sweep_dir / "sweep_summary.csv"
    if not path.is_file():
        return []
    with path.open(newline="", errors="replace") as f:
        rows = [r for r in csv.DictReader(f) if r.get("status") in ("failed", "preempted")]
    by_dir = {r.path.resolve(): r for r in runs}
    extra = []
    for row in rows:
        out = Path(row.get("output_dir") or "")
        run = by_dir.get(out.resolve()) if row.get("output_dir") else None
        if run is None and row.get("output_dir"):
            # a sweep folder moved or copied since: the job's folder by its place in the sweep
            for tail in (Path(out.name), Path(out.parent.name) / out.name):
                run = by_dir.get((sweep_dir / tail).resolve())
                if run is not None:
                    break
        note = (row.get("error") or "").splitlines()[0][:200] if row.get("error") else ""
        if run is None:
            overrides = job_overrides(out, row.get("overrides") or "")
            name = (
                ", ".join(f"{k}={v}" for k, v in overrides.items()) or f"job {row.get('job', '?')}"
            )
            if not out.resolve().is_relative_to(sweep_dir.resolve()):
                out = sweep_dir  # a row from elsewhere: named by its overrides alone
            run = Run(name, out, overrides, {}, {}, "unfinished", 1, False, [])
            extra.append(run)
        if run.status != "finished":
            run.status = row["status"]
            if note:
                run.notes.append(note)
    return extra


def collect_runs(sweep_dir: str | Path) -> list[Run]:
    """Every run under ``sweep_dir``, in folder order. Raises ConfigError when there is none."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(
            f"sweep folder {sweep_dir} does not exist (or is not a folder): pass a sweep's output "
            "folder such as multirun/<date>/<time>, holding one run folder per job"
        )
    runs = [read_run(p, sweep_dir) for p in find_run_dirs(sweep_dir)]
    runs += job_outcomes(runs, sweep_dir)
    if not runs:
        raise ConfigError(
            f"sweep folder {sweep_dir} holds no runs: it should contain run folders (at any depth, "
            "e.g. <job num>/) with a summary.json or a metrics.csv"
        )
    swept = swept_parameters(runs)
    if swept:  # name runs by what differs between them; the shared overrides are in the table
        for run in runs:
            run.name = ", ".join(f"{k}={v}" for k, v in run.overrides.items() if k in swept)
    seen: dict[str, int] = {}
    for run in runs:  # same overrides twice (e.g. two sweeps in one folder): add the folder
        seen[run.name] = seen.get(run.name, 0) + 1
    for run in runs:
        if seen[run.name] > 1:
            try:  # a row's folder may be absolute where sweep_dir is relative
                where = run.path.resolve().relative_to(sweep_dir.resolve()).as_posix()
            except ValueError:
                where = str(run.path)
            run.name = f"{run.name} ({where})"
    return runs


def swept_parameters(runs: list[Run]) -> list[str]:
    """Override keys whose value differs between runs (a key missing from some runs differs)."""
    keys = sorted({k for r in runs for k in r.overrides})
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def maximize_metric(metric: str, maximize: bool = False, minimize: bool = False) -> bool:
    """Whether higher is better for ``metric``: as lmlab knows it (``lmlab.sweep``), or as
    ``--maximize`` / ``--minimize`` say for a metric it does not know; a choice against the metric
    is refused (a report ranked the lowest accuracy best)."""
    from lmlab.sweep import HIGHER_IS_BETTER, LOWER_IS_BETTER

    if metric not in HIGHER_IS_BETTER and metric not in LOWER_IS_BETTER:
        return maximize  # a metric lmlab does not know: as the flags say (default lower)
    higher = metric in HIGHER_IS_BETTER
    if (maximize and not higher) or (minimize and higher):
        better, flag = ("higher", "--maximize") if higher else ("lower", "--minimize")
        raise ConfigError(
            f"--metric {metric} is better {better}: drop --{'minimize' if higher else 'maximize'} "
            f"(or pass {flag})"
        )
    return higher


def sort_runs(runs: list[Run], metric: str, maximize: bool = False) -> list[Run]:
    """Best first by ``metric``; runs without it last (in their original order)."""

    def key(r: Run) -> tuple[int, float]:
        v = r.summary.get(metric)
        if v is None or not math.isfinite(v):
            return (1, 0.0)
        return (0, -v if maximize else v)

    return sorted(runs, key=key)


# ---------------------------------------------------------------------------------------------------
# SVG plots


def _as_float(s: str) -> float | None:
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round ticks (1, 2, 5 x 10^k steps) within [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten within [lo, hi] (the range spans at least 10x, so there is at least one)."""
    return [10.0**e for e in range(math.ceil(math.log10(lo)), math.floor(math.log10(hi)) + 1)]


def fmt_num(v: float) -> str:
    """Short tick label: 1.5M, 20k, 0.001."""
    a = abs(v)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{v / div:.4g}{suffix}"
    return f"{v:.4g}"


class Axes:
    """Maps data to pixels in a fixed-size plot area; x may be linear, log or categorical."""

    W, H = 640, 340
    LEFT, RIGHT, TOP, BOTTOM = 70, 620, 20, 290  # plot area in pixels

    def __init__(
        self,
        xs: list[float],
        ys: list[float],
        *,
        xlog: bool = False,
        categories: list[str] | None = None,
    ):
        self.xlog, self.categories = xlog, categories
        if categories is not None:
            xs = [0.0, float(len(categories) - 1)]
        tx = [math.log10(x) for x in xs] if xlog else xs
        self.x0, self.x1 = min(tx), max(tx)
        pad = (max(ys) - min(ys)) * 0.05 or abs(ys[0]) * 0.05 or 1.0
        self.y0, self.y1 = min(ys) - pad, max(ys) + pad

    def px(self, x: float) -> float:
        if self.categories is not None:  # evenly spaced, half a slot in from the edges
            n = len(self.categories)
            return self.LEFT + (x + 0.5) / n * (self.RIGHT - self.LEFT)
        t = math.log10(x) if self.xlog else x
        if self.x1 == self.x0:
            return (self.LEFT + self.RIGHT) / 2
        return self.LEFT + (t - self.x0) / (self.x1 - self.x0) * (self.RIGHT - self.LEFT)

    def py(self, y: float) -> float:
        return self.BOTTOM - (y - self.y0) / (self.y1 - self.y0) * (self.BOTTOM - self.TOP)

    def frame(self, xlabel: str, ylabel: str) -> list[str]:
        """Axis lines, ticks, tick labels and axis titles."""
        L, R, T, B = self.LEFT, self.RIGHT, self.TOP, self.BOTTOM
        out = [
            f'<line class="axis" x1="{L}" y1="{B}" x2="{R}" y2="{B}" stroke="#333"/>',
            f'<line class="axis" x1="{L}" y1="{T}" x2="{L}" y2="{B}" stroke="#333"/>',
        ]
        if self.categories is not None:
            xticks = [(self.px(i), c) for i, c in enumerate(self.categories)]
        elif self.xlog:
            xticks = [(self.px(t), fmt_num(t)) for t in log_ticks(10**self.x0, 10**self.x1)]
        else:
            xticks = [(self.px(t), fmt_num(t)) for t in nice_ticks(self.x0, self.x1)]
        for x, label in xticks:
            out.append(
                f'<line class="xtick" x1="{x:.2f}" y1="{B}" x2="{x:.2f}" y2="{B + 5}" stroke="#333"/>'
                f'<text x="{x:.2f}" y="{B + 18}" text-anchor="middle">{html.escape(label)}</text>'
            )
        for t in nice_ticks(self.y0, self.y1):
            y = self.py(t)
            out.append(
                f'<line class="ytick" x1="{L - 5}" y1="{y:.2f}" x2="{R}" y2="{y:.2f}" '
                f'stroke="#ddd"/><text x="{L - 8}" y="{y + 4:.2f}" text-anchor="end">'
                f"{fmt_num(t)}</text>"
            )
        out.append(
            f'<text class="xlabel" x="{(L + R) / 2}" y="{B + 38}" text-anchor="middle">'
            f"{html.escape(xlabel)}</text>"
            f'<text class="ylabel" transform="translate(16 {(T + B) / 2}) rotate(-90)" '
            f'text-anchor="middle">{html.escape(ylabel)}</text>'
        )
        return out

    def svg(self, plot_id: str, body: list[str], height: int | None = None) -> str:
        h = height or self.H
        return (
            f'<svg id="{html.escape(plot_id)}" xmlns="http://www.w3.org/2000/svg" width="{self.W}" '
            f'height="{h}" viewBox="0 0 {self.W} {h}" font-size="11" font-family="sans-serif" '
            f'data-left="{self.LEFT}" data-right="{self.RIGHT}">' + "".join(body) + "</svg>"
        )


def legend(entries: list[tuple[str, str]], top: int) -> tuple[list[str], int]:
    """One line per (name, colour) below the plot; returns the elements and the new height."""
    out = []
    for i, (name, colour) in enumerate(entries):
        y = top + 16 * i
        out.append(
            f'<g class="legend-entry"><line x1="{Axes.LEFT}" y1="{y}" x2="{Axes.LEFT + 20}" '
            f'y2="{y}" stroke="{colour}" stroke-width="2"/><text x="{Axes.LEFT + 26}" y="{y + 4}">'
            f"{html.escape(name)}</text></g>"
        )
    return out, top + 16 * len(entries) + 4


def curve_plot(runs: list[Run], colours: dict[str, str], metric: str) -> str:
    """``metric`` against tokens seen: one polyline per run that logged it."""
    plotted = [r for r in runs if r.curves.get(metric, ([], []))[0]]
    if not plotted:
        return f"<p>No run logged {html.escape(metric)}.</p>"
    xs = [x for r in plotted for x in r.curves[metric][0]]
    ys = [y for r in plotted for y in r.curves[metric][1]]
    ax = Axes(xs, ys)
    body = ax.frame("tokens seen", metric)
    for r in plotted:
        tokens, values = r.curves[metric]
        points = " ".join(
            f"{ax.px(x):.2f},{ax.py(y):.2f}" for x, y in zip(tokens, values, strict=True)
        )
        body.append(
            f'<polyline data-run="{html.escape(r.name)}" points="{points}" fill="none" '
            f'stroke="{colours[r.name]}" stroke-width="1.5"><title>{html.escape(r.name)}</title>'
            "</polyline>"
        )
        if len(tokens) == 1:  # a one-point polyline draws nothing: mark the point
            body.append(
                f'<circle class="marker" cx="{ax.px(tokens[0]):.2f}" cy="{ax.py(values[0]):.2f}" '
                f'r="3" fill="{colours[r.name]}"/>'
            )
    items, height = legend([(r.name, colours[r.name]) for r in plotted], ax.H + 10)
    return ax.svg(f"curve-{metric}", body + items, height)


def scatter_plot(runs: list[Run], colours: dict[str, str], param: str, metric: str) -> str:
    """``metric`` against the swept ``param``: one circle per run holding both."""
    points = [
        (r, r.overrides[param], r.summary[metric])
        for r in runs
        if param in r.overrides and math.isfinite(r.summary.get(metric, math.nan))
    ]
    if not points:
        return f"<p>No finished run with {html.escape(metric)} sets {html.escape(param)}.</p>"
    numbers = [_as_float(v) for _, v, _ in points]
    ys = [y for _, _, y in points]
    if all(n is not None for n in numbers):
        xs = [float(n) for n in numbers]  # type: ignore[arg-type]
        xlog = min(xs) > 0 and max(xs) / min(xs) >= 10
        ax, scale = Axes(xs, ys, xlog=xlog), "log" if xlog else "linear"
    else:
        categories = sorted({v for _, v, _ in points})
        xs = [float(categories.index(v)) for _, v, _ in points]
        ax, scale = Axes(xs, ys, categories=categories), "categorical"
    body = ax.frame(param, metric)
    for (r, value, y), x in zip(points, xs, strict=True):
        body.append(
            f'<circle data-run="{html.escape(r.name)}" data-x="{html.escape(value)}" '
            f'data-y="{y!r}" cx="{ax.px(x):.2f}" cy="{ax.py(y):.2f}" r="4" '
            f'fill="{colours[r.name]}"><title>{html.escape(r.name)}: {y:.6g}</title></circle>'
        )
    svg = ax.svg(f"scatter-{param}", body)
    return svg.replace("<svg ", f'<svg data-scale="{scale}" ', 1)


# ---------------------------------------------------------------------------------------------------
# HTML


CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; position: sticky; top: 0; }
td.name, td.status { text-align: left; }
tr.best { background: #d9f2d9; font-weight: bold; }
tr.unfinished, tr.failed, tr.preempted { color: #999; font-style: italic; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; }
"""


def _cell(kind: str, key: str, value: float | str | None) -> str:
    """A table cell whose exact value is in data-value (repr for floats), shown rounded."""
    if value is None:
        return f'<td data-kind="{kind}" data-key="{html.escape(key)}"></td>'
    if isinstance(value, float):
        shown, exact = f"{value:.6g}", repr(value)
    else:
        shown = exact = value
    return (
        f'<td data-kind="{kind}" data-key="{html.escape(key)}" data-value="{html.escape(exact)}">'
        f"{html.escape(shown)}</td>"
    )


def runs_table(runs: list[Run], metric: str) -> str:
    """Runs (already sorted, best first) x swept overrides and final metrics; the overrides every
    run shares (debug=fast, paths.cache_dir=...) are listed once above it, not as columns."""
    override_keys = swept_parameters(runs)  # every other key: in every run, with one value
    common = sorted((k, v) for k, v in runs[0].overrides.items() if k not in override_keys)
    summary_keys = sorted({k for r in runs for k in r.summary})
    if metric in summary_keys:  # the optimised metric first
        summary_keys.remove(metric)
        summary_keys.insert(0, metric)
    head = ['<th data-key="run">run</th>', '<th data-key="status">status</th>']
    head += [
        f'<th data-kind="override" data-key="{html.escape(k)}">{html.escape(k)}</th>'
        for k in override_keys
    ]
    head += [
        f'<th data-kind="metric" data-key="{html.escape(k)}">{html.escape(k)}</th>'
        for k in summary_keys
    ]
    rows = []
    best = runs[0] if math.isfinite(runs[0].summary.get(metric, math.nan)) else None
    for r in runs:
        classes = [r.status] + (["best"] if r is best else [])
        status = r.status + ("".join(f"; {n}" for n in r.notes))
        cells = [
            f'<td class="name" data-key="run" data-value="{html.escape(r.name)}" '
            f'title="{html.escape(str(r.path))}">{html.escape(r.name)}</td>',
            f'<td class="status" data-key="status" data-value="{r.status}">'
            f"{html.escape(status)}</td>",
        ]
        cells += [_cell("override", k, r.overrides.get(k)) for k in override_keys]
        cells += [_cell("metric", k, r.summary.get(k)) for k in summary_keys]
        rows.append(f'<tr class="{" ".join(classes)}">' + "".join(cells) + "</tr>")
    shared = ""
    if common:
        shared = (
            '<p id="common">Every run: '
            + ", ".join(f"<code>{html.escape(k)}={html.escape(v)}</code>" for k, v in common)
            + "</p>"
        )
    return (
        shared
        + '<table id="runs"><thead><tr>'
        + "".join(head)
        + "</tr></thead><tbody>"
        + "\n".join(rows)
        + "</tbody></table>"
    )


def render(runs: list[Run], sweep_dir: Path, metric: str, maximize: bool = False) -> str:
    """The whole HTML page."""
    runs = sort_runs(runs, metric, maximize)
    colours = {r.name: PALETTE[i % len(PALETTE)] for i, r in enumerate(runs)}
    swept = swept_parameters(runs)
    unfinished = [r for r in runs if r.status != "finished"]
    direction = "higher" if maximize else "lower"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>lmlab sweep report: {html.escape(str(sweep_dir))}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Sweep {html.escape(str(sweep_dir))}</h1>",
        f"<p>{len(runs)} runs ({len(runs) - len(unfinished)} finished). Sorted by "
        f"<code>{html.escape(metric)}</code> ({direction} is better); best run highlighted.</p>",
    ]
    if math.isfinite(runs[0].summary.get(metric, math.nan)):
        parts.append(
            f'<p id="best">Best: <b>{html.escape(runs[0].name)}</b> '
            f"({html.escape(metric)} = {runs[0].summary[metric]:.6g})</p>"
        )
    warning = mixed_tokenizers(runs, metric)
    if warning:
        parts.append(f'<p id="tokenizers"><b>Warning:</b> {html.escape(warning)}.</p>')
    if unfinished:
        parts.append(
            '<h2>Unfinished runs</h2><ul id="unfinished">'
            + "".join(
                f'<li data-run="{html.escape(r.name)}">{html.escape(r.name)} '
                f"(<code>{html.escape(str(r.path))}</code>: no summary.json)</li>"
                for r in unfinished
            )
            + "</ul>"
        )
    parts += ["<h2>Final metrics</h2>", runs_table(runs, metric), "<h2>Learning curves</h2>"]
    if any(r.tokens_per_step == 1 and not r.tokens_logged for r in runs):
        parts.append(
            "<p>Some runs have no readable <code>.hydra/config.yaml</code> batch size / seq_len: "
            "their x-axis counts steps, not tokens.</p>"
        )
    curve_metrics = list(CURVES) + ([metric] if metric not in CURVES else [])
    parts.append('<div class="plots">')
    for m in curve_metrics:
        parts.append(
            f"<figure><figcaption>{html.escape(m)} vs tokens seen</figcaption>"
            f"{curve_plot(runs, colours, m)}</figure>"
        )
    parts += ["</div>", "<h2>Swept parameters</h2>"]
    if not swept:
        parts.append("<p>No override differs between runs.</p>")
    parts.append('<div class="plots">')
    for p in swept:
        parts.append(
            f"<figure><figcaption>{html.escape(metric)} vs {html.escape(p)}</figcaption>"
            f"{scatter_plot(runs, colours, p, metric)}</figure>"
        )
    parts += ["</div>", "</body></html>", ""]
    return "\n".join(parts)


def check_metric(runs: list[Run], sweep_dir: Path, metric: str) -> None:
    """ConfigError when finished runs exist and none has ``metric`` in its summary."""
    finished_keys = sorted({k for r in runs for k in r.summary})
    if finished_keys and metric not in finished_keys:
        raise ConfigError(
            f"no run in {sweep_dir} has the metric {metric!r} in its summary.json; "
            f"choose one of: {', '.join(finished_keys)}"
        )


def build_report(
    sweep_dir: str | Path,
    out: str | Path | None = None,
    metric: str = "val/bpb",
    maximize: bool = False,
) -> Path:
    """Write the HTML report of the sweep (default ``<sweep_dir>/report.html``); return its path."""
    sweep_dir = Path(sweep_dir)
    runs = collect_runs(sweep_dir)
    check_metric(runs, sweep_dir, metric)
    warning = mixed_tokenizers(runs, metric)
    if warning:
        log.warning("warning: %s", warning)
    out = Path(out) if out is not None else sweep_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(runs, sweep_dir, metric, maximize), encoding="utf-8")
    log.info("wrote %s (%d runs)", out, len(runs))
    return out


# ---------------------------------------------------------------------------------------------------
# W&B Report (wandb-workspaces)

WANDB_EXTRA_HINT = 'pip install -e ".[wandb]"'  # the extra that brings wandb-workspaces
WANDB_X_AXIS = "train/tokens_seen"  # lmlab.callbacks.Throughput logs it with train and val rows


@dataclass
class WandbTarget:
    """Where a sweep's runs went on W&B: what a report needs to find them."""

    entity: str | None
    project: str
    groups: list[str]  # the runs' W&B groups (one for one sweep)


def _load_yaml_config(path: Path) -> Any:
    """A saved Hydra file as an OmegaConf node, None when missing or unreadable."""
    if not path.is_file():
        return None
    try:
        return OmegaConf.load(path)
    except Exception as e:  # a truncated file must not stop the report
        log.warning("cannot read %s: %s", path, e)
        return None


def _select(cfg: Any, key: str) -> Any:
    """``cfg.key`` resolved, None when missing or not resolvable outside the run (``${hydra:...}``)."""
    try:
        return OmegaConf.select(cfg, key, default=None)
    except Exception:
        return None


def logged_to_wandb(run_dir: Path) -> bool:
    """Whether the run's config had a W&B logger (``logger=wandb``)."""
    cfg = _load_yaml_config(run_dir / ".hydra" / "config.yaml")
    return cfg is not None and OmegaConf.select(cfg, "logger.wandb", default=None) is not None


def wandb_group(run_dir: Path) -> str | None:
    """The W&B group ``lmlab.loggers.wandb_logger`` gave the run in ``run_dir``: ``logger.wandb.group``
    (the ``wandb_group`` key) when set, else, in a multirun, :func:`lmlab.loggers.sweep_identity` of the
    sweep folder; None for a single run without a group.

    The sweep folder is ``hydra.sweep.dir`` as saved in ``.hydra/hydra.yaml`` when it is a plain
    absolute path (the logger resolves a relative one against the launch folder). Hydra saves it
    unresolved, and the default one holds ``${now:...}``, which only meant the launch time in the
    launching process: then, and for a relative path, the run folder on disk minus
    ``hydra.sweep.subdir`` is the sweep folder (the group keeps its last three parts)."""
    from lmlab.loggers import sweep_identity  # imports Lightning: only for --wandb

    cfg = _load_yaml_config(run_dir / ".hydra" / "config.yaml")
    group = _select(cfg, "logger.wandb.group") if cfg is not None else None
    if group is None and cfg is not None:
        group = _select(cfg, "wandb_group")
    if group:
        return str(group)
    hydra_cfg = _load_yaml_config(run_dir / ".hydra" / "hydra.yaml")
    if (
        hydra_cfg is None
        or str(OmegaConf.select(hydra_cfg, "hydra.mode", default="")) != "MULTIRUN"
    ):
        return None
    raw = OmegaConf.to_container(hydra_cfg.hydra.sweep, resolve=False).get("dir")  # type: ignore[union-attr]
    if isinstance(raw, str) and raw and "${" not in raw and Path(raw).is_absolute():
        return sweep_identity(str(Path(raw).resolve()), "")[0]  # as the logger (links, ..)
    subdir = _select(hydra_cfg, "hydra.sweep.subdir")
    depth = len(Path(str(subdir)).parts) if subdir not in (None, "") else 1
    return sweep_identity(str(run_dir.resolve().parents[depth - 1]), "")[0]


def _config_value(runs: list[Run], key: str) -> str | None:
    """The one non-null value of ``key`` in the runs' configs; ConfigError when they disagree."""
    values = set()
    for run in runs:
        cfg = _load_yaml_config(run.path / ".hydra" / "config.yaml")
        value = _select(cfg, key) if cfg is not None else None
        if value is not None:
            values.add(str(value))
    if len(values) > 1:
        flag = "--" + key.rsplit(".", 1)[-1]
        raise ConfigError(
            f"the runs logged to different W&B {key} values ({', '.join(sorted(values))}): "
            f"choose one with {flag}"
        )
    return values.pop() if values else None


def wandb_target(
    runs: list[Run],
    entity: str | None = None,
    project: str | None = None,
    group: str | None = None,
) -> WandbTarget:
    """Entity, project and groups of the runs: the arguments when given, else the runs' configs
    (``logger.wandb.entity`` / ``project``, as the runs were logged), else ``WANDB_ENTITY`` /
    ``WANDB_PROJECT``; entity None means the account's default entity. Reads files only."""
    logged = [r for r in runs if logged_to_wandb(r.path)]
    if not logged and group is None:
        raise ConfigError(
            "no run of this sweep was logged to W&B (their .hydra/config.yaml has no logger.wandb): "
            "run the sweep with logger=wandb, or name the W&B group with --group"
        )
    logged = logged or runs
    entity = (
        entity or _config_value(logged, "logger.wandb.entity") or os.environ.get("WANDB_ENTITY")
    )
    project = (
        project or _config_value(logged, "logger.wandb.project") or os.environ.get("WANDB_PROJECT")
    )
    if not project:
        raise ConfigError(
            "cannot tell the runs' W&B project (no logger.wandb.project in their config): "
            "pass --project or set WANDB_PROJECT"
        )
    if group is not None:
        return WandbTarget(entity, project, [group])
    groups = {r.path: wandb_group(r.path) for r in logged}
    missing = [r.path for r, g in zip(logged, groups.values(), strict=True) if g is None]
    if missing:
        raise ConfigError(
            f"cannot tell the W&B group of {', '.join(map(str, missing))}: not part of a multirun "
            "and no wandb_group set; pass the group with --group"
        )
    return WandbTarget(entity, project, sorted({g for g in groups.values() if g is not None}))


def require_wandb_credentials() -> None:
    """Creating a report needs W&B credentials: say so before any network call (W&B's own check,
    ``wandb.login``, would prompt or fix the process's W&B settings)."""
    from lmlab.train import _wandb_key_saved

    if not (os.environ.get("WANDB_API_KEY") or _wandb_key_saved()):
        raise ConfigError(
            "--wandb creates the report on the W&B server, but W&B has no credentials: run "
            "`wandb login` (or set WANDB_API_KEY), or leave out --wandb for the HTML report alone"
        )


@cache
def _workspaces() -> tuple[Any, Any, type, type]:
    """``(wr, expr, ScatterPlot, ParallelCoordinatesPlotColumn)`` of wandb-workspaces, the two panel
    classes reading ``wr.Config`` keys as lmlab logs them.

    lmlab logs its config flat (``{"model.n_layers": 4}``), which W&B stores as
    ``config["model.n_layers"].value``; wandb-workspaces (0.4.13) writes ``wr.Config("model.n_layers")``
    as the nested key ``config:model.value.n_layers``, which such runs do not have. The subclasses write
    ``config:model.n_layers.value`` instead."""
    try:
        import wandb_workspaces.reports.v2 as wr
        from wandb_workspaces import expr
    except ImportError as e:
        raise ConfigError(
            f"--wandb needs the wandb-workspaces package ({e}): {WANDB_EXTRA_HINT}"
        ) from None

    class ScatterPlot(wr.ScatterPlot):
        def _to_model(self):
            model = super()._to_model()
            for axis in ("x", "y", "z"):
                metric = getattr(self, axis)
                if isinstance(metric, wr.Config):
                    setattr(model.config, f"{axis}_axis", f"config:{metric.name}.value")
            return model

    class ParallelCoordinatesPlotColumn(wr.ParallelCoordinatesPlotColumn):
        def _to_model(self):
            model = super()._to_model()
            if isinstance(self.metric, wr.Config):
                model.accessor = f"config:{self.metric.name}.value"
            return model

    return wr, expr, ScatterPlot, ParallelCoordinatesPlotColumn


def group_filter_v2(groups: list[str]) -> dict:
    """The run filter "group is one of ``groups``" in the form W&B stores (filterV2)."""
    return {
        "filterFormat": "filterV2",
        "filters": [
            {
                "key": {"section": "run", "name": "group"},
                "op": "IN",
                "value": list(groups),
                "disabled": False,
            }
        ],
    }


def saved_filters(runset: Any) -> dict:
    """The filters ``runset`` sends when saved, computed as ``Runset._to_model`` does (no network)."""
    _, expr, _, _ = _workspaces()
    stash = getattr(runset, "_stashed_filters_v2", None)
    if stash is not None and runset.filters == getattr(runset, "_stashed_filter_string", None):
        return stash
    return expr.filters_tree_to_v2(expr.expr_to_filters(runset.filters))


def _group_runset(target: WandbTarget, columns: list[str], order: Any, hidden: bool = False) -> Any:
    wr, expr, _, _ = _workspaces()
    runset = wr.Runset(
        entity=target.entity or "",
        project=target.project,
        name=f"group {', '.join(target.groups)}",
        filters=[expr.Metric("Group").isin(list(target.groups))],
        order=[order],
        visible_columns=columns,
        column_order=columns,
    )
    # wandb-workspaces keeps filters as a string and parses it again when saving, which turns an "="
    # inside a value into "==" (sweep_identity keeps "=" in groups): then keep the exact filter
    # beside the string, as the library does for a report it loaded.
    exact = group_filter_v2(target.groups)
    if saved_filters(runset) != exact:
        runset._stashed_filters_v2 = exact
        runset._stashed_filter_string = runset.filters
    return runset


def build_wandb_report(
    runs: list[Run],
    target: WandbTarget,
    metric: str = "val/bpb",
    maximize: bool = False,
    title: str | None = None,
    description: str = "",
) -> Any:
    """The W&B Report (a ``wandb_workspaces.reports.v2.Report``, not saved) with the HTML report's
    panels for the runs of ``target.groups``: the runs table (the run set's table: swept parameters and
    final metrics, sorted by ``metric``), ``val/bpb`` and ``train/loss`` (and ``metric``) against
    ``train/tokens_seen``, and ``metric`` against each swept parameter (one scatter plot each, plus a
    parallel-coordinates plot of them all). No network call: ``target.entity`` must be known."""
    wr, _, ScatterPlot, Column = _workspaces()
    if not target.entity:
        raise ConfigError("build_wandb_report needs the W&B entity (wandb_target found none)")
    runs = sort_runs(runs, metric, maximize)
    swept = swept_parameters(runs)
    summary_keys = sorted({k for r in runs for k in r.summary} - {metric})
    columns = (
        [f"config:{k}.value" for k in swept]
        + [f"summary:{metric}"]
        + [f"summary:{k}" for k in summary_keys]
    )
    order = wr.OrderBy(wr.SummaryMetric(metric), ascending=not maximize)
    curve_metrics = list(CURVES) + ([metric] if metric not in CURVES else [])
    curves = [
        wr.LinePlot(
            title=f"{m} vs tokens seen",
            x=WANDB_X_AXIS,
            y=[m],
            title_x="tokens seen (train/tokens_seen)",
            title_y=m,
            layout=wr.Layout(x=8 * (i % 3), y=8 * (i // 3), w=8, h=8),
        )
        for i, m in enumerate(curve_metrics)
    ]
    scatters = []
    for i, p in enumerate(swept):
        values = [_as_float(r.overrides[p]) for r in runs if p in r.overrides]
        numbers = [v for v in values if v is not None]
        log_x = (
            len(numbers) == len(values) and min(numbers) > 0 and max(numbers) / min(numbers) >= 10
        )
        scatters.append(
            ScatterPlot(
                title=f"{metric} vs {p}",
                x=wr.Config(p),
                y=wr.SummaryMetric(metric),
                log_x=log_x or None,
                layout=wr.Layout(x=8 * (i % 3), y=8 * (i // 3), w=8, h=8),
            )
        )
    if swept:
        scatters.append(
            wr.ParallelCoordinatesPlot(
                title=f"{metric} vs swept parameters",
                columns=[Column(wr.Config(p), display_name=p) for p in swept]
                + [Column(wr.SummaryMetric(metric), display_name=metric)],
                layout=wr.Layout(x=0, y=8 * ((len(swept) + 2) // 3), w=24, h=10),
            )
        )
    direction = "higher" if maximize else "lower"
    blocks = [
        wr.P(
            f"{len(runs)} runs of W&B group {', '.join(target.groups)}, sorted by {metric} "
            f"({direction} is better). {description}".strip()
        ),
        wr.H2("Learning curves"),
        wr.PanelGrid(runsets=[_group_runset(target, columns, order)], panels=curves),
        wr.H2("Swept parameters"),
    ]
    if scatters:
        blocks.append(
            wr.PanelGrid(
                runsets=[_group_runset(target, columns, order)],
                panels=scatters,
                hide_run_sets=True,  # the same table as above
            )
        )
    else:
        blocks.append(wr.P("No override differs between runs."))
    return wr.Report(
        entity=target.entity,
        project=target.project,
        title=title or f"lmlab sweep {', '.join(target.groups)}"[:128],
        description=f"{metric} ({direction} is better)",
        blocks=blocks,
        width="fluid",
    )


def create_wandb_report(
    sweep_dir: str | Path,
    metric: str = "val/bpb",
    maximize: bool = False,
    entity: str | None = None,
    project: str | None = None,
    group: str | None = None,
) -> str:
    """Build the sweep's W&B Report and save it on the server; return its URL. Checks the package,
    the credentials and the runs before the first network call."""
    _workspaces()
    require_wandb_credentials()
    runs = collect_runs(sweep_dir)
    check_metric(runs, Path(sweep_dir), metric)
    target = wandb_target(runs, entity, project, group)
    try:  # the server calls: no network, a refused key, a busy service
        if target.entity is None:  # the account's default entity, as the runs were logged
            import wandb

            target.entity = wandb.Api().default_entity
        report = build_wandb_report(
            runs, target, metric, maximize, description=f"Sweep {sweep_dir}."
        )
        report.save()
    except (ConfigError, ImportError):
        raise
    except Exception as e:  # wandb's and requests' errors have no common base
        raise ConfigError(
            f"the W&B Report could not be created ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "the HTML report is written; retry --wandb when W&B is reachable"
        ) from None
    return report.url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmlab.report",
        description="Write a self-contained HTML report (table of final metrics, learning curves "
        "against tokens seen, metric vs each swept parameter) for the runs of a sweep.",
        epilog="Example: python -m lmlab.report multirun/2025-01-31/12-00-00 --metric val/bpb",
    )
    parser.add_argument(
        "sweep_dir",
        type=Path,
        help="folder holding the runs (any depth): each run folder has summary.json (finished) "
        "or metrics.csv (unfinished), plus .hydra/overrides.yaml and .hydra/config.yaml",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output HTML file (default: <sweep_dir>/report.html)"
    )
    parser.add_argument(
        "--metric",
        default="val/bpb",
        help="summary metric to sort by and plot against the swept parameters (default: val/bpb)",
    )
    order = parser.add_mutually_exclusive_group()
    order.add_argument(
        "--maximize",
        action="store_true",
        help="higher is better for --metric (default: as the metric says: val/acc, the auxiliary "
        "heads' val/<objective>_acc, train/tokens_per_sec, train/mfu higher; losses, ppl, bpb "
        "and others lower)",
    )
    order.add_argument("--minimize", action="store_true", help="lower is better for --metric")
    wandb_args = parser.add_argument_group(
        "W&B", f"--wandb also creates a W&B Report of the sweep's W&B group ({WANDB_EXTRA_HINT})"
    )
    wandb_args.add_argument(
        "--wandb", action="store_true", help="also create a W&B Report (needs `wandb login`)"
    )
    wandb_args.add_argument(
        "--entity",
        default=None,
        help="W&B entity (default: logger.wandb.entity of the runs, WANDB_ENTITY, your default)",
    )
    wandb_args.add_argument(
        "--project",
        default=None,
        help="W&B project (default: logger.wandb.project of the runs, WANDB_PROJECT)",
    )
    wandb_args.add_argument(
        "--group",
        default=None,
        help="W&B group of the runs (default: the one lmlab gave the sweep's runs)",
    )
    args = parser.parse_args(argv)
    try:
        args.maximize = maximize_metric(args.metric, args.maximize, args.minimize)
        if args.wandb:  # fail before any work without the package or credentials
            _workspaces()
            require_wandb_credentials()
        path = build_report(args.sweep_dir, args.out, args.metric, args.maximize)
        print(path)
        if args.wandb:
            url = create_wandb_report(
                args.sweep_dir, args.metric, args.maximize, args.entity, args.project, args.group
            )
            print(url)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
