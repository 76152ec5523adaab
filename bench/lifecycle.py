"""The no-op workload: taskrail's lifecycle, the hand-written Celery baseline and Celery's
no-op ceiling, side by side with the same worker processes, in one run.

Each round runs, on fresh workers and in this order, the baseline (3 plain Celery
tasks per task, each a compare-and-set UPDATE + enqueue of the next), taskrail (3 hops
per task, demo agents whose handler returns at once) and Celery's no-op (one message per
task): N tasks each (default 3000), with the same ``celery worker`` processes (default
two ``--pool solo`` workers; ``--pool prefork --concurrency 2 --workers 1`` for Celery's
default). See bench/sides.py for how each is timed.

Then, unless told otherwise: single-task latency on idle workers (200 samples after 10
warm-up, 50 ms gap, 1 ms polling: shared/bench/latency_naive.py's method), and one
untimed run of 300 tasks per side that counts round trips (Redis MONITOR filtered by
the side's database numbers, commands inside Lua scripts apart; the workers' Postgres
round trips on the wire, through a counting relay; transactions and tuple writes from
pg_stat_database / pg_stat_user_tables, less the driver's own).

Goals (issue 8): taskrail hops/s >= 1.0x the baseline's and >= 0.8x the no-op's
tasks/s; latency p50 <= 1.2x and p99 <= 1.5x the baseline's; at most 1 database round
trip per transition, 1 broker publish per hop, <= 0.2 Redis commands per hop for
breaker bookkeeping.

usage: python bench/lifecycle.py [-n 3000] [--rounds 3] [--pool solo --workers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as cm
import psycopg
from sides import Baseline, Noop, Side, Taskrail, fmt_tp, latency, summary, throughput

VERDICT = {True: "MET", False: "NOT MET"}


def round_trips(side: Side, procs: list[cm.Proc], n: int) -> dict[str, Any]:
    """An untimed run of n tasks counting Postgres round trips and writes and Redis
    commands per hop.

    The workers reach Postgres through a :class:`_common.PgWireCounter`, which counts
    the statement batches they send (each one a round trip); the driver's own polls go
    straight to the server. Before the count, a warm-up lets every worker process
    connect, check the schema and have psycopg prepare each of its statements (it does
    that on a statement's fifth use, one round trip of its own per connection and
    statement): those are start-up costs, not a hop's.
    """
    warm = 200
    wire = cm.PgWireCounter()
    ws = side.start(procs, side.db_env(wire.dsn()))
    vacuum = contextlib.ExitStack()
    try:
        jobs = side.prepare(n + warm)
        vacuum.enter_context(cm.autovacuum_off())  # its runs count as transactions too
        c = psycopg.connect(cm.pg_dsn(), autocommit=True)
        side.enqueue_all(jobs[:warm])
        while side.done(c) < warm:
            time.sleep(0.05)
        c.close()
        # Every backend has reported the warm-up's statistics: one that exited at once,
        # the workers' idle ones within 10 s (PostgreSQL >= 15 flushes idle backends'
        # pending statistics every 10 s; before that they would count in this run).
        time.sleep(11)
        pg0 = cm.pg_counters()  # 2 statements, reported when this connection closes
        wire0 = wire.round_trips
        mon = cm.RedisMonitor(side.redis_dbs)
        c = psycopg.connect(cm.pg_dsn(), autocommit=True)
        side.enqueue_all(jobs[warm:])
        polls = 0
        while side.done(c) < n + warm:
            polls += 1
            time.sleep(0.05)
        polls += 1
        c.close()
        wire1 = wire.round_trips
    finally:
        ws.stop()
        wire.close()
    mon.stop()
    time.sleep(0.6)  # exited backends report their statistics
    with vacuum:
        pg1 = cm.pg_counters()
    hops = 3 * n
    xact = pg1["xact"] - pg0["xact"] - polls - 2  # less the driver's polls and pg0's reads
    return {
        "pg_wire": wire1 - wire0,
        "pg_wire_hop": (wire1 - wire0) / hops,
        "pg_xact": xact,
        "pg_xact_hop": xact / hops,
        "pg_upd_hop": (pg1["upd"] - pg0["upd"]) / hops,
        "pg_ins_hop": (pg1["ins"] - pg0["ins"]) / hops,
        "redis_hop": sum(mon.counts.values()) / hops,
        "redis_cmds": sorted(((k, v / hops) for k, v in mon.counts.items()), key=lambda kv: -kv[1]),
        "redis_lua_hop": sum(mon.lua.values()) / hops,
        "breaker_hop": sum(mon.per_db.get(cm.REDIS_DB_BREAKERS, {}).values()) / hops,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=3000, help="tasks per throughput run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (medians are reported)")
    ap.add_argument("--pool", default="solo", help="celery worker -P, every side")
    ap.add_argument("--concurrency", type=int, default=1, help="celery worker -c, every side")
    ap.add_argument("--workers", type=int, default=2, help="worker processes, every side")
    ap.add_argument("--latency-n", type=int, default=200)
    ap.add_argument("--latency-warmup", type=int, default=10)
    ap.add_argument("--gap-ms", type=float, default=50.0)
    ap.add_argument(
        "--submit-latency-n",
        type=int,
        default=100,
        help="samples of taskrail's api.submit()->completed latency (0: skip)",
    )
    ap.add_argument("--latency-rounds", type=int, default=2, help="latency rounds per side")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument(
        "--count-n",
        type=int,
        default=300,
        help="tasks of the untimed run that counts round trips (0: skip)",
    )
    ap.add_argument(
        "--taskrail-log-level",
        default="INFO",
        help="TASKRAIL_LOG_LEVEL of taskrail's workers (INFO: the product default)",
    )
    ap.add_argument(
        "--taskrail-app",
        default="workers",
        help="celery -A module of taskrail's workers (diagnostics)",
    )
    ap.add_argument("--log-dir", default=None, help="worker logs (default: a temporary dir)")
    args = ap.parse_args()

    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="taskrail_bench_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    cm.fresh_database()
    procs = cm.same_procs(args.pool, args.concurrency, args.workers)
    baseline, taskrail, noop = (
        Baseline(log_dir),
        Taskrail(log_dir, args.taskrail_log_level, args.taskrail_app),
        Noop(log_dir),
    )
    sides: list[Side] = [baseline, taskrail, noop]
    print(
        f"# lifecycle.py (no-op workload)  N={args.n} tasks, rounds={args.rounds}, "
        f"workers {cm.describe_procs(procs)} for every side, taskrail log level "
        f"{args.taskrail_log_level}; Postgres db {cm.DB_NAME}; worker logs in {log_dir}",
        flush=True,
    )

    tp: dict[str, list[dict[str, Any]]] = {s.name: [] for s in sides}
    for r in range(1, args.rounds + 1):
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        print(f"## round {r}/{args.rounds}  {time.strftime('%H:%M:%S')}  load {load}", flush=True)
        for side in sides:
            res = throughput(side, procs, args.n)
            tp[side.name].append(res)
            print(fmt_tp(side.name, res), flush=True)
            for note in res["notes"]:
                print(f"    WARNING {side.name}: {note}")
        t, b, z = (tp[s.name][-1]["hops_s"] for s in (taskrail, baseline, noop))
        print(
            f"  taskrail/baseline hops/s {t / b:.2f}, taskrail hops/s / no-op tasks/s {t / z:.2f}"
        )

    lat: dict[str, dict[str, dict[str, float]]] = {}
    if not args.no_latency:
        # Rounds alternate the sides, so that a slow spell of the machine does not fall
        # on one side only; the samples of all rounds are pooled.
        pooled: dict[str, dict[str, list[float]]] = {"baseline": {}, "taskrail": {}}
        for _ in range(args.latency_rounds):
            for side in (baseline, taskrail):
                got = latency(
                    side,
                    procs,
                    args.latency_n,
                    args.latency_warmup,
                    args.gap_ms / 1000,
                    0.001,
                    args.submit_latency_n if side is taskrail else 0,
                )
                for kind, xs in got.items():
                    pooled[side.name].setdefault(kind, []).extend(xs)
        lat = {
            name: {kind: summary(xs) for kind, xs in kinds.items()}
            for name, kinds in pooled.items()
        }
    rt: dict[str, dict[str, Any]] = {}
    if args.count_n:
        for side in (baseline, taskrail):
            rt[side.name] = round_trips(side, procs, args.count_n)

    med = lambda rs, k: statistics.median(x[k] for x in rs)  # noqa: E731
    b, t, z = tp["baseline"], tp["taskrail"], tp["celery-noop"]
    print()
    print(
        f"== no-op workload: medians of {args.rounds} round(s), N={args.n}, "
        f"{cm.describe_procs(procs)} per side =="
    )
    print(f"{'':36s}{'baseline':>11s}{'taskrail':>11s}{'ratio':>8s}{'no-op':>11s}")
    for label, key, f in (
        ("tasks/s", "tasks_s", "{:11.0f}"),
        ("hops/s (no-op: messages/s)", "hops_s", "{:11.0f}"),
        ("worker CPU per hop, ms", "cpu_ms_hop", "{:11.2f}"),
        ("  of which main process", "main_cpu_ms_hop", "{:11.2f}"),
        ("  of which pool (children)", "kids_cpu_ms_hop", "{:11.2f}"),
        ("worker peak RSS, sum, MB", "rss_sum", "{:11.1f}"),
        ("worker peak RSS, largest proc, MB", "rss_max", "{:11.1f}"),
    ):
        bv, tv, zv = med(b, key), med(t, key), med(z, key)
        ratio = f"{tv / bv:8.2f}" if bv else f"{'':8s}"
        print(f"{label:36s}{f.format(bv)}{f.format(tv)}{ratio}{f.format(zv)}")
    ratio_b = med(t, "hops_s") / med(b, "hops_s")
    ratio_z = med(t, "hops_s") / med(z, "hops_s")
    print(f"ratio taskrail/baseline hops/s: {ratio_b:.2f} (goal >= 1.0: {VERDICT[ratio_b >= 1.0]})")
    print(
        f"ratio taskrail hops/s / Celery no-op tasks/s: {ratio_z:.2f} "
        f"(goal >= 0.8: {VERDICT[ratio_z >= 0.8]})"
    )
    per_round = [x["hops_s"] / y["hops_s"] for x, y in zip(t, b, strict=True)]
    print("  per round, taskrail/baseline: " + ", ".join(f"{x:.2f}" for x in per_round))
    per_round = [x["hops_s"] / y["hops_s"] for x, y in zip(t, z, strict=True)]
    print("  per round, taskrail/no-op:    " + ", ".join(f"{x:.2f}" for x in per_round))
    before = max(x["idle_busy"] for x in b + t + z)
    print(
        f"machine CPU busy in the second before each run: up to {before * 100:.0f}%"
        + ("  <- other processes competed for the cores" if before > 0.1 else "")
    )

    if rt:
        print(f"round trips (one untimed run of {args.count_n} tasks per side):")
        for label, key in (
            ("Postgres round trips per hop", "pg_wire_hop"),
            ("Postgres transactions per hop", "pg_xact_hop"),
            ("Postgres tuples updated per hop", "pg_upd_hop"),
            ("Postgres tuples inserted per hop", "pg_ins_hop"),
            ("Redis commands per hop", "redis_hop"),
            ("  (+ run inside Lua scripts)", "redis_lua_hop"),
        ):
            bv, tv = rt["baseline"][key], rt["taskrail"][key]
            print(f"  {label:34s}{bv:11.2f}{tv:11.2f}")
        for name, r in rt.items():
            print(
                f"  Redis commands per hop, {name}: "
                + ", ".join(f"{k} {v:.2f}" for k, v in r["redis_cmds"] if v >= 0.005)
            )
        br = rt["taskrail"]["breaker_hop"]
        print(
            f"  taskrail: {br:.3f} Redis commands per hop for breaker bookkeeping "
            f"(Redis db {cm.REDIS_DB_BREAKERS}; goal <= 0.2: {VERDICT[br <= 0.2]})"
        )
        hops = 3 * args.count_n
        t_w, b_w = rt["taskrail"]["pg_wire"], rt["baseline"]["pg_wire"]
        print(
            f"  taskrail: {t_w} Postgres round trips for {hops} transitions on the wire, "
            f"{t_w / hops:.3f} per transition (baseline {b_w / hops:.3f}; goal <= 1: "
            f"{VERDICT[t_w <= hops]})"
        )
        t_x, b_x = rt["taskrail"]["pg_xact"], rt["baseline"]["pg_xact"]
        print(
            f"  pg_stat_database in the same window, less the driver's polls: taskrail "
            f"{t_x}, baseline {b_x} transactions (the server's own count; it also holds "
            "the driver's connection set-up)"
        )
    if lat:
        print(
            f"latency submit->completed, ms (idle workers, 1 task at a time, {args.latency_n} "
            f"samples after {args.latency_warmup} warm-up per round, {args.latency_rounds} "
            f"rounds alternating the sides, {args.gap_ms:g} ms gap):"
        )
        for name in ("baseline", "taskrail"):
            for kind, v in lat[name].items():
                print(
                    f"  {name:8s} {kind:8s} p50 {v['p50']:6.2f}  p95 {v['p95']:6.2f}  "
                    f"p99 {v['p99']:6.2f}  (min {v['min']:.2f}, max {v['max']:.2f}; "
                    f"{v['n']:.0f} samples)"
                )
        for p, goal in (("p50", 1.2), ("p99", 1.5)):
            ratio = lat["taskrail"]["observed"][p] / lat["baseline"]["observed"][p]
            print(
                f"  ratio taskrail/baseline observed {p}: {ratio:.2f} "
                f"(goal <= {goal}: {VERDICT[ratio <= goal]})"
            )


if __name__ == "__main__":
    main()
