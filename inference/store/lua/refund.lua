-- Give units back to a GCRA budget (tokens reserved up front but not generated). Atomic in Redis.
--
-- KEYS[1]  the client's key
-- ARGV[1]  emission interval, microseconds
-- ARGV[2]  units to give back
-- Returns  1 if the key was changed, 0 if there was nothing to refund

local key = KEYS[1]
local interval = tonumber(ARGV[1])
local units = tonumber(ARGV[2])

local tat = tonumber(redis.call('GET', key))
if not tat then
  return 0
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local new_tat = tat - interval * units
if new_tat <= now then
  redis.call('DEL', key)
else
  redis.call('SET', key, string.format('%.0f', new_tat), 'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
end
return 1
