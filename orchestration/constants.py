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
# Longer than the longest handler: a message unacked for this long is redelivered.
DEFAULT_VISIBILITY_TIMEOUT_S = 2 * 3600
MAX_MESSAGE_BYTES = 256 * 1024

# An open breaker defers a hop by its remaining reset time, at most this long; a
# longer countdown would sit unacknowledged in a worker (and on Redis be redelivered
# after the visibility timeout). The deferral is recorded on the task (not_before),
# so the sweeper re-drives it if the message is lost.
MAX_DEFER_COUNTDOWN_S = 300.0

# Recovery.
DEFAULT_LEASE_TTL_S = 20.0
DEFAULT_SWEEP_INTERVAL_S = 5.0
DEFAULT_REDRIVE_AFTER_S = 15.0
DEFAULT_SWEEP_BATCH = 500
# A lease token that starts with this was pre-claimed by the start hop for an execute
# message, never taken by a running handler: its expiry means "still queued, or lost".
PRECLAIM_TOKEN_PREFIX = "q:"

# Metrics: `taskrail metrics` listens here (loopback unless --host says otherwise).
DEFAULT_METRICS_PORT = 9808
DEFAULT_METRICS_HOST = "127.0.0.1"

# Redis key prefixes (breaker state).
BREAKER_KEY_PREFIX = "taskrail:breaker"

# Pre-claimed executions (orchestration.leases.RunGuard): "N:run:<lease token>", set
# once by the first execute hop that takes the lease, so a duplicate of its message
# does not run the handler again. Kept for RUN_GUARD_TTL_FACTOR x the visibility
# timeout: a redelivered message arrives within one.
RUN_GUARD_KEY_SEGMENT = "run"
# The same guarantee kept by taskrail's Redis transport on the broker itself: a message
# with a once-token header is delivered once, "<broker key prefix>taskrail:once:<token>".
ONCE_KEY_PREFIX = "taskrail:once:"
RUN_GUARD_TTL_FACTOR = 2

# Breakers (orchestration/breakers). With namespace N and breaker name B the keys are
# "N:breaker:B" (hash: state, fail_count, epoch, opened_at_ms, next_trial_ms, fail_max,
# reset_timeout_ms), "N:breaker-trial:B" (the half-open trial lease, SET NX PX) and
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
