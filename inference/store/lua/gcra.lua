-- One rate-limit decision for one client: GCRA (generic cell rate algorithm), atomic in Redis.
-- Time is Redis's own (TIME), so the pods' clocks never matter. Only an allowed request writes,
-- and the write sets its expiry in the same call.
--
-- KEYS[1]  the client's key
-- ARGV[1]  emission interval, microseconds: the window divided by the limit
-- ARGV[2]  burst: how many units may be spent at once
-- ARGV[3]  cost of this request, in units (1 for a request; max_tokens for a token budget)
-- Returns  {allowed 0|1, remaining units, retry after (microseconds), full again after (microseconds)}

local key = KEYS[1]
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tolerance = interval * burst

local tat = tonumber(redis.call('GET', key)) or now
if tat < now then
  tat = now
end
local new_tat = tat + interval * cost
local allow_at = new_tat - tolerance

if allow_at > now then
  local remaining = math.floor((tolerance - (tat - now)) / interval)
  if remaining < 0 then remaining = 0 end
  return {0, remaining, allow_at - now, tat - now}
end

local expire_ms = math.max(1, math.ceil((new_tat - now) / 1000))
redis.call('SET', key, string.format('%.0f', new_tat), 'PX', expire_ms)
return {1, math.floor((now - allow_at) / interval), 0, new_tat - now}
