"""The Lua scripts of leased budgets (gateway/access/leases.py): take a slice, give back what a
slice did not use, and cancel a lease call given up on. Each runs as one atomic step over the
levels of one key (key, team, organization: gateway/access/levels.py), all in one Redis Cluster
slot, next to the counters of admission (gateway/access/quota.py has their layout). Per level:

    <base>slices         ZSET slice id -> when it ends at the latest (unix ms): who holds budget now
and next to the key's counters:
    <base>slice:<id>     HASH what the slice took (R, T, M, C) and where (mask: the levels whose
                         minute window it charged); gone once returned (TTL SLICE_KEEP)

A slice is an admission of R requests, T tokens, M money (nano-units) and C concurrency leases
(members <id>.1 .. <id>.C of the leases ZSETs) at once: the same checks as `_ADMIT`, for the
request that asked (a refusal names the same limit), then the grant scaled down to at most
1/share of the smallest room left at any level, never below that one request.
"""

from __future__ import annotations

from gateway.resp.client import Script

# KEYS: the tombstone, the slice record, then 6 per level (key first): limits, minute, day, month,
# leases, slices.
# ARGV: 1 now (ms), 2 model, 3 the asking request's tokens, 4 its money, 5 slice id, 6 lease ms,
# 7 lease keep ms, 8-10 minute/day/month TTLs, 11-14 wanted requests, tokens, money, leases,
# 15 share, 16 the slice's end (ms), 17 the record's TTL (s).
# Returns {'ok', rpm, requests before, tpm, tokens before, R, T, M, C, expires_at} or _ADMIT's
# refusals with, last, the live slices of the refusing level (up to 32 ids).
_LEASE = Script("""
if redis.call('EXISTS', KEYS[1]) == 1 then return {'cancelled'} end
local now = tonumber(ARGV[1])
local r, m, id = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local n = (#KEYS - 2) / 6
local function limit(v) if v and v ~= '' then return tonumber(v) end return -1 end
local lim, win, expires = {}, {}, ''
for l = 1, n do
  local o = 2 + (l - 1) * 6
  local rec = redis.call('HMGET', KEYS[o + 1], 'created_at', 'revoked_at', 'expires_at', 'models',
    'rpm', 'tpm', 'max_concurrent', 'daily_tokens', 'monthly_tokens', 'daily_budget', 'monthly_budget')
  if l == 1 then
    if not rec[1] then return {'unknown'} end
    if rec[2] and rec[2] ~= '' then return {'revoked'} end
    if rec[3] and rec[3] ~= '' then
      if tonumber(rec[3]) * 1000 <= now then return {'expired', rec[3]} end
      expires = rec[3]
    end
  end
  if rec[4] and rec[4] ~= '' then
    local allowed = false
    for _, name in ipairs(cjson.decode(rec[4])) do
      if name == ARGV[2] then allowed = true break end
    end
    if not allowed then return {'model'} end
  end
  local x = {limit(rec[5]), limit(rec[6]), limit(rec[7]), limit(rec[8]), limit(rec[9]), limit(rec[10]), limit(rec[11])}
  lim[l] = x
  win[l] = {0, 0}
  if l == 1 or x[1] >= 0 or x[2] >= 0 then
    local w = redis.call('HMGET', KEYS[o + 2], 'requests', 'tokens')
    win[l] = {tonumber(w[1] or 0), tonumber(w[2] or 0)}
  end
end
local k, kw = lim[1], win[1]
-- a client-side retry of a lease call that did run answers what it took
local took = redis.call('HMGET', KEYS[2], 'R', 'T', 'M', 'C')
if took[1] then
  return {'ok', k[1], kw[1] - tonumber(took[1]), k[2], kw[2] - tonumber(took[2]), took[1], took[2], took[3], took[4], expires}
end
local function refuse(code, l, used, cap)
  local live = redis.call('ZRANGEBYSCORE', KEYS[2 + l * 6], '(' .. ARGV[1], '+inf', 'LIMIT', 0, 32)
  return {code, k[1], kw[1], k[2], kw[2], used, cap, l, live}
end
-- the room left at every level: requests, tokens, money, leases (-1: no limit)
local room = {-1, -1, -1, -1}
-- per period: its hash (offset in a level's keys), its budget and token limits (in x), its name
local periods = {{4, 7, 5, 'monthly'}, {3, 6, 4, 'daily'}}
local function fit(i, left) if room[i] < 0 or left < room[i] then room[i] = left end end
for l = 1, n do
  local o, x, w = 2 + (l - 1) * 6, lim[l], win[l]
  -- the month first: the longest-lasting refusal first, so its retry-after is honest
  for _, p in ipairs(periods) do
    local budget, cap = x[p[2]], x[p[3]]
    if budget >= 0 or cap >= 0 then
      local h = redis.call('HMGET', KEYS[o + p[1]], 'spend', 'tokens')
      local spent, toks = tonumber(h[1] or 0), tonumber(h[2] or 0)
      if budget >= 0 then
        if spent + m > budget then return refuse(p[4] .. '_budget', l, spent, budget) end
        fit(3, budget - spent)
      end
      if cap >= 0 then
        if toks + r > cap then return refuse(p[4] .. '_tokens', l, toks, cap) end
        fit(2, cap - toks)
      end
    end
  end
  if x[1] >= 0 then
    if w[1] + 1 > x[1] then return refuse('rpm', l, w[1], x[1]) end
    fit(1, x[1] - w[1])
  end
  if x[2] >= 0 then
    if w[2] + r > x[2] then return refuse('tpm', l, w[2], x[2]) end
    fit(2, x[2] - w[2])
  end
  if x[3] >= 0 then
    local leases = KEYS[o + 5]
    if string.sub(id, -1) == '0' then redis.call('ZREMRANGEBYSCORE', leases, '-inf', now - tonumber(ARGV[7])) end
    local live = redis.call('ZCOUNT', leases, '(' .. ARGV[1], '+inf')
    if live >= x[3] then return refuse('concurrency', l, live, x[3]) end
    fit(4, x[3] - live)
  end
end
-- the grant: what was wanted, scaled to at most 1/share of the tightest room
local share = tonumber(ARGV[15])
local want = {tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])}
local scale = 1
for i = 1, 3 do
  if room[i] >= 0 and want[i] > 0 then scale = math.min(scale, room[i] / share / want[i]) end
end
local R = math.max(1, math.floor(want[1] * scale))
local T = math.max(r, math.floor(want[2] * scale))
local M = math.max(m, math.floor(want[3] * scale))
local C = 0
if room[4] >= 0 then C = math.min(tonumber(ARGV[14]), R, math.max(1, math.floor(room[4] / share))) end
if R == 1 then T, M = r, m end
local Rs, Ts, Ms = string.format('%d', R), string.format('%d', T), string.format('%d', M)
local ends, mask = tonumber(ARGV[16]), 0
for l = 1, n do
  local o, x = 2 + (l - 1) * 6, lim[l]
  -- above the key, a level keeps its minute window only with rpm or tpm (as _ADMIT)
  local first = 2
  if l > 1 and x[1] < 0 and x[2] < 0 then first = 3 else mask = mask + 2 ^ (l - 1) end
  for i = first, 4 do
    local fresh = redis.call('EXISTS', KEYS[o + i]) == 0
    redis.call('HINCRBY', KEYS[o + i], 'requests', Rs)
    redis.call('HINCRBY', KEYS[o + i], 'tokens', Ts)
    if M > 0 and i > 2 then redis.call('HINCRBY', KEYS[o + i], 'spend', Ms) end
    if fresh then redis.call('EXPIRE', KEYS[o + i], ARGV[6 + i]) end
  end
  if C > 0 and (l == 1 or x[3] >= 0) then
    local members, expiry = {}, now + tonumber(ARGV[6])
    for j = 1, C do
      members[2 * j - 1] = expiry
      members[2 * j] = id .. '.' .. j
    end
    redis.call('ZADD', KEYS[o + 5], unpack(members))
    redis.call('PEXPIRE', KEYS[o + 5], tonumber(ARGV[6]) + tonumber(ARGV[7]))
  end
  local slices = KEYS[o + 6]
  if string.sub(id, -1) == '0' then redis.call('ZREMRANGEBYSCORE', slices, '-inf', now) end
  redis.call('ZADD', slices, ends, id)
  redis.call('PEXPIRE', slices, ends - now + tonumber(ARGV[7]))
end
redis.call('HSET', KEYS[2], 'R', Rs, 'T', Ts, 'M', Ms, 'C', string.format('%d', C), 'mask', string.format('%d', mask))
redis.call('EXPIRE', KEYS[2], ARGV[17])
return {'ok', k[1], kw[1], k[2], kw[2], Rs, Ts, Ms, string.format('%d', C), expires}
""")

# Many returns in one call, per return: KEYS the slice record, then 5 per level (key first):
# minute, day, month, leases, slices. ARGV 10 + kept: levels, slice id, requests unused, tokens
# delta (used + still reserved - taken), prompt tokens, completion tokens, money delta, C, the
# expiry (ms) of the leases kept, how many are kept, then their numbers: the requests still in
# flight, whose leases stay until each is released on its own (_SETTLE).
# A return runs once (the record goes with it); returns how many ran.
_RETURN = Script("""
local k, a, done = 0, 0, 0
while a < #ARGV do
  local n, id = tonumber(ARGV[a + 1]), ARGV[a + 2]
  local unused, dt, dm, c = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 7]), tonumber(ARGV[a + 8])
  local nkept = tonumber(ARGV[a + 10])
  local mask = redis.call('HGET', KEYS[k + 1], 'mask')
  if mask then
    redis.call('DEL', KEYS[k + 1])
    done = done + 1
    mask = tonumber(mask)
    local kept = {}
    for j = 1, nkept do kept[tonumber(ARGV[a + 10 + j])] = true end
    local free = {}
    for j = 1, c do
      if not kept[j] then free[#free + 1] = id .. '.' .. j end
    end
    -- 0 - x, not -x: Lua writes -0 as "-0", which HINCRBY refuses
    local back = string.format('%d', 0 - unused)
    for l = 1, n do
      local o = k + 1 + (l - 1) * 5
      for i = 1, 3 do
        local h = KEYS[o + i]
        if (i > 1 or bit.band(mask, 2 ^ (l - 1)) ~= 0) and redis.call('EXISTS', h) == 1 then
          if unused ~= 0 then redis.call('HINCRBY', h, 'requests', back) end
          if dt ~= 0 then redis.call('HINCRBY', h, 'tokens', ARGV[a + 4]) end
          if i > 1 then
            if l == 1 then
              redis.call('HINCRBY', h, 'prompt_tokens', ARGV[a + 5])
              redis.call('HINCRBY', h, 'completion_tokens', ARGV[a + 6])
            end
            if dm ~= 0 then redis.call('HINCRBY', h, 'spend', ARGV[a + 7]) end
          end
        end
      end
      if #free > 0 then redis.call('ZREM', KEYS[o + 4], unpack(free)) end
      if l == 1 and nkept > 0 then
        local members = {}
        for j = 1, nkept do
          members[2 * j - 1] = ARGV[a + 9]
          members[2 * j] = id .. '.' .. ARGV[a + 10 + j]
        end
        redis.call('ZADD', KEYS[o + 4], unpack(members))
      end
      redis.call('ZREM', KEYS[o + 5], id)
    end
  end
  k = k + 1 + 5 * n
  a = a + 10 + nkept
end
return done
""")

# A lease call given up on (Redis too slow): undo it if it ran, else make it refuse to run later.
# KEYS: the slice record, 5 per level (minute, day, month, leases, slices), then the tombstone.
# ARGV: slice id, tombstone TTL (s).
_UNLEASE = Script("""
local took = redis.call('HMGET', KEYS[1], 'R', 'T', 'M', 'C', 'mask')
if not took[1] then
  redis.call('SET', KEYS[#KEYS], '1', 'EX', ARGV[2])
  return 0
end
redis.call('DEL', KEYS[1])
local id, c, mask = ARGV[1], tonumber(took[4]), tonumber(took[5])
local undo = {string.format('%d', 0 - tonumber(took[1])), string.format('%d', 0 - tonumber(took[2])),
  string.format('%d', 0 - tonumber(took[3]))}
local members = {}
for j = 1, c do members[j] = id .. '.' .. j end
for o = 2, #KEYS - 1, 5 do
  local l = (o - 2) / 5 + 1
  for i = 0, 2 do
    local h = KEYS[o + i]
    if (i > 0 or bit.band(mask, 2 ^ (l - 1)) ~= 0) and redis.call('EXISTS', h) == 1 then
      redis.call('HINCRBY', h, 'requests', undo[1])
      redis.call('HINCRBY', h, 'tokens', undo[2])
      if i > 0 and undo[3] ~= '0' then redis.call('HINCRBY', h, 'spend', undo[3]) end
    end
  end
  if c > 0 then redis.call('ZREM', KEYS[o + 3], unpack(members)) end
  redis.call('ZREM', KEYS[o + 4], id)
end
return 1
""")
