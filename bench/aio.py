"""Async agents (issue 22): the async executor against the threads executor and a
hand-written Celery threads deployment, side by side in one run.

Three workloads, each side on fresh workers, every round running every side:

- **LLM-shaped**: ``-n`` tasks (default 6,000) whose handler waits ``--work-ms`` (default
  5,000 ms) on an outside call. ``async``: the handler is an ``async def`` awaiting
  ``asyncio.sleep`` (bench/agents_async.py ``llm_async``), run by the async executor: two
  ``--pool solo`` hop workers and one ``--pool threads -c K --async-calls N -Q
  taskrail.execute`` (``--hop-threads``, ``--async-calls``). ``threads``: the same call
  with ``time.sleep`` (``llm_sync``) on today's executor, ``--pool threads -c 200
  --prefetch-multiplier 1``. ``handwritten``: bench/baseline_lifecycle.py (the hand-written
  baseline, its complete step sleeping as long) in one ``--pool threads -c 200`` worker.
  The two thread-bound sides run ``--slow-n`` tasks (default 2,000): at 200 calls in
  flight they finish 40 a second whatever N is, and 6,000 would take 150 s a round.
- **200 ms**: bench/io.py's workload (``--io-n`` tasks, default 3,000, each waiting 200 ms)
  on the async and the threads executor.
- **latency**: idle workers, one task at a time (lifecycle.py's method, handler returning
  at once): the hand-written baseline on two solo workers, and taskrail's async and
  threads deployments.

Figures: **tasks/s started** is N / (seconds - the call's time): the rate at which
calls started (the last one a call's time before the end at the latest; a rate over the
whole run, N / seconds, also printed, charges the last call's 5 s to 6,000 tasks); the
rate at which tasks finished between the 10% and the 90% mark is printed too, but hops
that ran ahead of the calls can flatter it; **calls in flight** = started x call time,
and the tasks holding a run lease (``r:``), sampled with every completion poll (50 ms):
the peak, and the mean between the 10% and the 90% mark; **CPU/task** over every worker process
(split by process, then every postgres backend and the bench's redis-server); **peak
RSS** of each worker process. The summary gives medians over rounds and the goals of
issue 22: LLM-shaped >= 500 tasks/s, >= 2,500 calls in flight, the executor < 300 MB,
CPU per task no higher than the threads executor's on the 200 ms workload; 200 ms: the
async executor >= 1.5x the threads executor; latency p50 <= 1.2x, p99 <= 1.5x the
baseline's.

``--sweep 8x4000,32x4000,8x4000p16`` runs only the LLM-shaped workload on the async
executor with each ``K x N`` (hop threads x async calls, K = 0: ``--pool solo``; ``pM``:
prefetch multiplier M, default 1), one line each, to pick the deployment.

usage: python bench/aio.py [-n 6000] [--work-ms 5000] [--slow-n 2000] [--io-n 3000]
                           [--hop-threads 200] [--async-calls 4000] [--rounds 3]
                           [--skip llm,io200,latency] [--sweep KxN,...]
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
# A database of its own: another bench script may be running on bench_taskrail.
os.environ.setdefault("BENCH_DB_NAME", "bench_taskrail_aio")

import _common as cm
import psycopg
from sides import FINAL, Baseline, Taskrail, latency, summary, throughput

AGENTS = "bench.agents_async"
GOAL_TASKS_S = 500
GOAL_IN_FLIGHT = 2500
GOAL_RSS_MB = 300
GOAL_IO_RATIO = 1.5
GOAL_LATENCY = {"p50": 1.2, "p99": 1.5}
VERDICT = {True: "MET", False: "NOT MET"}


class Sampled:
    """Records (seconds since the first poll, tasks done, calls in flight) at every poll."""

    samples: list[tuple[float, int, int]]

    def reset(self) -> None:
        self.samples = []

    def note(self, done: int, in_flight: int) -> int:
        self.samples.append((time.perf_counter(), done, in_flight))
        return done


class SampledTaskrail(Sampled, Taskrail):
    def prepare(self, n: int, work_ms: float = 0.0) -> list[Any]:
        self.reset()
        return super().prepare(n, work_ms)

    def done(self, c: psycopg.Connection) -> int:
        row = c.execute(
            "SELECT count(*) FILTER (WHERE status = ANY(%s)), count(*) FILTER "
            "(WHERE status = 'in_progress' AND lease_owner LIKE 'r:%%') FROM tasks",
            (list(FINAL),),
        ).fetchone()
        assert row is not None
        return self.note(int(row[0]), int(row[1]))


class SampledBaseline(Sampled, Baseline):
    def prepare(self, n: int, work_ms: float = 0.0) -> list[Any]:
        self.reset()
        return super().prepare(n, work_ms)

    def done(self, c: psycopg.Connection) -> int:
        return self.note(super().done(c), -1)  # no lease to count: Little's law instead


def hop_workers(k: int) -> list[cm.Proc]:
    return [cm.Proc("solo", 1, "taskrail.hops,taskrail.control") for _ in range(k)]


def async_procs(
    hop_threads: int, async_calls: int, hops: int = 2, prefetch: int = 1
) -> list[cm.Proc]:
    """Two solo hop workers and the async executor (``--async-calls``): a threads pool of
    ``hop_threads`` threads for the execute hops, or a solo pool when it is 0."""
    execute = cm.Proc(
        "threads" if hop_threads else "solo",
        hop_threads or 1,
        "taskrail.execute",
        ("--async-calls", str(async_calls), "--prefetch-multiplier", str(prefetch)),
    )
    return [*hop_workers(hops), execute]


def threads_procs(threads: int = 200, hops: int = 2) -> list[cm.Proc]:
    """Today's Procfile: two solo hop workers and a 200-thread executor."""
    execute = cm.Proc("threads", threads, "taskrail.execute", ("--prefetch-multiplier", "1"))
    return [*hop_workers(hops), execute]


def steady(side: Sampled, n: int, work_s: float) -> dict[str, float]:
    """Rate between the 10% and 90% marks, calls in flight (peak; mean in that window)."""
    s = side.samples
    lo = next(x for x in s if x[1] >= 0.1 * n)
    hi = next(x for x in s if x[1] >= 0.9 * n)
    rate = (hi[1] - lo[1]) / (hi[0] - lo[0]) if hi[0] > lo[0] else float("nan")
    window = [x[2] for x in s if lo[0] <= x[0] <= hi[0]]
    if window and window[0] >= 0:
        return {"sustained": rate, "peak": max(x[2] for x in s), "mean": statistics.mean(window)}
    return {"sustained": rate, "peak": float("nan"), "mean": rate * work_s}  # Little's law


def run(side: Any, procs: list[cm.Proc], n: int, work_ms: float, env: dict | None = None) -> dict:
    r = throughput(side, procs, n, work_ms=work_ms, env=env, own_backends=True)
    r.update(steady(side, n, work_ms / 1000))
    # Calls started per second: no call can end before its wait, so the last one started
    # a call's time before the end at the latest. Unlike the 10%-90% rate, this cannot
    # be flattered by hops that ran ahead of the calls and left the CPU to the end.
    r["started"] = n / max(1e-9, r["dt"] - work_ms / 1000)
    r["running"] = r["started"] * work_ms / 1000  # Little's law: calls inside the handler
    r["cpu_ms_task"] = r["cpu_ms_hop"] * 3
    # What two cores would allow if nothing else ran: workers and servers together.
    r["all_ms_task"] = r["cpu_ms_task"] + sum(r["server_cpu_ms_task"].values())
    r["ceiling"] = 2000 / r["all_ms_task"]
    return r


def line(name: str, r: dict) -> str:
    rss = " / ".join(f"{mb:.0f}" for mb in r["proc_rss"])
    peak = "" if r["peak"] != r["peak"] else f"peak {r['peak']:.0f}, "  # nan: not counted
    how = "mean" if peak else "by Little's law"
    return (
        f"  {name:12s} {r['started']:6.0f} tasks/s started (10%-90% {r['sustained']:.0f}; "
        f"{r['tasks_s']:.0f} over {r['dt']:.1f} s); run leases held {peak}{how} "
        f"{r['mean']:.0f}; CPU/task "
        f"{r['cpu_ms_task']:.2f} ms; peak RSS MB {rss}; busy {r['busy'] * 100:.0f}% "
        f"({r['idle_busy'] * 100:.0f}% before)\n"
        f"  {'':12s} CPU/task by process, ms: {cpu_split(r)}; with the servers "
        f"{r['all_ms_task']:.2f} ms: 2 cores allow {r['ceiling']:.0f} tasks/s"
    )


def cpu_split(r: dict) -> str:
    parts = [f"worker{k + 1} {ms:.2f}" for k, ms in enumerate(r["proc_cpu_ms_task"])]
    parts += [f"{name} {ms:.2f}" for name, ms in r["server_cpu_ms_task"].items()]
    return ", ".join(parts)


def med(rs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def sweep(args: argparse.Namespace, side: SampledTaskrail) -> None:
    for spec in args.sweep.split(","):
        spec, _, prefetch = spec.lower().partition("p")
        k, n_calls, *outcome = (int(x) for x in spec.split("x"))
        procs = async_procs(k, n_calls, prefetch=int(prefetch or 1))
        # K x N x O: O outcome threads, read by a --taskrail-app that sets them (diagnostics)
        env = {"BENCH_OUTCOME_THREADS": str(outcome[0])} if outcome else None
        r = run(side, procs, args.n, args.work_ms, env)
        print(f"{cm.describe_procs(procs[-1:])} {env or ''}:", flush=True)
        print(line("async", r), flush=True)
        for note in r["notes"]:
            print(f"  ! {note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=6000, help="LLM-shaped tasks, async executor")
    ap.add_argument("--work-ms", type=float, default=5000.0, help="the LLM-shaped call")
    ap.add_argument("--slow-n", type=int, default=2000, help="LLM-shaped tasks, thread sides")
    ap.add_argument("--io-n", type=int, default=3000, help="200 ms workload tasks, each side")
    ap.add_argument("--io-work-ms", type=float, default=200.0)
    ap.add_argument(
        "--hop-threads", type=int, default=200, help="async executor: -c (0: solo), as the Procfile"
    )
    ap.add_argument("--async-calls", type=int, default=4000, help="async executor: calls")
    ap.add_argument("--threads", type=int, default=200, help="threads executor and baseline")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (medians are reported)")
    ap.add_argument("--latency-n", type=int, default=200)
    ap.add_argument("--latency-warmup", type=int, default=10)
    ap.add_argument("--latency-rounds", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma-separated: llm,io200,latency")
    ap.add_argument("--sweep", default="", help="KxN,...: only the LLM workload, async side")
    ap.add_argument("--taskrail-log-level", default="INFO")
    ap.add_argument("--taskrail-app", default="workers", help="celery -A (diagnostics)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    log_dir = Path(tempfile.mkdtemp(prefix="taskrail-bench-aio-"))
    cm.fresh_database()
    level = args.taskrail_log_level
    hand = SampledBaseline(log_dir)
    app = args.taskrail_app
    sync = SampledTaskrail(log_dir, level, app, agents=AGENTS, task_types=("llm_sync",))
    aio = SampledTaskrail(log_dir, level, app, agents=AGENTS, task_types=("llm_async",))
    ours = async_procs(args.hop_threads, args.async_calls)
    today = threads_procs(args.threads)
    theirs = [cm.Proc("threads", args.threads)]
    print(
        f"# aio.py  async: {cm.describe_procs(ours)}; threads: {cm.describe_procs(today)}; "
        f"handwritten: {cm.describe_procs(theirs)}; logs in {log_dir}",
        flush=True,
    )
    if args.sweep:
        sweep(args, aio)
        return

    res: dict[str, list[dict]] = {}
    work_env = {"WORK_MS": str(args.work_ms)}
    for k in range(1, args.rounds + 1):
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        print(f"## round {k}/{args.rounds}  {time.strftime('%H:%M:%S')}  load {load}", flush=True)
        todo: list[tuple[str, Any, list[cm.Proc], int, float, dict | None]] = []
        if "llm" not in skip:
            todo += [
                ("llm async", aio, ours, args.n, args.work_ms, None),
                ("llm threads", sync, today, args.slow_n, args.work_ms, None),
                ("llm handwritten", hand, theirs, args.slow_n, args.work_ms, work_env),
            ]
        if "io200" not in skip:
            todo += [
                ("200ms async", aio, ours, args.io_n, args.io_work_ms, None),
                ("200ms threads", sync, today, args.io_n, args.io_work_ms, None),
            ]
        for name, side, procs, n, work_ms, env in todo:
            r = run(side, procs, n, work_ms, env)
            res.setdefault(name, []).append(r)
            print(line(name, r), flush=True)
            for note in r["notes"]:
                print(f"  ! {note}")

    lat: dict[str, dict[str, float]] = {}
    lat_gaps: dict[str, str] = {}
    if "latency" not in skip:
        pooled: dict[str, list[float]] = {}
        gaps: dict[str, list[tuple[float, float]]] = {}
        solo2 = cm.same_procs("solo", 1, 2)
        for _ in range(args.latency_rounds):
            for name, side, procs in (
                ("baseline", hand, solo2),
                ("async", aio, ours),
                ("threads", sync, today),
                ("solo", aio, solo2),  # the async handler on lifecycle.py's workers
            ):
                got = latency(side, procs, args.latency_n, args.latency_warmup, 0.05, 0.001)
                pooled.setdefault(name, []).extend(got["observed"])
                if isinstance(side, Taskrail):
                    gaps.setdefault(name, []).extend(hop_gaps())
        lat = {name: summary(xs) for name, xs in pooled.items()}
        lat_gaps = {name: gap_summary(xs) for name, xs in gaps.items()}

    report(args, res, lat, lat_gaps)


def hop_gaps() -> list[tuple[float, float]]:
    """Per task of the last run, ms from its assign to its start transition and from its
    start to its complete transition (task_events.at of each)."""
    with psycopg.connect(cm.pg_dsn(), autocommit=True) as c:
        rows = c.execute(
            "SELECT extract(epoch FROM s - a) * 1000, extract(epoch FROM f - s) * 1000 FROM ("
            "SELECT max(at) FILTER (WHERE event = 'assign') AS a, max(at) FILTER (WHERE "
            "event = 'start') AS s, max(at) FILTER (WHERE event = 'complete') AS f "
            "FROM task_events GROUP BY task_id) AS e WHERE f IS NOT NULL"
        ).fetchall()
    return [(float(a), float(b)) for a, b in rows]


def gap_summary(xs: list[tuple[float, float]]) -> str:
    parts = []
    for k, what in enumerate(("assign->start", "start->complete")):
        vs = [x[k] for x in xs]
        parts.append(f"{what} p50 {cm.pct(vs, 50):.2f} p99 {cm.pct(vs, 99):.2f}")
    return ", ".join(parts)


def report(
    args: argparse.Namespace, res: dict[str, list[dict]], lat: dict, lat_gaps: dict[str, str]
) -> None:
    print(f"\n== async agents (issue 22): medians of {args.rounds} round(s) ==")
    if "llm async" in res:
        report_llm(args, res)
    if "200ms async" in res:
        a, t = res["200ms async"], res["200ms threads"]
        ra, rt = med(a, "tasks_s"), med(t, "tasks_s")
        rounds = ", ".join(f"{x['tasks_s'] / y['tasks_s']:.2f}" for x, y in zip(a, t, strict=True))
        print(f"200 ms workload ({args.io_n} tasks): async {ra:.0f} tasks/s, threads {rt:.0f}: "
              f"{ra / rt:.2f}x (rounds {rounds})")  # fmt: skip
        for what, key in (
            ("worker CPU/task, ms", "cpu_ms_task"),
            ("with the servers, ms", "all_ms_task"),
            ("tasks/s 2 cores allow", "ceiling"),
        ):
            f = "{:.0f}" if key == "ceiling" else "{:.2f}"
            print(f"  {what}: async {f.format(med(a, key))}, threads {f.format(med(t, key))}")
        print(f"  goal async >= {GOAL_IO_RATIO}x threads: {VERDICT[ra >= GOAL_IO_RATIO * rt]}")
    if lat:
        print(f"latency submit->completed, ms (idle workers, {args.latency_n} samples x "
              f"{args.latency_rounds} rounds per side; solo: the async handler on two -P solo "
              "workers, no executor):")  # fmt: skip
        for name, v in lat.items():
            print(f"  {name:9s} p50 {v['p50']:6.2f}  p95 {v['p95']:6.2f}  p99 {v['p99']:6.2f}  "
                  f"(min {v['min']:.2f}, max {v['max']:.2f})")  # fmt: skip
        print("  between transitions (task_events.at), ms:")
        for name, text in lat_gaps.items():
            print(f"    {name:9s} {text}")
        for name in ("async", "threads", "solo"):
            for p, goal in GOAL_LATENCY.items():
                ratio = lat[name][p] / lat["baseline"][p]
                print(f"  {name} / baseline {p}: {ratio:.2f} (goal <= {goal}: "
                      f"{VERDICT[ratio <= goal]})")  # fmt: skip


def report_llm(args: argparse.Namespace, res: dict[str, list[dict]]) -> None:
    a, t, h = res["llm async"], res["llm threads"], res["llm handwritten"]
    print(f"LLM-shaped, {args.work_ms / 1000:g} s calls (async {args.n} tasks, the others "
          f"{args.slow_n}):")  # fmt: skip
    print(f"  {'':36s}{'async':>10s}{'threads':>10s}{'handwritten':>12s}")
    for what, key, f in (
        ("tasks/s, calls started", "started", "{:.0f}"),
        ("tasks/s, finished 10%-90%", "sustained", "{:.0f}"),
        ("tasks/s, N / wall time", "tasks_s", "{:.0f}"),
        ("calls in the handler (rate x call)", "running", "{:.0f}"),
        ("run leases held, mean", "mean", "{:.0f}"),
        ("run leases held, peak", "peak", "{:.0f}"),
        ("worker CPU per task, ms", "cpu_ms_task", "{:.2f}"),
        ("  with postgres + redis, ms", "all_ms_task", "{:.2f}"),
        ("tasks/s 2 cores allow", "ceiling", "{:.0f}"),
    ):
        cells = [f.format(med(x, key)) for x in (a, t, h)]
        print(f"  {what:36s}{cells[0]:>10s}{cells[1]:>10s}{cells[2]:>12s}")
    rss = [statistics.median(r["proc_rss"][i] for r in a) for i in range(3)]
    rss_t = statistics.median(r["proc_rss"][2] for r in t)
    rss_h = statistics.median(r["proc_rss"][0] for r in h)
    print(f"  peak RSS, MB: async deployment: hop workers {rss[0]:.0f} / {rss[1]:.0f}, executor "
          f"{rss[2]:.0f}; threads executor {rss_t:.0f}; handwritten {rss_h:.0f}")  # fmt: skip
    rate, running = med(a, "started"), med(a, "running")
    print(f"  async x threads executor {rate / med(t, 'started'):.1f}, "
          f"x handwritten {rate / med(h, 'started'):.1f}")  # fmt: skip
    rounds = ", ".join(f"{r['started']:.0f}" for r in a)
    print(f"  goal >= {GOAL_TASKS_S} tasks/s: {VERDICT[rate >= GOAL_TASKS_S]} ({rate:.0f}; "
          f"rounds {rounds})")  # fmt: skip
    print(f"  goal >= {GOAL_IN_FLIGHT} calls in flight: {VERDICT[running >= GOAL_IN_FLIGHT]} "
          f"({running:.0f} in the handler; the leases held also count ended calls whose "
          "outcome is not written yet)")  # fmt: skip
    print(f"  goal executor RSS < {GOAL_RSS_MB} MB: {VERDICT[rss[2] < GOAL_RSS_MB]} "
          f"({rss[2]:.0f})")  # fmt: skip
    if "200ms threads" in res:
        cpu, ref = med(a, "cpu_ms_task"), med(res["200ms threads"], "cpu_ms_task")
        print(f"  goal CPU/task <= the threads executor's on 200 ms: {VERDICT[cpu <= ref]} "
              f"({cpu:.2f} against {ref:.2f} ms)")  # fmt: skip


if __name__ == "__main__":
    main()
