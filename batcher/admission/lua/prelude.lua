-- Shared by reserve.lua and feedback.lua (the loader puts it in front of each): the policy,
-- the clock, the model's state and the steps of batcher/admission/schedule.py, line for line.
-- KEYS[1] state hash, KEYS[2] admission log (sorted set: score = slot time, member =
-- "<running token total>:<seq>:<cost>", zero-padded so rank order is log order), KEYS[3]
-- refunds (score = slot time, member "<seq>:<cost>:<1 if its request is given back too>").
-- All times in whole microseconds.
-- ARGV[1] the policy (JSON, batcher.admission.policy.Policy), ARGV[2] the request (JSON).
if redis.replicate_commands then redis.replicate_commands() end
local P = cjson.decode(ARGV[1])
local R = cjson.decode(ARGV[2])
local now = R.now  -- tests pass the clock; in production it is the Redis server's
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local HASH, LOG, REF = KEYS[1], KEYS[2], KEYS[3]

local function fmt(x) return string.format('%.0f', x) end
local function us(seconds) return math.floor(seconds * 1000000 + 0.5) end
local function wlen(w) return us(w * (1 + P.window_margin)) end

local FIELDS = {'rtat', 'ttat', 'last', 'start', 'pause', 'm0', 't0', 'tdec', 's429', 'sh0', 'sht',
                'shn', 'cum', 'seq',
                'dec429', 'decnear', 'shdown', 'refunded', 'sus', 'susat', 'suscost'}
local FLOATS = {m0 = true, sh0 = true}
local st = {}
do
  local raw = redis.call('HMGET', HASH, unpack(FIELDS))
  for i, f in ipairs(FIELDS) do st[f] = tonumber(raw[i]) end
  for _, f in ipairs({'last', 'start', 'pause', 'shn', 'cum', 'seq', 'dec429', 'decnear', 'shdown',
                      'refunded', 'sus', 'susat', 'suscost'}) do
    st[f] = st[f] or 0
  end
end

local function save(horizon)
  local args = {}
  for _, f in ipairs(FIELDS) do
    local v = st[f]
    if v then
      args[#args + 1] = f
      if FLOATS[f] then args[#args + 1] = string.format('%.17g', v) else args[#args + 1] = fmt(v) end
    end
  end
  redis.call('HSET', HASH, unpack(args))
  local ttl = math.ceil((math.max(horizon, now) - now) / 1000) + us(P.idle_ttl_s) / 1000
  for _, k in ipairs({HASH, LOG, REF}) do redis.call('PEXPIRE', k, ttl) end
end

local function mult(v0, t0)
  if not v0 or not t0 then return 1 end
  return math.min(1, v0 + P.aimd_recovery_per_s * math.max(0, now - t0) / 1000000)
end
local function share_now()
  if not P.adaptive then return 1 end
  local t0 = nil
  if st.sht then t0 = st.sht + us(P.share_hold_s) * 2 ^ math.min(st.shn, P.share_hold_doublings) end
  return mult(st.sh0, t0)
end
local function multiplier()
  if not P.adaptive then return 1 end
  return math.min(mult(st.m0, st.t0), share_now())
end
local function cap(share) return share - P.share_margin_factor * (1 - P.headroom) * (1 - share) end

local function longest()
  local out = 0
  for _, w in ipairs(P.request_windows_s) do out = math.max(out, wlen(w)) end
  for _, w in ipairs(P.token_windows_s) do out = math.max(out, wlen(w)) end
  return out
end

local function expire_log()
  local cutoff = '(' .. fmt(now - longest())
  redis.call('ZREMRANGEBYSCORE', LOG, '-inf', cutoff)
  redis.call('ZREMRANGEBYSCORE', REF, '-inf', cutoff)
end

-- The log entry at 0-based rank: slot, running total, seq, cost.
local function entry(rank)
  local r = redis.call('ZRANGE', LOG, rank, rank, 'WITHSCORES')
  local cum, seq, cost = string.match(r[1], '^(%d+):(%d+):(%d+)$')
  return tonumber(r[2]), tonumber(cum), tonumber(seq), tonumber(cost)
end

-- Entries after `since`: rank of the first, count, tokens, running total before the first,
-- and the refunded count and tokens among them.
local function window(since)
  local nref, tref = 0, 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', REF, '(' .. fmt(since), '+inf')) do
    local _, cost, req = string.match(m, '^(%d+):(%d+):(%d+)$')
    nref, tref = nref + tonumber(req), tref + tonumber(cost)
  end
  local card = redis.call('ZCARD', LOG)
  local first = redis.call('ZCOUNT', LOG, '-inf', fmt(since))
  if card == first then return first, 0, 0, 0, nref, tref end
  local _, cum0, _, cost0 = entry(first)
  local _, cum1 = entry(card - 1)
  return first, card - first, cum1 - cum0 + cost0, cum0 - cost0, nref, tref
end

-- schedule._refunded_through: requests and tokens given back among the entries after `since`
-- up to the one numbered `seq`
local function refunded_through(since, seq)
  local n, t = 0, 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', REF, '(' .. fmt(since), '+inf')) do
    local s, cost, req = string.match(m, '^(%d+):(%d+):(%d+)$')
    if tonumber(s) <= seq then n, t = n + tonumber(req), t + tonumber(cost) end
  end
  return n, t
end

local function reply(at, seq, decreased, waiter)
  local d = '0'
  if decreased then d = '1' end
  return {fmt(at), fmt(now), fmt(seq), string.format('%.17g', multiplier()),
          string.format('%.17g', share_now()), fmt(st.pause), fmt(st.dec429), fmt(st.decnear),
          fmt(st.shdown), fmt(st.refunded), d, fmt(waiter or 0)}
end

local function estimates(left, limit, tokens, stop, without)
  local best = nil
  local windows = {}
  local shortest = math.huge
  for _, w in ipairs(P.header_windows_s) do
    windows[#windows + 1] = w
    shortest = math.min(shortest, w)
  end
  if redis.call('ZCARD', LOG) > 0 and now - st.start < us(shortest) then
    for _, w in ipairs(P.ramp_header_windows_s) do windows[#windows + 1] = w end
  end
  local _, an, atotal, _, anref, atref = window(stop)  -- sent after the answered request
  for _, w in ipairs(windows) do
    local budget = limit * w / 60
    if left <= budget then
      local since = stop - us(w)
      local _, n, total, _, nref, tref = window(since)
      local used = n - nref - (an - anref)
      if tokens then used = total - tref - (atotal - atref) end
      if without and since < without.at and without.at <= stop then
        if tokens then used = used - without.cost else used = used - 1 end
      end
      local est = (used + left) / budget
      if not best or est > best then best = est end
    end
  end
  return best
end

local function stop_of(sig)
  if sig.sent_at > 0 and sig.sent_at <= now then return sig.sent_at end
  return now
end

local function judge_failed(sig)
  local e = {at = st.susat, seq = st.sus, cost = st.suscost}
  st.sus, st.susat, st.suscost = 0, 0, 0
  if e.at < now - longest() then return end
  local left, limit, tokens = sig.remaining_requests, P.rpm, false
  if sig.remaining_tokens >= 0 then left, limit, tokens = sig.remaining_tokens, P.tpm, true end
  local with_it = estimates(left, limit, tokens, stop_of(sig), nil)
  local without = estimates(left, limit, tokens, stop_of(sig), e)
  if with_it and without and with_it > 1 and 1 >= without then
    redis.call('ZADD', REF, fmt(e.at), fmt(e.seq) .. ':' .. fmt(e.cost) .. ':1')
    st.refunded = st.refunded + 1
  end
end

-- schedule.feedback
local function apply_feedback(sig)
  expire_log()
  local share = share_now()
  local before = multiplier()
  local cooled = (not st.tdec) or now - st.tdec >= us(P.aimd_cooldown_s)
  local strike = sig.is_429 and (P.aimd_strike_requests == 0
    or (st.s429 ~= nil and st.seq - st.s429 <= P.aimd_strike_requests))
  if sig.failed_seq > 0 and not sig.is_429 then
    st.sus, st.susat, st.suscost = sig.failed_seq, sig.failed_at, sig.failed_cost
  end
  local has_headers = sig.remaining_requests >= 0 or sig.remaining_tokens >= 0
  if st.sus > 0 and has_headers then judge_failed(sig) end
  local revealed = nil
  if P.adaptive then
    for _, r in ipairs({{sig.remaining_requests, P.rpm, false}, {sig.remaining_tokens, P.tpm, true}}) do
      if r[1] >= 0 then
        local best = estimates(r[1], r[2], r[3], stop_of(sig), nil)
        if best and (not revealed or best < revealed) then revealed = best end
      end
    end
    local from_headers = revealed ~= nil
    local probing = st.sh0 ~= nil and st.sht ~= nil and share > st.sh0
    if not revealed and sig.bound and not has_headers and (strike or (sig.is_429 and probing))
        and redis.call('ZCARD', LOG) >= 10 then
      -- schedule.py says why: the lower end, our usage without the refused request
      local without = nil
      local member = fmt(sig.failed_seq) .. ':' .. fmt(sig.failed_cost) .. ':0'
      if not redis.call('ZSCORE', REF, member) then
        without = {at = sig.failed_at, cost = sig.failed_cost}
      end
      local upper, lower = nil, nil
      for _, r in ipairs({{P.rpm, false}, {P.tpm, true}}) do
        local hi = estimates(0, r[1], r[2], stop_of(sig), nil)
        local lo = estimates(0, r[1], r[2], stop_of(sig), without)
        if hi and (not upper or hi > upper) then upper = hi end
        if lo and (not lower or lo > lower) then lower = lo end
      end
      if upper and lower then
        if upper < share - P.share_margin_factor * (1 - P.headroom) then
          revealed = lower
        elseif strike and lower < share then
          revealed = math.min(share, (lower + upper) / 2)
        end
      end
    end
    if revealed then
      if not from_headers and probing and share < 1 then st.shn = st.shn + 1 else st.shn = 0 end
      revealed = math.max(P.aimd_min, math.min(1, revealed))
      local tau = us(P.share_smoothing_down_s)
      if revealed >= share then tau = us(P.share_smoothing_s) end
      if st.sht and tau > 0 then
        local weight = 1 - math.exp(-math.max(0, now - st.sht) / tau)
        revealed = share + weight * (revealed - share)
      end
      if revealed < share - 1e-3 then st.shdown = st.shdown + 1 end
      st.sh0, st.sht, share = revealed, now, revealed
    end
  end
  if sig.is_429 and sig.failed_seq > 0 and sig.failed_at >= now - longest() then
    redis.call('ZADD', REF, fmt(sig.failed_at), fmt(sig.failed_seq) .. ':' .. fmt(sig.failed_cost) .. ':0')
  end
  local explained = false
  if sig.near_limit and not sig.is_429 then
    local c = cap(share)
    local slack = us(P.feedback_slack_s)
    if sig.by_requests then
      for _, w in ipairs(P.request_windows_s) do
        local _, n, _, _, nref = window(now - wlen(w) - slack)
        if n - nref + 1 > P.rpm * w / 60 * c then explained = true end
      end
    end
    if sig.by_tokens then
      for _, w in ipairs(P.token_windows_s) do
        local _, _, total, _, _, tref = window(now - wlen(w) - slack)
        if total - tref + sig.last_cost > P.tpm * w / 60 * c then explained = true end
      end
    end
  end
  local limited = sig.is_429 or (sig.near_limit and not explained)
  local pause_s = math.min(sig.pause_s, P.max_pause_s)
  if limited and pause_s > 0 and now + us(pause_s) > st.pause then
    st.pause = now + us(pause_s)
    local tol = us(P.tolerance_s)
    st.rtat = math.max(st.rtat or 0, st.pause + tol)
    st.ttat = math.max(st.ttat or 0, st.pause + tol)
  end
  local m = mult(st.m0, st.t0)
  if sig.is_429 then st.s429 = st.seq end
  if P.adaptive and (strike or (limited and not sig.is_429 and not revealed)) and cooled then
    m = math.max(P.aimd_min, m * P.aimd_beta)
    st.m0, st.t0, st.tdec = m, now, now
    if sig.is_429 then st.dec429 = st.dec429 + 1 else st.decnear = st.decnear + 1 end
  end
  return multiplier() < before - 1e-9
end

local function horizon()
  return math.max(st.rtat or 0, st.ttat or 0, st.pause, st.last + longest())
end
