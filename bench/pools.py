"""Every pool (issue 22): the no-op workload on the worker command a newcomer types, and
on Celery's pools by name, taskrail beside the hand-written baseline and Celery's no-op.

Each round runs, for each worker command and on fresh workers, the baseline
(``baseline_lifecycle.py`` = ``shared/bench/naive_lifecycle.py``), taskrail and Celery's
no-op in turn, N tasks each (bench/sides.py's ``throughput``, as lifecycle.py times it):

- ``default``: ``celery -A <app> worker -c 2`` with no pool flag, what the README's
  ``celery -A workers worker`` gives: Celery's prefork for the baseline and the no-op,
  taskrail's default pool (``orchestration.constants.DEFAULT_WORKER_POOL``) for taskrail;
- ``prefork``: ``-P prefork -c 2`` for every side (Celery's default, named);
- ``solo``: ``-P solo`` for every side (one process, the hops in it).

Printed per command: the medians of hops/s (no-op: messages/s) and worker CPU per hop,
taskrail/baseline and taskrail/no-op, and the per-round ratios. Goals (issue 22): in
every pool taskrail >= 1.0x the baseline and >= 0.8x the no-op, or the command with no
pool flag starts the tuned deployment; whatever that command runs is not slower than the
baseline in the same pool and process count, and not slower than the baseline's own
``celery worker -c 2`` (the same command).

usage: python bench/pools.py [-n 2000] [--rounds 3] [--commands default,prefork,solo]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as cm
from sides import Baseline, Noop, Side, Taskrail, fmt_tp, throughput

from orchestration.constants import DEFAULT_WORKER_POOL

VERDICT = {True: "MET", False: "NOT MET"}
COMMANDS = {
    "default": cm.Proc(None, 2),
    "prefork": cm.Proc("prefork", 2),
    "solo": cm.Proc("solo", 1),
    "threads": cm.Proc("threads", 2),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=2000, help="tasks per throughput run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (medians are reported)")
    ap.add_argument(
        "--commands",
        default="default,prefork,solo",
        help=f"worker commands to run, of {','.join(COMMANDS)}",
    )
    ap.add_argument("--taskrail-app", default="workers", help="celery -A module of taskrail")
    ap.add_argument("--log-dir", default=None, help="worker logs (default: a temporary dir)")
    args = ap.parse_args()
    commands = [name.strip() for name in args.commands.split(",") if name.strip()]
    if unknown := [name for name in commands if name not in COMMANDS]:
        raise SystemExit(f"unknown command(s) {unknown}; known: {', '.join(COMMANDS)}")
    # "No pool flag" must mean Celery's and taskrail's defaults, not the caller's shell.
    os.environ.pop("CELERY_WORKER_POOL", None)
    os.environ.pop("CELERY_WORKER_CONCURRENCY", None)

    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="taskrail_bench_pools_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    cm.fresh_database()
    baseline = Baseline(log_dir)
    taskrail = Taskrail(log_dir, "INFO", args.taskrail_app)
    noop = Noop(log_dir)
    sides: list[Side] = [baseline, taskrail, noop]
    print(
        f"# pools.py (no-op workload on each worker command)  N={args.n} tasks, "
        f"rounds={args.rounds}, commands {', '.join(commands)}; taskrail's default pool "
        f"{DEFAULT_WORKER_POOL}; taskrail log level INFO; worker logs in {log_dir}",
        flush=True,
    )

    tp: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in range(1, args.rounds + 1):
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        print(f"## round {r}/{args.rounds}  {time.strftime('%H:%M:%S')}  load {load}", flush=True)
        for command in commands:
            proc = COMMANDS[command]
            print(f"  {command}: celery -A <app> worker {proc.describe()}", flush=True)
            for side in sides:
                res = throughput(side, [proc], args.n)
                tp.setdefault((command, side.name), []).append(res)
                print("  " + fmt_tp(side.name, res), flush=True)
                for note in res["notes"]:
                    print(f"      WARNING {side.name}: {note}")

    med = lambda rs, k: statistics.median(x[k] for x in rs)  # noqa: E731
    print()
    print(f"== every pool: medians of {args.rounds} round(s), N={args.n}, one worker process ==")
    head = f"{'command':34s}{'baseline':>10s}{'taskrail':>10s}{'no-op':>10s}"
    print(head + f"{'t/base':>8s}{'t/no-op':>8s}   CPU ms/hop base, taskrail")
    hops: dict[str, dict[str, float]] = {}
    for command in commands:
        b, t, z = (tp[(command, s.name)] for s in sides)
        hops[command] = {s.name: med(tp[(command, s.name)], "hops_s") for s in sides}
        hb, ht, hz = (hops[command][s.name] for s in sides)
        label = f"worker {COMMANDS[command].describe()}"
        print(
            f"{label:34s}{hb:10.0f}{ht:10.0f}{hz:10.0f}{ht / hb:8.2f}{ht / hz:8.2f}   "
            f"{med(b, 'cpu_ms_hop'):.2f}, {med(t, 'cpu_ms_hop'):.2f}"
        )
        rounds_b = ", ".join(f"{x['hops_s'] / y['hops_s']:.2f}" for x, y in zip(t, b, strict=True))
        rounds_z = ", ".join(f"{x['hops_s'] / y['hops_s']:.2f}" for x, y in zip(t, z, strict=True))
        print(f"{'':4s}per round, taskrail/baseline {rounds_b}; taskrail/no-op {rounds_z}")
    before = max(x["idle_busy"] for rs in tp.values() for x in rs)
    print(
        f"machine CPU busy in the second before each run: up to {before * 100:.0f}%"
        + ("  <- other processes competed for the cores" if before > 0.1 else "")
    )
    for command in commands:
        ratio_b = hops[command]["taskrail"] / hops[command]["baseline"]
        ratio_z = hops[command]["taskrail"] / hops[command]["celery-noop"]
        print(
            f"{command}: taskrail/baseline {ratio_b:.2f} (>= 1.0: {VERDICT[ratio_b >= 1.0]}), "
            f"taskrail/no-op {ratio_z:.2f} (>= 0.8: {VERDICT[ratio_z >= 0.8]})"
        )
    if "default" in commands:
        same_pool = DEFAULT_WORKER_POOL if DEFAULT_WORKER_POOL in commands else None
        t_default = hops["default"]["taskrail"]
        if same_pool is not None:
            ratio = t_default / hops[same_pool]["baseline"]
            print(
                f"no pool flag: taskrail ({DEFAULT_WORKER_POOL}) / baseline in the same pool and "
                f"process count (-P {same_pool}): {ratio:.2f} (>= 1.0: {VERDICT[ratio >= 1.0]})"
            )
        ratio = t_default / hops["default"]["baseline"]
        print(
            f"no pool flag: taskrail ({DEFAULT_WORKER_POOL}) / the baseline's own "
            f"`celery worker -c 2` (prefork): {ratio:.2f} (the same command)"
        )


if __name__ == "__main__":
    main()
