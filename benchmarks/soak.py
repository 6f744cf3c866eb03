#!/usr/bin/env python
"""Soak run: the CPU default trained for >= MINUTES with two forced SIGKILLs, against an uninterrupted run.

    nice -n 10 python benchmarks/soak.py --out /tmp/soak --minutes 31 --every 12

Run A (killed): ``python train.py`` (configs/default.toml) with a checkpoint every
``--every`` steps; SIGKILL once at a random moment (~28% of the time) and once
while a checkpoint save is in flight (an orbax ``*tmp*`` directory exists,
~55%); each time resumed with the same command. After the second resume A's
``train.steps`` is set so that A ends after ``--minutes`` in all.
Run B (reference) trains alongside, never interrupted, up to A's final step
(then stopped with Ctrl-C; its checkpoint at that step was written before).
Every checkpoint both runs hold is compared array by array (weights, the update
rule's state, recurrent states, data cursor), the exported safetensors of the final step are compared,
and the logged train/update metrics are compared step by step. Prints one JSON
summary line at the end (also written to OUT/summary.json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from int_lm import checkpoint  # noqa: E402


def say(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def env() -> dict:
    e = dict(os.environ)
    e.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return e


def start(run_dir: Path, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "train.py", "--train.run_dir", str(run_dir), *extra]
    f = open(log, "a")
    f.write(f"\n$ {' '.join(cmd)}\n")
    f.flush()
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT)


def progress_step(log: Path) -> int:
    """Steps completed, from the last tqdm counter in the log (progress bar written to the file)."""
    found = re.findall(r"\| *(\d+)/\d+ \[", log.read_text(errors="replace"))
    return int(found[-1]) if found else -1


def saving(run_dir: Path) -> bool:
    root = checkpoint.checkpoint_dir(run_dir)
    return root.is_dir() and any("tmp" in p.name for p in root.iterdir())


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def state_of(run_dir: Path, step: int) -> dict:
    r = checkpoint.restore(run_dir, step)
    return {"cursor": r.cursor, "seed": r.seed, "arrays": checkpoint.state_arrays(r)}   # weights, rule, states


def same(a: dict, b: dict) -> bool:
    import numpy as np
    return (a["cursor"] == b["cursor"] and a["seed"] == b["seed"] and set(a["arrays"]) == set(b["arrays"])
            and all(np.array_equal(a["arrays"][k], b["arrays"][k]) for k in a["arrays"]))


def logged(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "history.jsonl").read_text().splitlines():
        h = json.loads(line)
        out[h["step"]] = {k: v for k, v in h.items() if k.startswith(("train/", "update/"))}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/soak")
    ap.add_argument("--minutes", type=float, default=31.0, help="wall time of the killed run A")
    ap.add_argument("--every", type=int, default=12, help="train.checkpoint_every (about a minute of steps)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the random kill moment")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    a_dir, b_dir = out / "A", out / "B"
    common = ["--train.checkpoint_every", str(args.every), "--train.keep_checkpoints", "100000",
              "--train.progress", "true"]
    far = ["--train.steps", "100000"]
    total_s = args.minutes * 60
    rng = random.Random(args.seed)
    summary: dict = {"every": args.every, "minutes": args.minutes, "kills": []}

    t0 = time.monotonic()
    b = start(b_dir, out / "B.log", *common, *far)
    a = start(a_dir, out / "A.log", *common, *far)
    say(f"started A (pid {a.pid}) and B (pid {b.pid}) in {out}")

    # Kill 1: a random moment.
    t_kill = total_s * rng.uniform(0.22, 0.34)
    while time.monotonic() - t0 < t_kill:
        assert a.poll() is None, f"A exited early ({a.returncode}); see {out / 'A.log'}"
        time.sleep(1)
    step_now = progress_step(out / "A.log")
    kill(a)
    last = checkpoint.list_steps(a_dir)[-1]
    summary["kills"].append({"when": "random", "at_s": round(time.monotonic() - t0), "steps_done": step_now,
                             "last_checkpoint": last, "steps_lost": step_now - last,
                             "tmp_dirs_left": [p.name for p in checkpoint.checkpoint_dir(a_dir).iterdir()
                                               if "tmp" in p.name]})
    say(f"kill 1: {summary['kills'][-1]}")
    a = start(a_dir, out / "A.log", *common, *far)
    t_phase2, step_phase2 = time.monotonic(), last

    # Kill 2: while a checkpoint save is in flight.
    t_kill = total_s * 0.55
    while time.monotonic() - t0 < t_kill:
        assert a.poll() is None, f"A exited early ({a.returncode})"
        time.sleep(1)
    before = checkpoint.list_steps(a_dir)
    while not saving(a_dir):
        assert a.poll() is None, f"A exited early ({a.returncode})"
        time.sleep(0.002)
    kill(a)
    tmp = [p.name for p in checkpoint.checkpoint_dir(a_dir).iterdir() if "tmp" in p.name]
    # the bar is updated after the save starts: the step being saved is done
    step_now = max([progress_step(out / "A.log")] + [int(n.split(".")[0]) for n in tmp])
    last = checkpoint.list_steps(a_dir)[-1]
    summary["kills"].append({"when": "during a save", "at_s": round(time.monotonic() - t0),
                             "steps_done": step_now, "last_checkpoint": last,
                             "steps_lost": step_now - last, "tmp_dirs_left": tmp,
                             "checkpoints_before_save": before[-3:], "checkpoints_after_kill": checkpoint.list_steps(a_dir)[-3:]})
    say(f"kill 2: {summary['kills'][-1]}")

    # Rate over the second phase -> the final step so that A runs >= total_s in all.
    rate = max(0.01, (step_now - step_phase2) / max(1.0, time.monotonic() - t_phase2))
    remaining = max(0.0, total_s - (time.monotonic() - t0))
    final = int(math.ceil((last + rate * remaining + 1) / args.every) * args.every)
    summary["final_step"] = final
    say(f"A resumes from {last}, ends at step {final} (rate {rate:.3f} steps/s, {remaining:.0f} s left)")
    a = start(a_dir, out / "A.log", *common, "--train.steps", str(final))
    rc = a.wait()
    summary["a_wall_s"] = round(time.monotonic() - t0)
    summary["a_exit"] = rc
    say(f"A done (exit {rc}) after {summary['a_wall_s']} s")

    while final not in checkpoint.list_steps(b_dir):
        assert b.poll() is None, f"B exited early ({b.returncode})"
        time.sleep(1)
    b.send_signal(signal.SIGINT)
    b.wait()
    summary["b_wall_s"] = round(time.monotonic() - t0)
    say("B reached the final step; stopped")

    # Compare every common checkpoint, the exports, the history.
    common_steps = sorted(set(checkpoint.list_steps(a_dir)) & set(checkpoint.list_steps(b_dir)))
    common_steps = [s for s in common_steps if s <= final]
    mismatched = [s for s in common_steps if not same(state_of(a_dir, s), state_of(b_dir, s))]
    summary["checkpoints_compared"] = len(common_steps)
    summary["checkpoints_mismatched"] = mismatched
    from safetensors.numpy import load_file
    import numpy as np
    ea, eb = out / "A.safetensors", out / "B.safetensors"
    checkpoint.export_model(a_dir, ea, final)
    checkpoint.export_model(b_dir, eb, final)
    xa, xb = load_file(str(ea)), load_file(str(eb))
    summary["final_exports_identical"] = set(xa) == set(xb) and all(np.array_equal(xa[k], xb[k]) for k in xa)
    ha, hb = logged(a_dir), logged(b_dir)
    steps = [s for s in range(1, final + 1)]
    summary["history_steps_compared"] = sum(1 for s in steps if s in ha and s in hb)
    summary["history_mismatched"] = [s for s in steps if s in ha and s in hb and ha[s] != hb[s]][:10]
    summary["history_complete"] = all(s in ha for s in steps)
    summary["ok"] = (not mismatched and summary["final_exports_identical"] and not summary["history_mismatched"]
                     and summary["history_complete"] and rc == 0)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
