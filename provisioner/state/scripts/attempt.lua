-- One lobby attempt against token buckets, one per limit (the client's, the user's): either
-- every bucket has a token and gives one, or the first empty one refuses and says when it
-- holds a token again; then only the buckets before it that are marked `always` give one
-- (the client pays for every attempt it makes, the user only for those let through). A
-- bucket holds at most `capacity` tokens and gains `per_s` a second; a missing bucket is
-- full (it expires once it would have refilled).
-- KEYS: the buckets (vc:attempts:...). ARGV: now, then capacity, per_s and always (1 or 0)
-- for each key.
-- Returns {0, the empty bucket's index (1-based), seconds until it has a token (a string)}
-- when refused; when let through {1}, or {1, 1, seconds until the first bucket has a token
-- again} when that attempt took its last.
local now = tonumber(ARGV[1])
local levels = {}
local refused = nil
for i, key in ipairs(KEYS) do
  local capacity, per_s = tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i])
  local h = redis.call('HMGET', key, 'tokens', 't')
  local level = capacity
  if h[1] then
    level = math.min(capacity, tonumber(h[1]) + math.max(0, now - tonumber(h[2])) * per_s)
  end
  if level < 1 then
    refused = {0, i, tostring((1 - level) / per_s)}
    break
  end
  levels[i] = level
end
for i, level in ipairs(levels) do
  local capacity, per_s = tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i])
  if refused == nil or ARGV[3 * i + 1] == '1' then
    redis.call('HSET', KEYS[i], 'tokens', tostring(level - 1), 't', ARGV[1])
    redis.call('EXPIRE', KEYS[i], math.ceil(capacity / per_s) + 1)
  end
end
if refused then
  return refused
end
if levels[1] and levels[1] - 1 < 1 then
  return {1, 1, tostring((2 - levels[1]) / tonumber(ARGV[3]))}
end
return {1}
