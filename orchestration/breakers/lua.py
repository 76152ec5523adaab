"""The Lua scripts that make each breaker state change one atomic step in Redis.

Every script takes the same three keys (state hash, registry set, trial lease), the
breaker's name as ``ARGV[1]`` and the time as ``ARGV[2]``: empty in production, where
the script reads Redis's ``TIME`` (one clock for the whole cluster, no skew between
machines); milliseconds from an injected clock in tests. Each returns the same reply:
``state, fail_count, epoch, opened_at_ms, next_trial_ms, now_ms, changed_from, verdict,
wait_ms`` as strings (empty string for none), parsed by
:func:`orchestration.breakers.storage.parse_reply`.
"""

from __future__ import annotations

_PRELUDE = """
local key, registry, lease, name = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local h = redis.call('HMGET', key, 'state', 'fail_count', 'epoch', 'opened_at_ms', 'next_trial_ms',
                    'fail_max')
local state = h[1] or 'closed'
local fails = tonumber(h[2] or '0') or 0
local epoch = tonumber(h[3] or '0') or 0
local opened = h[4] or ''
local next_trial = h[5] or ''
local changed_from, verdict, wait_ms = '', '', 0

local function int(x) return string.format('%d', x) end
local function reply()
  return {state, int(fails), int(epoch), opened, next_trial, int(now), changed_from, verdict,
          int(wait_ms)}
end
-- The trial lease's holder and when it lapses (ms), or nil. The lease is '<token> <expires_ms>'
-- with a PX expiry too: the script's clock decides, Redis drops what is left over.
local function holder()
  local v = redis.call('GET', lease)
  if not v then return nil, 0 end
  local token, expires = string.match(v, '^(%S+) (%d+)$')
  if not token then return v, now + math.max(redis.call('PTTL', lease), 0) end
  expires = tonumber(expires)
  if expires <= now then
    redis.call('DEL', lease)
    return nil, 0
  end
  return token, expires
end
local function register()
  redis.call('SADD', registry, name)
end
local function open_now(reset_ms)
  register()
  changed_from = state
  state, opened, next_trial = 'open', int(now), int(now + tonumber(reset_ms))
  redis.call('HSET', key, 'state', state, 'opened_at_ms', opened, 'next_trial_ms', next_trial)
  redis.call('HDEL', key, 'success_count')
  redis.call('DEL', lease)
end
local function close_now()
  if state ~= 'closed' then changed_from = state end
  state, fails, epoch, opened, next_trial = 'closed', 0, epoch + 1, '', ''
  redis.call('HSET', key, 'state', state, 'fail_count', '0', 'epoch', int(epoch))
  redis.call('HDEL', key, 'opened_at_ms', 'next_trial_ms', 'success_count')
  redis.call('DEL', lease)
end
"""

# ARGV: name, now, register ('1': write the settings), fail_max, reset_timeout_ms.
# Also registers a breaker whose hash is gone (a Redis restart without persistence).
# A fail_max below 1 means the caller does not know the settings (a stock pybreaker
# CircuitBreaker reading through the storage interface): then nothing is written.
READ = (
    _PRELUDE
    + """
if tonumber(ARGV[4]) >= 1 and (ARGV[3] == '1' or not h[6]) then
  register()
  redis.call('HSET', key, 'fail_max', ARGV[4], 'reset_timeout_ms', ARGV[5])
end
return reply()
"""
)

# ARGV: name, now, epoch of the permit, fail_max, reset_timeout_ms.
# Counts only while closed and only for calls admitted in the current closed period, and
# opens in the same step as the increment that reaches fail_max: never overshot, opened once.
FAILURE = (
    _PRELUDE
    + """
if state == 'closed' and epoch == tonumber(ARGV[3]) then
  fails = redis.call('HINCRBY', key, 'fail_count', 1)
  verdict = 'counted'
  if fails >= tonumber(ARGV[4]) then open_now(ARGV[5]) end
end
return reply()
"""
)

# ARGV: name, now, epoch of the permit. Zeroes the failure count (pybreaker semantics).
SUCCESS = (
    _PRELUDE
    + """
if state == 'closed' and epoch == tonumber(ARGV[3]) and fails > 0 then
  fails = 0
  redis.call('HSET', key, 'fail_count', '0')
end
return reply()
"""
)

# ARGV: name, now, token, lease_ms. One caller cluster-wide gets verdict 'trial' (the lease).
TRIAL = (
    _PRELUDE
    + """
local due = tonumber(next_trial) or 0
if state == 'closed' then
  verdict = 'closed'
elseif state == 'open' and now < due then
  verdict, wait_ms = 'open', due - now
else
  local taken, lapses = holder()
  if taken then
    verdict, wait_ms = 'busy', lapses - now
  else
    redis.call('SET', lease, ARGV[3] .. ' ' .. int(now + tonumber(ARGV[4])), 'PX', ARGV[4])
    verdict = 'trial'
    if state ~= 'half-open' then
      changed_from, state = state, 'half-open'
      redis.call('HSET', key, 'state', state)
    end
  end
end
return reply()
"""
)

# ARGV: name, now, token, '1' (success) or '0' (failure), reset_timeout_ms.
# Applied only while half-open and only by the lease holder (or when the lease lapsed
# and nobody took it over); otherwise someone else's outcome decides.
TRIAL_DONE = (
    _PRELUDE
    + """
local taken = holder()
if state == 'half-open' and (not taken or taken == ARGV[3]) then
  verdict = 'applied'
  if ARGV[4] == '1' then close_now() else open_now(ARGV[5]) end
end
return reply()
"""
)

# ARGV: name, now, token. The trial's caller went away without an outcome: free the lease.
ABANDON = (
    _PRELUDE
    + """
if holder() == ARGV[3] then redis.call('DEL', lease) end
return reply()
"""
)

# ARGV: name, now, '1' to refuse a name nobody registered. Operator reset: closed, counter
# zero, lease gone, for everyone.
RESET = (
    _PRELUDE
    + """
if ARGV[3] == '1' and redis.call('SISMEMBER', registry, name) == 0
    and redis.call('EXISTS', key) == 0 then
  verdict = 'unknown'
  return reply()
end
close_now()
register()
verdict = 'applied'
return reply()
"""
)

# ARGV: name, now, reset_timeout_ms. Open now (operator trip, pybreaker's CircuitBreaker.open()):
# an open breaker's reset timeout starts again, with no state change to report.
FORCE_OPEN = (
    _PRELUDE
    + """
register()
if state ~= 'open' then
  open_now(ARGV[3])
else
  opened, next_trial = int(now), int(now + tonumber(ARGV[3]))
  redis.call('HSET', key, 'opened_at_ms', opened, 'next_trial_ms', next_trial)
end
verdict = 'applied'
return reply()
"""
)
