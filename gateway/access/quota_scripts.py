"""The Lua scripts of quota admission, release and cancel (called by gateway/access/quota.py, whose
docstring has the key layout). Each runs as one atomic step over the levels of one request (the
key, its team, its organization: gateway/access/levels.py), all in one Redis Cluster slot.
"""

from __future__ import annotations

from gateway.resp.client import Script

MINUTE_TTL = 120  # seconds a window lives after its first request
DAY_TTL = 40 * 86400
MONTH_TTL = 400 * 86400
LEASE_KEEP_MS = 3_600_000  # an expired lease is kept this long, so a late release still reconciles

# KEYS: the tombstone, then 5 per level (key first): limits, minute, day, month, leases; for a
# batch line, then its charge record.
# ARGV (admit_args in gateway/access/quota.py): now (ms), model, reserved tokens, lease, the lease's
# expiry (ms), the lease sets' TTL (ms), batch ('1' or '0'), reserved money (nanos); for a batch
# line, then its claim's number, its charge record's TTL (s) and the day (the record is the last key).
#
# What a script costs in Redis (callgrind, instructions): a redis.call about 4,000 (a write some
# 6,000), each field it reads into Lua about 3,000 more, each `tonumber` (strtod) about 2,000, each
# Lua number passed to redis.call about 2,800 (snprintf %.17g). So numbers used at every level
# come as text (the lease's expiry, TTLs), each value read is converted once, and a level above the
# key reads only the 8 fields of its record admission needs. (HSET of sums read before costs what
# HINCRBY per field does, once the sums are formatted: the counters stay HINCRBY's.)
_ADMIT = Script(
    f"""
local TTLS, KEEP = {{[2] = '{MINUTE_TTL}', [3] = '{DAY_TTL}', [4] = '{MONTH_TTL}'}}, {LEASE_KEEP_MS}
"""
    + """if redis.call('EXISTS', KEYS[1]) == 1 then return {'cancelled'} end
local now = tonumber(ARGV[1])
local reserve, money, lease = tonumber(ARGV[3]), tonumber(ARGV[8]), ARGV[4]
local batch = ARGV[7] == '1'
local n = math.floor((#KEYS - 1) / 5)
local line = ARGV[9] and KEYS[#KEYS]
if line then
  -- a batch line's run replaces the line's earlier runs, whose results can no longer be recorded
  local was = redis.call('HMGET', line, 'claim', 'lease', 'settled', 'day', 'tokens', 'spend', 'prompt', 'completion')
  if was[1] and tonumber(was[1]) > tonumber(ARGV[9]) then return {'superseded'} end
  if was[2] ~= lease then
    -- its charge is undone once: while its lease is held (the run died or was taken over), or settled
    if was[2] and was[2] ~= '' and (redis.call('ZREM', KEYS[6], was[2]) == 1 or was[3] == '1') then
      local toks, spent = 0 - tonumber(was[5]), 0 - tonumber(was[6])
      for o = 1, 5 * n, 5 do
        local base = string.sub(KEYS[o + 5], 1, -8)  -- <base>bleases
        if o > 1 then redis.call('ZREM', KEYS[o + 5], was[2]) end
        for _, period in ipairs({base .. 'day:' .. was[4], base .. 'month:' .. string.sub(was[4], 1, 7)}) do
          if redis.call('EXISTS', period) == 1 then
            redis.call('HINCRBY', period, 'requests', -1)
            redis.call('HINCRBY', period, 'tokens', toks)
            if spent ~= 0 then redis.call('HINCRBY', period, 'spend', spent) end
            if o == 1 and was[3] == '1' then
              redis.call('HINCRBY', period, 'prompt_tokens', 0 - tonumber(was[7]))
              redis.call('HINCRBY', period, 'completion_tokens', 0 - tonumber(was[8]))
            end
          end
        end
      end
    end
    redis.call('HSET', line, 'claim', ARGV[9], 'lease', '')
    redis.call('EXPIRE', line, ARGV[10])
  end
end
-- a missing field (false) and "" both mean null
local function limit(v) if v and v ~= '' then return tonumber(v) end return -1 end
-- per level: its limits (rpm, tpm, max_concurrent, daily/monthly tokens, daily/monthly budget) and
-- its minute window {tokens, requests} where kept, as numbers (each converted once: tonumber is
-- strtod, half the price of a redis.call)
local lim, mins = {}, {}
for l = 1, n do
  local o = 1 + (l - 1) * 5
  local rec
  if l == 1 then
    rec = redis.call('HMGET', KEYS[o + 1], 'models', 'rpm', 'tpm', 'max_concurrent', 'daily_tokens',
      'monthly_tokens', 'daily_budget', 'monthly_budget', 'created_at', 'revoked_at', 'expires_at')
    if not rec[9] then return {'unknown'} end
    if rec[10] and rec[10] ~= '' then return {'revoked'} end
    if rec[11] and rec[11] ~= '' and tonumber(rec[11]) * 1000 <= now then return {'expired', rec[11]} end
  else
    rec = redis.call('HMGET', KEYS[o + 1], 'models', 'rpm', 'tpm', 'max_concurrent', 'daily_tokens',
      'monthly_tokens', 'daily_budget', 'monthly_budget')
  end
  if rec[1] and rec[1] ~= '' then
    local allowed = false
    for _, m in ipairs(cjson.decode(rec[1])) do
      if m == ARGV[2] then allowed = true break end
    end
    if not allowed then return {'model'} end
  end
  local x = {limit(rec[2]), limit(rec[3]), limit(rec[4]), limit(rec[5]), limit(rec[6]), limit(rec[7]), limit(rec[8])}
  lim[l] = x
  -- above the key, a level keeps only what its limits and reports read: its minute window only
  -- with rpm or tpm, its leases only with max_concurrent (the key's are always kept: they make
  -- release idempotent)
  if l == 1 or x[1] >= 0 or x[2] >= 0 then
    local w = redis.call('HMGET', KEYS[o + 2], 'tokens', 'requests')
    mins[l] = {tonumber(w[1] or 0), tonumber(w[2] or 0)}
  end
end
local k, kw = lim[1], mins[1]
local kreq, ktok = kw[2], kw[1]
-- a client-side retry of an admission that did run must not reserve twice
if redis.call('ZSCORE', KEYS[6], lease) then return {'ok', k[1], kreq, k[2], ktok} end
local function refuse(code, l, used, cap) return {code, k[1], kreq, k[2], ktok, used, cap, l} end
-- a period's window {tokens, spend}
local function period(h)
  local v = redis.call('HMGET', h, 'tokens', 'spend')
  return {tonumber(v[1] or 0), tonumber(v[2] or 0)}
end
for l = 1, n do
  local o, x, w = 1 + (l - 1) * 5, lim[l], mins[l]
  -- the longest-lasting refusal first, so its retry-after is honest; one read per period
  if x[7] >= 0 or x[5] >= 0 then
    local m = period(KEYS[o + 4])
    if x[7] >= 0 and m[2] + money > x[7] then return refuse('monthly_budget', l, m[2], x[7]) end
    if x[5] >= 0 and m[1] + reserve > x[5] then return refuse('monthly_tokens', l, m[1], x[5]) end
  end
  if x[6] >= 0 or x[4] >= 0 then
    local d = period(KEYS[o + 3])
    if x[6] >= 0 and d[2] + money > x[6] then return refuse('daily_budget', l, d[2], x[6]) end
    if x[4] >= 0 and d[1] + reserve > x[4] then return refuse('daily_tokens', l, d[1], x[4]) end
  end
  if w and not batch and x[1] >= 0 and w[2] + 1 > x[1] then return refuse('rpm', l, w[2], x[1]) end
  if w and x[2] >= 0 and w[1] + reserve > x[2] then return refuse('tpm', l, w[1], x[2]) end
  if x[3] >= 0 and not batch then
    local leases = KEYS[o + 5]
    -- leases long expired (a crashed gateway's) are trimmed now and then: ZCOUNT skips them anyway
    if string.sub(lease, -1) == '0' then redis.call('ZREMRANGEBYSCORE', leases, '-inf', now - KEEP) end
    local live = redis.call('ZCOUNT', leases, '(' .. ARGV[1], '+inf')
    if live >= x[3] then return refuse('concurrency', l, live, x[3]) end
  end
end
for l = 1, n do
  local o = 1 + (l - 1) * 5
  -- above the key, a level keeps a minute window only with rpm or tpm (see the reads above); a
  -- batch line adds no request to it
  for i = mins[l] and 2 or 3, 4 do
    -- a counter gets its TTL when it is created (its first request), not on every admission
    local fresh = true
    if not batch or i > 2 then fresh = redis.call('HINCRBY', KEYS[o + i], 'requests', 1) == 1 end
    redis.call('HINCRBY', KEYS[o + i], 'tokens', ARGV[3])
    if money > 0 and i > 2 then redis.call('HINCRBY', KEYS[o + i], 'spend', ARGV[8]) end
    if fresh then redis.call('EXPIRE', KEYS[o + i], TTLS[i]) end
  end
  if l == 1 or lim[l][3] >= 0 then
    redis.call('ZADD', KEYS[o + 5], ARGV[5], lease)
    redis.call('PEXPIRE', KEYS[o + 5], ARGV[6])
  end
end
if line then
  redis.call('HSET', line, 'lease', lease, 'settled', 0, 'day', ARGV[11], 'tokens', reserve, 'spend', money,
    'prompt', 0, 'completion', 0)
end
if batch then return {'ok', k[1], kreq, k[2], ktok + reserve} end
return {'ok', k[1], kreq + 1, k[2], ktok + reserve}
"""
)

# KEYS: 4 per level (key first): leases, minute, day, month.
# ARGV: lease, tokens delta, prompt tokens, completion tokens, spend delta (nanos).
_RELEASE = Script("""
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
local delta, spend = tonumber(ARGV[2]), tonumber(ARGV[5])
for o = 0, #KEYS - 1, 4 do
  if o > 0 then redis.call('ZREM', KEYS[o + 1], ARGV[1]) end
  if delta ~= 0 and redis.call('EXISTS', KEYS[o + 2]) == 1 then
    redis.call('HINCRBY', KEYS[o + 2], 'tokens', delta)
  end
  -- never recreate an expired day/month hash: it would live without a TTL
  for i = 3, 4 do
    if redis.call('EXISTS', KEYS[o + i]) == 1 then
      if delta ~= 0 then redis.call('HINCRBY', KEYS[o + i], 'tokens', delta) end
      -- the prompt/completion split is the key's (the store's rollups have it for every level)
      if o == 0 then
        redis.call('HINCRBY', KEYS[o + i], 'prompt_tokens', ARGV[3])
        redis.call('HINCRBY', KEYS[o + i], 'completion_tokens', ARGV[4])
      end
      if spend ~= 0 then redis.call('HINCRBY', KEYS[o + i], 'spend', ARGV[5]) end
    end
  end
end
return 1
""")

# KEYS: 4 per level (leases, minute, day, month), then the tombstone.
# ARGV: lease, reserved tokens, tombstone TTL (s), batch, reserved money (nanos).
_CANCEL = Script("""
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  -- 0 - x, not -x: Lua writes -0 as "-0", which HINCRBY refuses halfway through the script
  local undo, unspend = 0 - tonumber(ARGV[2]), 0 - tonumber(ARGV[5])
  for o = 0, #KEYS - 2, 4 do
    if o > 0 then redis.call('ZREM', KEYS[o + 1], ARGV[1]) end
    for i = 2, 4 do
      if redis.call('EXISTS', KEYS[o + i]) == 1 then
        -- a batch line added no request to the minute window
        if ARGV[4] ~= '1' or i > 2 then redis.call('HINCRBY', KEYS[o + i], 'requests', -1) end
        redis.call('HINCRBY', KEYS[o + i], 'tokens', undo)
        if unspend ~= 0 and i > 2 then redis.call('HINCRBY', KEYS[o + i], 'spend', unspend) end
      end
    end
  end
  return 1
end
redis.call('SET', KEYS[#KEYS], '1', 'EX', ARGV[3])
return 0
""")

# Many releases in one call (gateway/access/settle_batch.py), each exactly as _RELEASE does it.
# KEYS: each release's 4 per level (key first), then a batch line's charge record, one release
# after the other.
# ARGV: per release 6: its number of levels (negative for a batch line), then _RELEASE's 5
# (lease, tokens delta, prompt tokens, completion tokens, spend delta). Returns how many
# releases were not repeats.
_SETTLE = Script("""
local k, done = 0, 0
for a = 0, #ARGV - 1, 6 do
  local n, lease = tonumber(ARGV[a + 1]), ARGV[a + 2]
  local line = n < 0 and KEYS[k - 4 * n + 1]
  if line then n = -n end
  if redis.call('ZREM', KEYS[k + 1], lease) == 1 then
    done = done + 1
    local delta, spend = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 6])
    for o = k, k + 4 * (n - 1), 4 do
      if o > k then redis.call('ZREM', KEYS[o + 1], lease) end
      if delta ~= 0 and redis.call('EXISTS', KEYS[o + 2]) == 1 then
        redis.call('HINCRBY', KEYS[o + 2], 'tokens', delta)
      end
      for i = 3, 4 do
        if redis.call('EXISTS', KEYS[o + i]) == 1 then
          if delta ~= 0 then redis.call('HINCRBY', KEYS[o + i], 'tokens', delta) end
          if o == k then
            redis.call('HINCRBY', KEYS[o + i], 'prompt_tokens', ARGV[a + 4])
            redis.call('HINCRBY', KEYS[o + i], 'completion_tokens', ARGV[a + 5])
          end
          if spend ~= 0 then redis.call('HINCRBY', KEYS[o + i], 'spend', ARGV[a + 6]) end
        end
      end
    end
    if line and redis.call('HGET', line, 'lease') == lease then
      -- the line's charge: from its reservation to what it used
      redis.call('HINCRBY', line, 'tokens', delta)
      redis.call('HINCRBY', line, 'spend', spend)
      redis.call('HSET', line, 'settled', 1, 'prompt', ARGV[a + 4], 'completion', ARGV[a + 5])
    end
  end
  k = k + 4 * n
  if line then k = k + 1 end
end
return done
""")
