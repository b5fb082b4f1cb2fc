-- RESERVE: apply the answers reported since the last round trip (R.feedback), then take the
-- earliest slot the pacing, the pause and every window allow for R.cost tokens, or give it to
-- one of the costs waiting behind it (R.waiting) that fits before it without moving it, or
-- that packs the token room at its slot best (schedule.reserve, schedule._pack).
for _, sig in ipairs(R.feedback or {}) do apply_feedback(sig) end
expire_log()
local m = multiplier()
local c = 1
if P.adaptive then c = cap(share_now()) end
local tol = us(P.tolerance_s)

-- schedule._slot
local function slot(cost)
  local rtat, ttat = st.rtat or (now + tol), st.ttat or (now + tol)
  local at = math.max(now, rtat - tol, ttat - tol, st.pause, st.last)
  local base = at
  for _, w in ipairs(P.request_windows_s) do
    local len = wlen(w)
    local first, n, _, _, nref = window(base - len)
    local excess = n - nref + 1 - P.rpm * w / 60 * c
    if n > 0 and excess > 0 then
      local need = math.ceil(excess)
      local i = first + math.min(n, need) - 1
      if nref > 0 then
        while i < first + n - 1 do
          local _, _, seq = entry(i)
          if i - first + 1 - refunded_through(base - len, seq) >= need then break end
          i = i + 1
        end
      end
      at = math.max(at, entry(i) + len)
    end
  end
  for _, w in ipairs(P.token_windows_s) do
    local len = wlen(w)
    local first, n, total, before, _, tref = window(base - len)
    local excess = total - tref + cost - P.tpm * w / 60 * c
    if total > 0 and excess > 0 then
      local lo, hi = first, first + n - 1
      while lo < hi do
        local mid = math.floor((lo + hi) / 2)
        local _, cum = entry(mid)
        if cum - before >= excess then hi = mid else lo = mid + 1 end
      end
      if tref > 0 then
        while lo < first + n - 1 do
          local _, cum, seq = entry(lo)
          local _, rt = refunded_through(base - len, seq)
          if cum - before - rt >= excess then break end
          lo = lo + 1
        end
      end
      at = math.max(at, entry(lo) + len)
    end
  end
  return at, rtat, ttat
end

-- schedule._commit; returns the log member (to take a tentative slot back)
local function commit(cost, at, rtat, ttat)
  st.rtat = math.floor(math.max(rtat, at) + 60000000 / (P.rpm * P.headroom * m) + 0.5)
  st.ttat = math.floor(math.max(ttat, at) + cost * 60000000 / (P.tpm * P.headroom * m) + 0.5)
  if redis.call('ZCARD', LOG) == 0 then st.start = at end
  st.cum = st.cum + cost
  st.seq = st.seq + 1
  local member = string.format('%016.0f:%012.0f:%.0f', st.cum, st.seq, cost)
  redis.call('ZADD', LOG, fmt(at), member)
  st.last = at
  return member
end

local cost = R.cost
local at, rtat, ttat = slot(cost)
local given, waiter = nil, 0
if at > now then
  local waiting = R.waiting or {}
  for i = 1, math.min(#waiting, P.lookahead) do
    local other = waiting[i]
    if other < cost then
      local fat, frtat, fttat = slot(other)
      if fat < at then
        local k_rtat, k_ttat, k_last, k_start, k_cum, k_seq = st.rtat, st.ttat, st.last, st.start,
          st.cum, st.seq
        local member = commit(other, fat, frtat, fttat)
        if slot(cost) <= at then
          given, waiter = fat, i
          break
        end
        st.rtat, st.ttat, st.last, st.start, st.cum, st.seq = k_rtat, k_ttat, k_last, k_start,
          k_cum, k_seq
        redis.call('ZREM', LOG, member)
      end
    end
  end
end
-- schedule._pack: which of the head (0) and the waiting should take the head's slot so that
-- two going first fill the token room at it best; 0 unless the room is short
local function pack(waiting, n)
  local room = math.huge
  for _, w in ipairs(P.token_windows_s) do
    local _, _, total, _, _, tref = window(at - wlen(w))
    room = math.min(room, P.tpm * w / 60 * c - (total - tref))
  end
  if cost > room then return 0 end
  local fits = {{0, cost}}
  local largest = nil
  for i = 1, n do
    if waiting[i] <= room then
      fits[#fits + 1] = {i, waiting[i]}
      if largest == nil or waiting[i] > largest then largest = waiting[i] end
    end
  end
  if largest == nil or cost + largest <= room then return 0 end
  local best, pick = -1, 0
  for _, a in ipairs(fits) do
    local second = 0
    for _, b in ipairs(fits) do
      if b[1] ~= a[1] and b[2] > second and a[2] + b[2] <= room then second = b[2] end
    end
    if a[2] + second > best then best, pick = a[2] + second, a[1] end
  end
  return pick
end

if not given and at > now and (R.passed or 0) < P.lookahead_passes then
  local waiting = R.waiting or {}
  local i = pack(waiting, math.min(#waiting, P.lookahead))
  if i > 0 then
    local fat, frtat, fttat = slot(waiting[i])
    if fat <= at then
      commit(waiting[i], fat, frtat, fttat)
      given, waiter = fat, i
    end
  end
end
if not given then
  commit(cost, at, rtat, ttat)
  given = at
end
save(horizon())
return reply(given, st.seq, false, waiter)
