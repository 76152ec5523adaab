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
DEFAULT_PREFETCH_MULTIPLIER = 4
# Longer than the longest handler: a message unacked for this long is redelivered.
DEFAULT_VISIBILITY_TIMEOUT_S = 2 * 3600
MAX_MESSAGE_BYTES = 256 * 1024

# Recovery.
DEFAULT_LEASE_TTL_S = 20.0
DEFAULT_SWEEP_INTERVAL_S = 5.0
DEFAULT_REDRIVE_AFTER_S = 15.0
DEFAULT_SWEEP_BATCH = 500

# Redis key prefixes (breaker state).
BREAKER_KEY_PREFIX = "taskrail:breaker"
