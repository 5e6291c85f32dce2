"""Where a GPU waits in a profiled training step: a summary of a Chrome trace from ``torch.profiler``.

``gpu.py --trace-steps N`` profiles N steps after its timed ones (Lightning's whole step: data,
forward, backward, clipping, optimizer, hooks, logging) and writes the trace (``<run>.json.gz``)
beside printing this summary; ``python benchmarks/timeline.py FILE`` reads one again, e.g. a trace
brought back from a GPU machine. breakdown.py profiles the plain compiled step instead, without the
Trainer.

The summary: the device's busy time (the union of its kernels, copies and fills over every stream)
against the window from the first kernel's start to the last one's end (the idle time before the
first kernel falls outside it: over few steps the busy share reads a little high); kernel time by
kind (as breakdown.py sorts kernels); and the idle gaps longer than ``--gap-us``, each blamed on
what the host launched next: the innermost CPU operator (or ``record_function`` range) around the
launch call whose correlation id the kernel after the gap carries, or on the device where that
call had returned before the gap began (a wait on another stream or event, a gap inside a CUDA
graph's replay). Gaps are summed by that name too, so a
host-side cost paid every step (an eager optimizer step, a synchronising read of a metric) shows as
one row. A trace of a CPU run has no kernels: it is summarised by its CPU operators' time.

    python benchmarks/timeline.py /tmp/lmlab-gpu-traces-*/decoder-*.json.gz
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import itertools
import json
import textwrap
from pathlib import Path

from common import kind_of, table

# Chrome-trace categories of device activity (kineto's names), and of the host's calls that
# launch it (the runtime's and the driver's: Triton launches through the driver)
DEVICE = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH = ("cuda_runtime", "cuda_driver")
HOST_RANGES = ("cpu_op", "user_annotation", "python_function")


def load(path: str | Path) -> list[dict]:
    """The complete (``ph == "X"``) events of a Chrome trace, gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return load_events(json.load(f)["traceEvents"])


def load_events(events: list[dict]) -> list[dict]:
    """The complete events (spans with a duration) of a trace's event list."""
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def busy_intervals(kernels: list[dict]) -> list[tuple[float, float]]:
    """The union of the kernels' [start, end) intervals (us), sorted: several streams may overlap."""
    spans = sorted((float(k["ts"]), float(k["ts"]) + float(k["dur"])) for k in kernels)
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


class HostIndex:
    """The host's ranges per thread, to find the innermost one around a moment (a launch call).
    Ranges on one thread nest (they come from its call stack): sorted by start, outer before inner
    where they start together, each gets its parent (the innermost range around its start) in one
    sweep with a stack; the innermost range around a moment is then the last one started by then,
    or the first of its ancestors that has not ended."""

    def __init__(self, events: list[dict]) -> None:
        self.by_thread: dict[tuple, list[tuple[float, float, str]]] = collections.defaultdict(list)
        for e in events:
            if e.get("cat") in HOST_RANGES:
                start = float(e["ts"])
                self.by_thread[(e.get("pid"), e.get("tid"))].append(
                    (start, start + float(e["dur"]), e["name"])
                )
        self.starts, self.parents = {}, {}
        for key, ranges in self.by_thread.items():
            ranges.sort(key=lambda r: (r[0], -r[1]))
            self.starts[key] = [r[0] for r in ranges]
            parents, stack = [], []
            for i, (start, _, _) in enumerate(ranges):
                while stack and ranges[stack[-1]][1] < start:
                    stack.pop()
                parents.append(stack[-1] if stack else -1)
                stack.append(i)
            self.parents[key] = parents

    def innermost(self, thread: tuple, at: float) -> str | None:
        """The innermost range on ``thread`` that holds ``at``, or None."""
        ranges = self.by_thread.get(thread, [])
        i = bisect.bisect_right(self.starts.get(thread, []), at) - 1
        while i >= 0 and ranges[i][1] < at:
            i = self.parents[thread][i]
        return None if i < 0 else ranges[i][2]


def summarize(events: list[dict], steps: int, gap_us: float = 20.0, top: int = 12) -> dict:
    """Busy and idle device time per step, kernel time per step by kind, and the idle gaps longer
    than ``gap_us`` (each with the host operator that launched the work after it), longest first,
    and summed by that operator. Times in ms per step, except the gaps' own (us)."""
    kernels = [e for e in events if e.get("cat") in DEVICE]
    if not kernels:
        own: dict[str, float] = collections.defaultdict(float)
        for e in events:
            if e.get("cat") == "cpu_op":
                own[e["name"]] += float(e["dur"]) / 1e3 / steps
        ops = sorted(own.items(), key=lambda kv: -kv[1])[:top]
        return {"device": False, "steps": steps, "cpu_ops": ops}
    busy = busy_intervals(kernels)
    window = max(busy[-1][1] - busy[0][0], 1e-9)  # from the first kernel's start to the last's end
    busy_ms = sum(e - s for s, e in busy) / 1e3
    by_kind: dict[str, float] = collections.defaultdict(float)
    for k in kernels:
        by_kind[kind_of(k["name"], True)] += float(k["dur"]) / 1e3 / steps
    launches = {}
    for e in events:
        corr = e.get("args", {}).get("correlation")
        if e.get("cat") in LAUNCH and corr is not None:
            launches[corr] = e
    first_after = {}  # a busy interval's start -> the kernel that opens it
    for k in sorted(kernels, key=lambda k: float(k["ts"])):
        first_after.setdefault(float(k["ts"]), k)
    host = HostIndex(events)
    gaps = []
    for (_, end), (start, _) in itertools.pairwise(busy):
        if start - end < gap_us:
            continue
        kernel = first_after[start]
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        if launch is None:
            by = "(launch not traced)"
        elif float(launch["ts"]) + float(launch["dur"]) <= end:
            # queued before the gap began (a kernel waiting on another stream or an event, or
            # a gap inside a CUDA graph's replay, whose kernels all carry its launch's id)
            by = "(launched before the gap: device-side)"
        else:
            thread = (launch.get("pid"), launch.get("tid"))
            by = host.innermost(thread, float(launch["ts"])) or launch["name"]
        gaps.append((start - end, by, kernel["name"]))
    gaps.sort(key=lambda g: -g[0])
    blame: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for us, by, _ in gaps:
        blame[by][0] += us / 1e3 / steps
        blame[by][1] += 1 / steps
    return {
        "device": True,
        "steps": steps,
        "gap_us": gap_us,
        "window_ms": window / 1e3 / steps,
        "busy_ms": busy_ms / steps,
        "idle_ms": (window / 1e3 - busy_ms) / steps,
        "gaps_ms": sum(g[0] for g in gaps) / 1e3 / steps,
        "by_kind": sorted(by_kind.items(), key=lambda kv: -kv[1]),
        "longest_gaps": gaps[:top],
        "blame": sorted(((k, v[0], v[1]) for k, v in blame.items()), key=lambda r: -r[1])[:top],
    }


def report(summary: dict) -> str:
    """The summary as text: figures, then tables (benchmarks/common.py's)."""
    if not summary["device"]:
        rows = [[f"{ms:.3f}", name[:90]] for name, ms in summary["cpu_ops"]]
        return (
            "no device kernels in the trace (a CPU run): CPU operators' time (each holds the\n"
            "operators it calls)\n" + table(["ms per step", "operator"], rows)
        )
    s = summary
    steps, gap_us = s["steps"], s["gap_us"]
    lines = [
        f"{steps} profiled steps: the device busy {s['busy_ms']:.2f} of {s['window_ms']:.2f} ms a "
        f"step ({100 * s['busy_ms'] / s['window_ms']:.1f}%); idle {s['idle_ms']:.2f} ms a step, "
        f"{s['gaps_ms']:.2f} of it in gaps over {gap_us:g} us",
        "",
        table(["kind", "kernel ms per step"], [[kind, f"{ms:.2f}"] for kind, ms in s["by_kind"]]),
        "",
        "idle gaps by what the host launched next:",
        table(
            ["idle ms per step", "gaps per step", "host operator"],
            [[f"{ms:.3f}", f"{n:g}", by[:80]] for by, ms, n in s["blame"]],
        ),
        "",
        "longest gaps:",
        table(
            ["us", "host operator", "next kernel"],
            [[f"{us:.0f}", by[:60], name[:60]] for us, by, name in s["longest_gaps"]],
        ),
    ]
    return "\n".join(lines)


def say(path: Path, error: str | None, steps: int) -> None:
    """A benchmark run's trace, as gpu.py and reference.py print it after the run's figures: the
    profiler's failure, or the file and its summary (a trace that cannot be read is said; the
    runs still to come are the measurement)."""
    if error is not None:
        print(f"    trace: the profiler failed ({error}); no trace", flush=True)
        return
    print(f"    trace: {path}", flush=True)
    try:
        print(textwrap.indent(report(summarize(load(path), steps)), "    "))
    except Exception as e:
        print(f"    (timeline.py could not read it: {type(e).__name__}: {e})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("trace", help="a Chrome trace (.json or .json.gz) from torch.profiler")
    p.add_argument("--steps", type=int, default=1, help="steps the trace holds (per-step figures)")
    p.add_argument("--gap-us", type=float, default=20.0, help="shortest idle gap listed (us)")
    p.add_argument("--top", type=int, default=12, help="gaps and operators listed")
    args = p.parse_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    summary = summarize(load(args.trace), args.steps, args.gap_us, args.top)
    print(report(summary))


if __name__ == "__main__":
    main()
