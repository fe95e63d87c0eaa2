-- One lobby attempt against token buckets, one per limit (the user's, the client's): either
-- every bucket has a token and gives one, or none is touched and the first empty one says
-- when it holds a token again. A bucket holds at most `capacity` tokens and gains `per_s`
-- a second; a missing bucket is full (it expires once it would have refilled).
-- KEYS: the buckets (vc:attempts:...). ARGV: now, then capacity and per_s for each key.
-- Returns {1}, or {0, the empty bucket's index (1-based), seconds until a token (a string)}.
local now = tonumber(ARGV[1])
local levels = {}
for i, key in ipairs(KEYS) do
  local capacity, per_s = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local h = redis.call('HMGET', key, 'tokens', 't')
  local level = capacity
  if h[1] then
    level = math.min(capacity, tonumber(h[1]) + math.max(0, now - tonumber(h[2])) * per_s)
  end
  if level < 1 then
    return {0, i, tostring((1 - level) / per_s)}
  end
  levels[i] = level
end
for i, key in ipairs(KEYS) do
  local capacity, per_s = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  redis.call('HSET', key, 'tokens', tostring(levels[i] - 1), 't', ARGV[1])
  redis.call('EXPIRE', key, math.ceil(capacity / per_s) + 1)
end
return {1}
