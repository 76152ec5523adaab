"""Every default and every Redis key prefix in one place. Units are in the names."""

from __future__ import annotations

# Hop task names, as producers send them and Flower shows them.
HOP_ASSIGN = "taskrail.assign"
HOP_START = "taskrail.start"
HOP_EXECUTE = "taskrail.execute"
SWEEP_TASK = "taskrail.sweep"

# Queues: short bookkeeping hops apart from handler calls, so each can get its own pool.
QUEUE_HOPS = "taskrail.hops"
QUEUE_EXECUTE = "taskrail.execute"
# The sweeper's own queue: a backlog of hops must not delay (or expire) a sweep.
QUEUE_CONTROL = "taskrail.control"

# Embedded default: everything under one folder in the working directory.
DEFAULT_DATA_DIR = ".taskrail"
DEFAULT_AGENT_MODULES = ("demo_agents",)

# Agents.
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_TIME_LIMIT_S = 300.0
DEFAULT_FAIL_MAX = 5
DEFAULT_RESET_TIMEOUT_S = 60.0
DEFAULT_MAX_DEFERRAL_S = 3600.0

# Retries of transient handler errors: exponential backoff with full jitter.
RETRY_BACKOFF_BASE_S = 1.0
RETRY_BACKOFF_MAX_S = 60.0

# Celery / broker.
# Messages a worker takes per process ahead of running them: the Redis transport fetches
# them in one round trip, and a solo worker's hops then share one pipeline of acks and
# next-hop messages. Long handlers on a threads pool want 1 (--prefetch-multiplier 1).
DEFAULT_PREFETCH_MULTIPLIER = 16
# The pool of `celery -A workers worker` run without --pool (nor CELERY_WORKER_POOL): the
# hops in the process that reads the broker, as the Procfile's worker runs them. Celery's
# own default (prefork) puts a parent process and a pipe in front of every hop
# (docs/performance.md, "Every pool"); an explicit --pool is always obeyed.
DEFAULT_WORKER_POOL = "solo"
# Longer than the longest handler: a message unacked for this long is redelivered.
DEFAULT_VISIBILITY_TIMEOUT_S = 2 * 3600
MAX_MESSAGE_BYTES = 256 * 1024
# How often a worker looks for messages left unacknowledged past the visibility timeout
# (a dead worker's), to put them back on their queue.
UNACKED_RESTORE_INTERVAL_S = 10

# What a task may hold (orchestration.values). Sizes are of the JSON text as stored.
MAX_PAYLOAD_BYTES = 256 * 1024
MAX_RESULT_BYTES = 1024 * 1024
# Levels of arrays and objects, the outermost included: orjson's own limit, so the
# worker's fast path and the producer's check agree.
MAX_JSON_DEPTH = 254
# A reason (escalation, failure, last_error) longer than this is cut, and says so.
MAX_REASON_CHARS = 4000
MAX_IDEMPOTENCY_KEY_CHARS = 255
MAX_TASK_TYPE_CHARS = 64
# Client ids are stored as BIGINT; negative ids are refused.
MAX_CLIENT_ID = 2**63 - 1
# A write that lost a deadlock or a serialization conflict is tried again, this many
# times in all, after a pause of up to DB_CONFLICT_PAUSE_S x the attempt number.
DB_CONFLICT_ATTEMPTS = 5
DB_CONFLICT_PAUSE_S = 0.05

# An open breaker defers a hop by its remaining reset time, at most this long; a
# longer countdown would sit unacknowledged in a worker (and on Redis be redelivered
# after the visibility timeout). The deferral is recorded on the task (not_before),
# so the sweeper re-drives it if the message is lost.
MAX_DEFER_COUNTDOWN_S = 300.0

# Recovery.
DEFAULT_LEASE_TTL_S = 20.0
DEFAULT_SWEEP_INTERVAL_S = 5.0
# A worker stopping (SIGTERM) waits this long for its async calls in flight; the rest go
# back to the queue unused (workers.aio).
DEFAULT_ASYNC_DRAIN_S = 8.0
DEFAULT_REDRIVE_AFTER_S = 15.0
DEFAULT_SWEEP_BATCH = 500
# `taskrail status` flags the sweeper when its last pass is this many intervals old.
SWEEPER_LATE_INTERVALS = 3
# A lease token that starts with this was pre-claimed by the start hop for an execute
# message, never taken by a running handler: its expiry means "still queued, or lost".
PRECLAIM_TOKEN_PREFIX = "q:"
RUN_TOKEN_PREFIX = "r:"
# While a worker process holds a handler's lease it asks the database this often whether
# the task was cancelled (or its lease lost): the handler's TaskView.cancelled turns true
# and its late result is discarded. One statement per process per period, whatever the
# number of leases held.
DEFAULT_CANCEL_POLL_S = 1.0

# Metrics: `taskrail metrics` listens here (loopback unless --host says otherwise).
DEFAULT_METRICS_PORT = 9808
DEFAULT_METRICS_HOST = "127.0.0.1"

# Redis key prefixes (breaker state).
BREAKER_KEY_PREFIX = "taskrail:breaker"

# Dead letters (orchestration.messaging.deadletters): bytes on a taskrail queue that are not a valid
# hop, kept for an operator (`taskrail dead`). On Redis a list "<broker key prefix>
# taskrail.dead", newest first; on the embedded default one file each in
# "<data dir>/broker/dead/". At most DEAD_LETTER_MAX_ENTRIES are kept (the oldest go),
# each with at most DEAD_LETTER_MAX_RAW_BYTES of the message (flagged when cut), so
# garbage cannot fill the broker. Log lines carry DEAD_LETTER_EXCERPT_CHARS of it.
DEAD_LETTER_KEY = "taskrail.dead"
DEAD_LETTER_FOLDER = "dead"
DEAD_LETTER_MAX_ENTRIES = 1000
DEAD_LETTER_MAX_RAW_BYTES = 4096
DEAD_LETTER_MAX_REASON_CHARS = 500
DEAD_LETTER_EXCERPT_CHARS = 200

# Breakers (orchestration/breakers). With namespace N and breaker name B the keys are
# "N:breaker:B" (hash: state, fail_count, epoch, opened_at_ms, next_trial_ms, fail_max,
# reset_timeout_ms, success_count), "N:breaker-trial:B" (the half-open trial lease, SET NX PX) and
# "N:breakers" (set of every breaker name). With the default namespace the hashes sit
# under BREAKER_KEY_PREFIX.
DEFAULT_BREAKER_NAMESPACE = "taskrail"
BREAKER_KEY_SEGMENT = "breaker"
BREAKER_TRIAL_KEY_SEGMENT = "breaker-trial"
BREAKER_REGISTRY_SEGMENT = "breakers"
# How long a process trusts its cached view of a breaker before asking Redis again.
DEFAULT_BREAKER_CACHE_TTL_S = 1.0
# How long one half-open trial call holds the cluster-wide lease; a trial whose caller
# died blocks other trials for at most this long.
DEFAULT_BREAKER_TRIAL_LEASE_S = 60.0
# Client timeouts for the breaker's Redis connection: a hung Redis must not hang a hop.
BREAKER_REDIS_SOCKET_TIMEOUT_S = 2.0
BREAKER_REDIS_CONNECT_TIMEOUT_S = 1.0

# Connections to PostgreSQL (orchestration.store.db): a server or a network that stops answering
# fails a statement within seconds instead of hanging a worker and its lease renewals.
# libpq counts connect_timeout in whole seconds (at least 2).
DB_CONNECT_TIMEOUT_S = 5.0
# Data sent and not acknowledged for this long: the connection is dead (tcp_user_timeout).
DB_TCP_USER_TIMEOUT_S = 10.0
# An idle connection is probed after KEEPALIVES_IDLE_S, then every KEEPALIVES_INTERVAL_S;
# KEEPALIVES_COUNT probes unanswered and it is dead (5 + 5 x 1 = 10 s).
DB_KEEPALIVES_IDLE_S = 5
DB_KEEPALIVES_INTERVAL_S = 1
DB_KEEPALIVES_COUNT = 5
# Workers only (a hop's statements are short): longer than this and the statement is
# cancelled by the server; a lock waited for this long, likewise. 0 turns either off.
DB_STATEMENT_TIMEOUT_S = 30.0
DB_LOCK_TIMEOUT_S = 10.0

# The broker's Redis clients (Celery broker_transport_options, orchestration.messaging.dispatch).
# A blocking read waits at most BROKER_SOCKET_TIMEOUT_S: longer than kombu's BRPOP
# timeout (BROKER_BRPOP_TIMEOUT_S), which the server answers on its own.
BROKER_SOCKET_TIMEOUT_S = 5.0
BROKER_BRPOP_TIMEOUT_S = 1
BROKER_CONNECT_TIMEOUT_S = 1.0
# kombu and redis-py check an idle connection (PING) after this long, and kombu drops a
# BRPOP connection whose reply is this much overdue.
BROKER_HEALTH_CHECK_INTERVAL_S = 5
# TCP keepalive on every Redis connection (broker and breakers): idle, interval, count.
REDIS_KEEPALIVE_IDLE_S = 5
REDIS_KEEPALIVE_INTERVAL_S = 1
REDIS_KEEPALIVE_COUNT = 5
# How long a producer's publish may wait for a broker that is down before the task is
# left pending for the sweeper (connection attempts included).
DEFAULT_PUBLISH_MAX_WAIT_S = 1.0

# A hop for a task type this worker has no agent for goes back to the queue after this
# long, for a worker that has it.
NO_AGENT_RETRY_COUNTDOWN_S = 5.0

# -- the people's side -----------------------------------------------------------------

# ``taskrail list`` / the console: tasks per page by default, and at most.
DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 1000
# Bulk retry / cancel: tasks moved per statement, and the ids a dry run shows.
BULK_BATCH = 1000
BULK_SHOWN_IDS = 10
# Who made a move (``--by``) and what they said (``--note``): at most this long.
MAX_ACTOR_CHARS = 128
MAX_NOTE_CHARS = 4000
