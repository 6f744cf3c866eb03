#!/usr/bin/env python
"""Learning at equal wall-clock: validation bits/byte against seconds and steps, for named runs.

    python benchmarks/learning.py --corpus PATH/tinyshakespeare.txt --seconds 600 \\
        --run sign=configs/tinyshakespeare.toml \\
        --run "mom=configs/tinyshakespeare.toml --es.optimizer momentum" \\
        --backprop --reach 3.6 3.4 --pin 0 1 --out runs/learning
    python benchmarks/learning.py --replot runs/learning          # table and plot again from learning.json

Each ``--run NAME=CONFIG [--section.key value ...]`` is an EGGROLL run: ``python train.py
--config CONFIG ... --train.run_dir OUT/NAME`` in a subprocess, stopped with SIGTERM once
its training clock has run ``--seconds`` (``--run NAME@SECONDS=CONFIG ...``: a budget of
its own, e.g. a shorter one for a reference run; the trainer finishes the step, saves and writes
``history.jsonl``; its clock, ``time_s``, starts just before the first step, after the
set-up, so the budget is timed from the trainer's start-up banner, which it prints right
then). ``--train.steps`` is raised to 10^9 so the budget, not the config, ends a run (a
run's own ``--train.steps`` still wins). ``--backprop`` adds the float32 backprop
baseline (``benchmarks/backprop.py``) for the same budget on the same corpus, split and
validation slice, with the model and data sections of the first run's config (or
``--bp_config``). ``--section.key value`` given to this script apply to every run
(before each run's own overrides); ``--corpus PATH`` is ``--data.source PATH``.

Placement: without ``--pin`` the runs go one after another, each free to use every core.
``--pin C1 C2 ...`` runs up to that many at once, each pinned to its own core with
``taskset -c`` (two runs side by side on a 2-core machine: same hardware for both, half
each). The note printed at the start (and saved) says which run went where.

Writes into ``--out``: ``learning.md`` (the table), ``learning.json`` (every curve and
setting), ``learning.png`` (val bits/byte against minutes, log x, with the unigram, bigram
and compressor baselines as lines; matplotlib, in the ``bench`` extra), each run's log in
``logs/`` and each ES run's directory. Values at a time are the last evaluation at or before
it; "reach" is the time of the first evaluation at or below the threshold, so both are only
as fine as each run's evaluation interval (``--train.eval_every`` for ES runs,
``--bp_eval_every_s`` for backprop).

Seeds: ``--seeds 0 1 2`` runs every ``--run`` (and backprop) once per seed, as
``NAME-s0``, ``NAME-s1``, ... (``--train.seed``; backprop's ``--seed``), and the table gains
a second one over the seeds: median [min-max] of every value and time to reach, by run,
and the ratio of the medians to backprop's. One seed is a noisy measure early in a run:
on tinyshakespeare the shipped config's validation bits/byte at step 450 spans 0.11
across seeds 0, 1 and 2 (docs/training.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(ROOT))

from int_lm.config import parse_overrides  # noqa: E402

ES_STARTED = "int_lm: EGGROLL training"       # the trainer's banner, printed just before its clock starts
BP_STARTED = "backprop: training started"     # benchmarks/backprop.py's
MARKS_S = (60, 180, 600, 1800, 3600)          # 1, 3, 10, 30, 60 minutes
JSON_NAME, TABLE_NAME, PLOT_NAME = "learning.json", "learning.md", "learning.png"
BASELINE_STYLE = {"unigram": ":", "bigram": "--", "compressor": "-."}


# ---------------------------------------------------------------------------
# Curves: what a run's history says
# ---------------------------------------------------------------------------

def value_at(curve: list[dict], t: float) -> dict | None:
    """The last evaluation at or before ``t`` seconds, or None."""
    best = None
    for p in curve:
        if p["time_s"] <= t:
            best = p
    return best


def time_to_reach(curve: list[dict], threshold: float, budget: float) -> float | None:
    """Seconds of the first evaluation at or below ``threshold`` within the budget, or None."""
    for p in curve:
        if p["time_s"] <= budget and p["val_bits_per_byte"] <= threshold:
            return p["time_s"]
    return None


def marks_for(budget: float, marks=None) -> list[float]:
    """The columns of the table: 1, 3, 10, 30, 60 minutes up to the budget, and the budget itself."""
    out = [m for m in (marks or MARKS_S) if m <= budget]
    if not out or out[-1] < budget:
        out.append(budget)
    return out


def fmt_time(s: float) -> str:
    if s >= 60 and abs(s / 60 - round(s / 60)) < 1e-9:
        return f"{round(s / 60)} min"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:g} s"


def es_result(run_dir: Path, budget: float) -> dict:
    """Curve, steps, tokens/s and baselines from an ES run's history.jsonl (rows within the budget)."""
    path = run_dir / "history.jsonl"
    if not path.is_file():
        return {"curve": [], "steps": 0, "tokens_per_s": None, "baselines": {}, "error": f"no {path}"}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    inside = [r for r in rows if r["time_s"] <= budget]
    curve = [{"time_s": r["time_s"], "step": r["step"], "val_bits_per_byte": r["val/bits_per_byte"],
              "train_bits_per_byte": r.get("train/bits_per_byte_mean")}
             for r in rows if "val/bits_per_byte" in r]
    rates = sorted(r["perf/population_tokens_per_s"] for r in inside[1:] if "perf/population_tokens_per_s" in r)
    baselines = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("val/baseline_"):
                baselines[k[len("val/baseline_"):]] = v
        if baselines:
            break
    return {"curve": curve, "steps": inside[-1]["step"] if inside else 0,
            "steps_total": rows[-1]["step"] if rows else 0,
            "tokens_per_s": rates[len(rates) // 2] if rates else None, "baselines": baselines}


def bp_result(path: Path, budget: float) -> dict:
    if not path.is_file():
        return {"curve": [], "steps": 0, "tokens_per_s": None, "baselines": {}, "error": f"no {path}"}
    res = json.loads(path.read_text())
    inside = [p for p in res["curve"] if p["time_s"] <= budget]
    return {"curve": res["curve"], "steps": inside[-1]["step"] if inside else 0, "steps_total": res["steps"],
            "tokens_per_s": res["tokens_per_s"], "baselines": res["baselines"], "settings": res["settings"]}


# ---------------------------------------------------------------------------
# Running: subprocesses, placement, the budget
# ---------------------------------------------------------------------------

def parse_run(spec: str) -> tuple[str, str, list[str], float | None]:
    """``NAME[@SECONDS]=CONFIG [--section.key value ...]`` -> (name, config, extra args, own budget or None)."""
    parts = shlex.split(spec)
    if not parts:
        raise SystemExit("error: --run needs NAME=CONFIG [overrides]")
    name, eq, config = parts[0].partition("=")
    if not eq:
        name, config = Path(parts[0]).stem, parts[0]
    name, at, seconds = name.partition("@")
    budget = None
    if at:
        try:
            budget = float(seconds)
        except ValueError:
            pass
        if budget is None or not budget > 0:
            raise SystemExit(f"error: run {name!r}: the budget after '@' must be seconds > 0, got {seconds!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or name in ("logs", "backprop"):
        raise SystemExit(f"error: run name {name!r}: use letters, digits and _ . + - (not 'logs' or 'backprop')")
    return name, config, parts[1:], budget


def machine() -> dict:
    """What the runs ran on (read without starting JAX, so the runner holds no device)."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
        flags = set((re.search(r"^flags\s*:\s*(.*)$", text, re.M) or [None, ""])[1].split())
        info["cpu"] = model.group(1) if model else platform.processor()
        info["cpu_flags"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    except OSError:
        info["cpu"] = platform.processor()
    return info


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


class Job:
    """One run: its command, where it ran, what it printed and when its clock started."""

    def __init__(self, name: str, kind: str, cmd: list[str], out: Path, result_path: Path, budget: float,
                 group: str | None = None, seed: int | None = None):
        self.name, self.kind, self.cmd, self.out, self.result_path = name, kind, cmd, out, result_path
        self.budget = budget
        self.group, self.seed = group or name, seed     # --seeds: the run it repeats, and which seed
        self.core = None
        self.notes: list[str] = []
        self.started = self.clock0 = self.ended = None
        self.load = {}

    def run(self, core, budget: float, setup_timeout: float, stop_timeout: float, say) -> None:
        self.core = core
        cmd = self.cmd if core is None else ["taskset", "-c", str(core), *self.cmd]
        log_path = self.out / "logs" / f"{self.name}.log"
        marker = ES_STARTED if self.kind == "es" else BP_STARTED
        seen = threading.Event()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.load["start"] = loadavg()
        self.started = time.time()
        say(f"[{self.name}] start" + (f" on core {core}" if core is not None else "") + f": {shlex.join(cmd)}")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                    cwd=ROOT)

            def pump():
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    if not seen.is_set() and line.startswith(marker):
                        self.clock0 = time.time()
                        seen.set()

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            deadline = time.time() + setup_timeout
            while not seen.is_set() and proc.poll() is None and time.time() < deadline:
                seen.wait(0.2)
            if not seen.is_set():
                self.notes.append("never started training" if proc.poll() is not None
                                  else f"no start-up banner in {setup_timeout:g} s: killed")
            elif self.kind == "es":
                # The trainer's own clock started at the banner: stop it once that clock has run the budget.
                while proc.poll() is None and time.time() < self.clock0 + budget:
                    time.sleep(0.1)
                if proc.poll() is None:
                    # Finish the step, save, write history.jsonl. SIGTERM, not SIGINT: a runner started
                    # in the background (``... &``) starts its children with SIGINT ignored, and the
                    # trainer keeps an ignored signal ignored (int_lm/stopping.py).
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(stop_timeout)
                    except subprocess.TimeoutExpired:
                        self.notes.append(f"still running {stop_timeout:g} s after SIGTERM: killed")
                else:
                    self.notes.append("ended before the budget (its train.steps?)")
            try:
                proc.wait(budget + stop_timeout if seen.is_set() else 1)
            except subprocess.TimeoutExpired:
                self.notes.append("did not finish: killed")
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(5)
        self.ended = time.time()
        self.load["end"] = loadavg()
        stopped = (128 + signal.SIGTERM, 128 + signal.SIGINT)     # our stop, or Ctrl-C in the terminal
        if proc.returncode not in (0, None) and not (self.kind == "es" and proc.returncode in stopped):
            self.notes.append(f"exit status {proc.returncode} (see logs/{self.name}.log)")
        say(f"[{self.name}] done after {self.ended - self.started:.0f} s" +
            (f" ({'; '.join(self.notes)})" if self.notes else ""))


def placement_note(jobs: list[Job], cores, parallel: int = 1) -> str:
    """How the runs were placed, and which ran at the same time as which."""
    if cores:
        lines = [f"Runs went up to {len(cores)} at a time, each pinned to its own core with taskset "
                 f"(cores {', '.join(map(str, cores))}); other processes on the machine were not controlled."]
    elif parallel > 1:
        lines = [f"Runs went up to {parallel} at a time, unpinned (sharing every core); other processes on the "
                 "machine were not controlled."]
    else:
        return ("Runs went one after another, each unpinned (free to use every core); "
                "other processes on the machine were not controlled.")
    for j in jobs:
        if j.started is None:
            continue
        beside = [o.name for o in jobs if o is not j and o.started is not None
                  and o.started < j.ended and j.started < o.ended]
        where = f"core {j.core}" if j.core is not None else "unpinned"
        lines.append(f"- {j.name}: {where}" + (f", alongside {', '.join(beside)}" if beside else ", alone"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Table and plot (also from saved JSON: --replot)
# ---------------------------------------------------------------------------

def shared_baselines(runs: list[dict]) -> dict:
    for r in runs:
        if r.get("baselines"):
            return r["baselines"]
    return {}


def run_budget(report: dict, run: dict) -> float:
    """A run's own budget: backprop's may be shorter (``--bp_seconds``); older reports lack the key."""
    return run.get("budget_s") or run.get("settings", {}).get("seconds") or report["budget_s"]


def table(report: dict) -> str:
    budget, reach = report["budget_s"], report.get("reach", [])
    marks = marks_for(budget, report.get("marks_s"))
    runs = report["runs"]
    bp = next((r for r in runs if r["kind"] == "backprop"), None)
    head = ["run", "method"] + [f"{fmt_time(m)}" for m in marks] + ["steps", "tokens/s"]
    for thr in reach:
        head += [f"s to <= {thr:g}"] + ([f"ES / backprop ({thr:g})"] if bp else [])
    own_budget = {r["name"]: run_budget(report, r) for r in runs}
    rows = []
    bps = [x for x in runs if x["kind"] == "backprop"]
    for r in runs:
        # with --seeds each run is compared with the backprop run of its own seed
        bp = next((x for x in bps if x.get("seed") == r.get("seed")), bps[0] if bps else None)
        cells = [r["name"], "backprop (Adam, float32)" if r["kind"] == "backprop" else "EGGROLL (int8)"]
        own = own_budget[r["name"]]
        for m in marks:
            p = value_at(r["curve"], m) if m <= own else None     # no value past a run's own budget
            cells.append("-" if p is None else f"{p['val_bits_per_byte']:.3f}")
        cells += [str(r["steps"]), "-" if not r.get("tokens_per_s") else f"{r['tokens_per_s']:,.0f}"]
        for thr in reach:
            t = time_to_reach(r["curve"], thr, own)
            cells.append(f"{t:.0f}" if t is not None else f"not in {own:g}")
            if bp:
                tb = time_to_reach(bp["curve"], thr, own_budget[bp["name"]])
                if r is bp:
                    cells.append("1" if tb is not None else "-")
                elif tb is None:      # backprop never got there: its own budget bounds the ratio
                    cells.append("-" if t is None else f"< {t / own_budget[bp['name']]:.2g}")
                else:                 # this run never got there: its own budget bounds the ratio
                    cells.append(f"{t / tb:.1f}" if t is not None else f"> {own / tb:.1f}")
        rows.append(cells)
    base = shared_baselines(runs)
    summary = over_seeds(report)
    out = [f"# Learning at equal wall-clock ({fmt_time(budget)} per run)", ""]
    out.append("Validation bits/byte of each run at the last evaluation at or before each time (the trainer's "
               "slice of the validation split, exact bits from the model's logits); steps and training "
               "tokens/s (ES: population-tokens/s, median step; backprop: batch tokens/s, median step) within "
               "the budget; seconds to the first evaluation at or below each threshold, and their ratio to "
               "backprop's. Times include compiling the first step and every evaluation; set-up is outside.")
    out.append("")
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    out += ["| " + " | ".join(c) + " |" for c in rows]
    out.append("")
    out += summary
    if base:
        out.append("Baselines (validation split): " + ", ".join(f"{k} {v:.3f}" for k, v in base.items()) + ".")
        out.append("")
    out.append("Placement: " + report.get("placement", ""))
    m = report.get("machine", {})
    if m:
        out.append("")
        out.append(f"Machine: {m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs "
                   f"({' '.join(m.get('cpu_flags', [])) or 'flags unknown'}). Load average (1 min) at each run's "
                   "start/end: " + ", ".join(f"{r['name']} {r.get('load', {}).get('start')}/"
                                             f"{r.get('load', {}).get('end')}" for r in runs) + ".")
    shorter = [f"{name} ran for {fmt_time(own)}" for name, own in own_budget.items() if own < budget]
    if shorter:
        out += ["", "Shorter budgets: " + ", ".join(shorter) + " (cells after it: -); its times to reach a "
                "threshold and the ratios use its own run."]
    notes = [f"{r['name']}: {'; '.join(r['notes'])}" for r in runs if r.get("notes")]
    if notes:
        out += ["", "Notes: " + " ".join(notes)]
    out += ["", "Commands:", ""] + [f"    {shlex.join(r['command'])}" for r in runs if r.get("command")]
    return "\n".join(out) + "\n"


def median_of(values: list[float]) -> float:
    """The median (the mean of the middle two for an even count); inf counts as larger than any value."""
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def over_seeds(report: dict) -> list[str]:
    """Markdown lines: each run repeated over seeds (``--seeds``) as median [min-max], or [] if none is.

    A seed that did not reach a threshold within its budget counts as later than every
    seed that did; the median is then "> budget" when half or more missed it. The ratio
    to backprop is of the medians.
    """
    budget, reach = report["budget_s"], report.get("reach", [])
    groups: dict[str, list[dict]] = {}
    for r in report["runs"]:
        groups.setdefault(r.get("group") or r["name"], []).append(r)
    if not any(len(g) > 1 for g in groups.values()):
        return []
    marks = marks_for(budget, report.get("marks_s"))

    def reach_times(g, thr):
        return [t if t is not None else math.inf
                for t in (time_to_reach(r["curve"], thr, run_budget(report, r)) for r in g)]

    bps = [r for r in report["runs"] if r["kind"] == "backprop"]
    bp_median = {thr: median_of(reach_times(bps, thr)) for thr in reach} if bps else {}
    head = ["run", "seeds"] + [fmt_time(m) for m in marks]
    for thr in reach:
        head += [f"s to <= {thr:g}"] + ([f"ES / backprop ({thr:g})"] if bps else [])
    rows = []
    for name, g in groups.items():
        own = min(run_budget(report, r) for r in g)
        cells = [name, ", ".join(str(r.get("seed")) for r in g)]
        for m in marks:
            vals = [p["val_bits_per_byte"] for p in (value_at(r["curve"], m) for r in g) if p is not None]
            cells.append("-" if m > own or len(vals) < len(g) else
                         f"{median_of(vals):.3f} [{min(vals):.3f}-{max(vals):.3f}]")
        for thr in reach:
            ts = reach_times(g, thr)
            med = median_of(ts)
            hi = f"{max(ts):.0f}" if max(ts) < math.inf else "not in"
            cells.append(f"> {own:g} [{min(ts):.0f}-not in]" if med == math.inf and min(ts) < math.inf else
                         f"not in {own:g}" if med == math.inf else f"{med:.0f} [{min(ts):.0f}-{hi}]")
            if bps:
                tb = bp_median[thr]
                cells.append("-" if med == math.inf or tb == math.inf else f"{med / tb:.1f}")
        rows.append(cells)
    out = [f"Over seeds: median [min-max] of the runs above, by run ({len(groups)} runs).", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(c) + " |" for c in rows] + [""]


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    lows, firsts, lasts = [], [], []
    colours: dict[str, str] = {}      # one colour per run; its seeds (--seeds) share it
    for r in report["runs"]:
        pts = [p for p in r["curve"] if p["time_s"] > 0]
        if not pts:
            continue
        xs = [p["time_s"] / 60 for p in pts]
        ys = [p["val_bits_per_byte"] for p in pts]
        style = "--" if r["kind"] == "backprop" else "-"
        group = r.get("group") or r["name"]
        first = group not in colours
        colours.setdefault(group, f"C{len(colours) % 10}")
        label = f"{r['name']} ({r['steps']} steps)" if group == r["name"] else (
            f"{group} (seeds {', '.join(str(x.get('seed')) for x in report['runs'] if x.get('group') == group)})"
            if first else None)
        ax.plot(xs, ys, style, marker=".", markersize=3, color=colours[group], label=label)
        lows.append(min(ys))
        firsts.append(ys[0])
        lasts.append(ys[-1])
    base = shared_baselines(report["runs"])
    for k, v in base.items():
        ax.axhline(v, color="gray", linestyle=BASELINE_STYLE.get(k, ":"), linewidth=1, label=f"{k} {v:.3f}")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(
        lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""))
    ax.set_xlabel("minutes (log scale; wall clock incl. evaluations)")
    ax.set_ylabel("validation bits/byte")
    ax.set_title(f"Learning at equal wall-clock ({fmt_time(report['budget_s'])} per run)")
    values = lows + list(base.values())
    if values:
        top = max(firsts + list(base.values()))
        if "unigram" in base and top > base["unigram"] + 0.5:
            # the first evaluations of an untrained model go off the top, but every run's last one shows
            top = max([base["unigram"] + 0.5] + lasts)
        pad = 0.04 * (top - min(values)) + 0.05
        ax.set_ylim(min(values) - pad, top + pad)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: dict, out: Path) -> None:
    (out / JSON_NAME).write_text(json.dumps(report, indent=1))
    (out / TABLE_NAME).write_text(table(report))
    try:
        plot(report, out / PLOT_NAME)
    except ImportError:
        print("no plot: matplotlib is missing (pip install -e \".[bench]\")", file=sys.stderr)


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[], metavar="'NAME=CONFIG [--k.v X ...]'",
                        help="an EGGROLL run (repeatable)")
    parser.add_argument("--backprop", action="store_true", help="add the float32 backprop baseline")
    parser.add_argument("--seconds", type=float, default=600.0, help="wall-clock budget of every run (s)")
    parser.add_argument("--bp_seconds", type=float, default=None,
                        help="the backprop baseline's budget (default: --seconds); it needs far less")
    parser.add_argument("--corpus", default="", help="shorthand for --data.source PATH (every run)")
    parser.add_argument("--out", default="runs/learning", help="output directory")
    parser.add_argument("--pin", type=int, nargs="+", default=None, metavar="CORE",
                        help="run up to len(CORES) at once, each pinned to its own core (taskset)")
    parser.add_argument("--jobs", type=int, default=0,
                        help="runs at a time without pinning (default 1; with --pin: one per core)")
    parser.add_argument("--reach", type=float, nargs="*", default=[], metavar="BPB",
                        help="report the seconds to first reach these val bits/byte")
    parser.add_argument("--marks", type=float, nargs="*", default=None, metavar="S",
                        help="table columns in seconds (default 60 180 600 1800 3600, up to the budget)")
    parser.add_argument("--bp_config", "--bp-config", default="",
                        help="backprop's config (default: the first run's, with its overrides)")
    for flag, kind, what in (("batch", int, "sequences per batch"), ("seq_len", int, "tokens per sequence"),
                             ("lr", float, "Adam learning rate"), ("seed", int, "seed"),
                             ("eval_every_s", float, "seconds between validations")):
        parser.add_argument(f"--bp_{flag}", f"--bp-{flag.replace('_', '-')}", type=kind, default=None,
                            help=f"backprop's {what} (default: benchmarks/backprop.py's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="run every run (and backprop) once per seed, as NAME-sSEED, and add a table "
                             "over seeds (median and range)")
    parser.add_argument("--setup_timeout", "--setup-timeout", type=float, default=1800.0,
                        help="seconds a run may take to start training")
    parser.add_argument("--stop_timeout", "--stop-timeout", type=float, default=600.0,
                        help="seconds a run may take to save and exit after SIGTERM")
    parser.add_argument("--replot", default="", metavar="DIR", help="rewrite table and plot from DIR/learning.json")
    values, rest = parse_overrides(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(rest)

    if args.replot:
        out = Path(args.replot)
        report = json.loads((out / JSON_NAME).read_text())
        if args.reach:
            report["reach"] = args.reach
        if args.marks:
            report["marks_s"] = args.marks
        write_outputs(report, out)
        print((out / TABLE_NAME).read_text())
        return 0

    if not args.run and not args.backprop:
        parser.error("nothing to run: give --run NAME=CONFIG and/or --backprop")
    if args.pin and not shutil.which("taskset"):
        parser.error("--pin needs taskset (util-linux)")
    overrides = [f"--data.source={args.corpus}"] if args.corpus else []
    for section, entries in values.items():
        overrides += [f"--{section}.{k}={v}" for k, v in entries.items()]
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)

    jobs: list[Job] = []
    runs = [parse_run(s) for s in args.run]
    if len({n for n, _, _, _ in runs}) != len(runs):
        parser.error("run names must differ")
    if args.seeds is not None and (len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0):
        parser.error(f"--seeds must be distinct seeds >= 0, got {args.seeds}")
    if args.seeds and args.bp_seed is not None:
        parser.error("--bp_seed and --seeds both set backprop's seed: give one")
    seeds = args.seeds or [None]
    for name, config, extra, budget in runs:
        for seed in seeds:
            job_name = name if seed is None else f"{name}-s{seed}"
            run_dir = out / job_name
            if run_dir.exists() and any(run_dir.iterdir()):
                parser.error(f"{run_dir} is not empty (the trainer would resume it): choose another --out or "
                             "remove it")
            seeded = [] if seed is None else [f"--train.seed={seed}"]
            cmd = [sys.executable, str(ROOT / "train.py"), "--config", config, "--train.steps=1000000000",
                   *overrides, *extra, *seeded, f"--train.run_dir={run_dir}", "--train.progress=false"]
            jobs.append(Job(job_name, "es", cmd, out, run_dir, budget or args.seconds, group=name, seed=seed))
    if args.backprop:
        config, extra = (args.bp_config, []) if args.bp_config or not runs else (runs[0][1], runs[0][2])
        config = config or "configs/default.toml"
        bp_seconds = args.bp_seconds or args.seconds
        for seed in seeds:
            job_name = "backprop" if seed is None else f"backprop-s{seed}"
            result = out / job_name / "result.json"
            cmd = [sys.executable, str(ROOT / "benchmarks" / "backprop.py"), "--config", config, *overrides,
                   *extra, "--seconds", f"{bp_seconds:g}", "--json", str(result)]
            for flag in ("batch", "seq_len", "lr", "seed", "eval_every_s"):
                if getattr(args, f"bp_{flag}") is not None:
                    cmd += [f"--{flag}", str(getattr(args, f"bp_{flag}"))]
            if seed is not None:
                cmd += ["--seed", str(seed)]
            jobs.append(Job(job_name, "backprop", cmd, out, result, bp_seconds, group="backprop", seed=seed))

    lock = threading.Lock()

    def say(msg: str) -> None:
        with lock:
            print(msg, flush=True)

    cores = args.pin or []
    if args.jobs > 1 and not cores:
        say(f"placement: up to {args.jobs} runs at a time, unpinned (they share every core)")
    elif cores:
        say(f"placement: up to {len(cores)} runs at a time, each pinned to its own core "
            f"({', '.join(map(str, cores))}) with taskset; the order: {', '.join(j.name for j in jobs)}")
    else:
        say("placement: one run at a time, unpinned (each may use every core); "
            "use --pin 0 1 to run two side by side, one per core")
    say(f"budget: {args.seconds:g} s of each run's training clock (set-up excluded, first compile and "
        f"evaluations included); outputs in {out}")
    t0 = time.time()
    abort = threading.Event()     # Ctrl-C: the runs in flight got SIGINT too (they save and stop); start no more
    free: Queue = Queue()
    for c in cores or [None] * max(1, args.jobs):
        free.put(c)

    def work(job: Job) -> None:
        core = free.get()
        try:
            if not abort.is_set():
                job.run(core, job.budget, args.setup_timeout, args.stop_timeout, say)
        finally:
            free.put(core)

    pool = ThreadPoolExecutor(free.qsize())
    try:
        futures = [pool.submit(work, job) for job in jobs]
        for f in futures:
            f.result()
    except KeyboardInterrupt:
        abort.set()
        say("interrupted: waiting for the runs in flight to save and stop; the report covers what ran")
    finally:
        pool.shutdown(wait=True)

    report_runs = []
    for job in jobs:
        if job.started is None:
            continue
        res = (es_result(job.result_path, job.budget) if job.kind == "es"
               else bp_result(job.result_path, job.budget))
        notes = job.notes + ([res.pop("error")] if "error" in res else [])
        report_runs.append({"name": job.name, "group": job.group, "seed": job.seed, "kind": job.kind,
                            "command": job.cmd, "core": job.core,
                            "budget_s": job.budget, "load": job.load, "notes": notes, **res})
    bases = {json.dumps(r["baselines"], sort_keys=True) for r in report_runs if r.get("baselines")}
    if len(bases) > 1:
        say("warning: the runs report different baselines: were they on the same corpus and split?")
    report = {"version": 1, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.seconds,
              "seeds": args.seeds, "reach": args.reach, "marks_s": args.marks,
              "placement": placement_note(jobs, cores, args.jobs),
              "machine": machine(), "total_wall_s": time.time() - t0, "runs": report_runs}
    write_outputs(report, out)
    say("")
    say((out / TABLE_NAME).read_text())
    return 0 if all(r["curve"] for r in report_runs) else 1


if __name__ == "__main__":
    sys.exit(main())
