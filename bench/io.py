"""The I/O-bound workload: every handler waits on a slow outside call (it sleeps
``--work-ms``, default 200 ms), and what counts is how many calls the workers keep in
flight on two cores.

taskrail runs the deployment the Procfile ships on a 2-core machine: ``worker`` (a
``--pool solo`` worker for the short hops, ``taskrail.hops`` and ``taskrail.control``)
once per core (``--hop-workers``, default 2) and ``executor`` (a ``--pool threads``
worker for ``taskrail.execute``, ``--threads`` threads, default 200,
``--prefetch-multiplier 1``), so the handler's wait holds a thread, not a process, and
no lock is held across the call (taskrail's breaker is consulted before and recorded
after it). The hand-written baseline runs as Celery runs by default, ``--pool prefork
-c 2``: its complete step sleeps as long, so it has 2 calls in flight at most; it runs
fewer tasks (``--baseline-n``, default 200) to keep the run short, which does not change
its rate.

Figures per side: tasks/s (N tasks submitted, clock from the first enqueue to the
poll that sees all N final), calls in flight on average (tasks/s x work time), worker
CPU per task, peak RSS; each round runs both sides, and the summary gives the medians
over rounds (3 by default: this machine's speed drifts from minute to minute). Goal
(issue 8): taskrail >= 300 tasks/s with 200 ms handlers and 3,000 tasks.

usage: python bench/io.py [-n 3000] [--work-ms 200] [--threads 200] [--baseline-n 200]
                          [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as cm
from sides import Baseline, Taskrail, throughput

GOAL_TASKS_S = 300


def taskrail_procs(threads: int, hop_workers: int) -> list[cm.Proc]:
    """The Procfile's deployment: solo worker(s) for the short hops, threads for execute."""
    hops = [cm.Proc("solo", 1, "taskrail.hops,taskrail.control") for _ in range(hop_workers)]
    execute = cm.Proc("threads", threads, "taskrail.execute", ("--prefetch-multiplier", "1"))
    return [*hops, execute]


def line(name: str, r: dict, work_ms: float) -> str:
    in_flight = r["tasks_s"] * work_ms / 1000
    return (
        f"  {name:9s} {r['tasks_s']:7.0f} tasks/s  ({r['dt']:.2f}s; {in_flight:.0f} calls in "
        f"flight on average; worker CPU/task {r['cpu_ms_hop'] * 3:.2f} ms; machine busy "
        f"{r['busy'] * 100:.0f}%, {r['idle_busy'] * 100:.0f}% just before; peak RSS "
        f"{r['rss_sum']:.0f} MB over {r['nproc']} processes)\n"
        f"  {'':9s} CPU/task by process, ms: {cpu_split(r)}"
    )


def cpu_split(r: dict) -> str:
    """Worker processes in their order, then the servers (every postgres backend, Redis)."""
    parts = [f"worker{k + 1} {ms:.2f}" for k, ms in enumerate(r["proc_cpu_ms_task"])]
    parts += [f"{name} {ms:.2f}" for name, ms in r["server_cpu_ms_task"].items()]
    return ", ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=3000, help="taskrail tasks")
    ap.add_argument("--work-ms", type=float, default=200.0, help="handler wait per task")
    ap.add_argument("--threads", type=int, default=200, help="threads of the execute worker")
    ap.add_argument("--hop-workers", type=int, default=2, help="solo workers for short hops")
    ap.add_argument("--baseline-n", type=int, default=200, help="baseline tasks (prefork -c 2)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (medians are reported)")
    ap.add_argument("--taskrail-log-level", default="INFO")
    args = ap.parse_args()

    log_dir = Path(tempfile.mkdtemp(prefix="taskrail-bench-io-"))
    cm.fresh_database()
    baseline, taskrail = Baseline(log_dir), Taskrail(log_dir, args.taskrail_log_level)
    ours = taskrail_procs(args.threads, args.hop_workers)
    theirs = cm.same_procs("prefork", 2, 1)
    print(
        f"# io.py  handler wait {args.work_ms:.0f} ms; taskrail {args.n} tasks on "
        f"{cm.describe_procs(ours)}; baseline {args.baseline_n} tasks on "
        f"{cm.describe_procs(theirs)}; logs in {log_dir}"
    )
    results: dict[str, list[dict]] = {"baseline": [], "taskrail": []}
    for k in range(args.rounds):
        b = throughput(
            baseline, theirs, args.baseline_n, work_ms=args.work_ms,
            env={"WORK_MS": str(args.work_ms)},
        )  # fmt: skip
        t = throughput(taskrail, ours, args.n, work_ms=args.work_ms)
        results["baseline"].append(b)
        results["taskrail"].append(t)
        print(f"round {k + 1}/{args.rounds}")
        print(line("baseline", b, args.work_ms))
        print(line("taskrail", t, args.work_ms))
        for r in (b, t):
            for note in r["notes"]:
                print(f"  ! {note}")

    def med(side: str) -> float:
        return statistics.median(r["tasks_s"] for r in results[side])

    tb, tt = med("baseline"), med("taskrail")
    label = "median of rounds" if args.rounds > 1 else "one round"
    print(f"summary ({label}): baseline {tb:.0f} tasks/s, taskrail {tt:.0f} tasks/s "
          f"({tt / tb:.1f}x)")  # fmt: skip
    per_round = ", ".join(f"{r['tasks_s']:.0f}" for r in results["taskrail"])
    print(f"  taskrail per round: {per_round} tasks/s")
    verdict = "MET" if tt >= GOAL_TASKS_S else "NOT MET"
    print(f"  goal taskrail >= {GOAL_TASKS_S} tasks/s with {args.work_ms:.0f} ms handlers "
          f"(issue 8): {verdict} ({tt / GOAL_TASKS_S:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
