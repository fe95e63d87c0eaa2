-- Report cumulative usage counters; a counter only grows, so a stale or repeated report
-- never lowers or double counts. A counter that grew makes its minute dirty (and its hash
-- never expires until settle_usage.lua finds it billed). KEYS: vc:usage-dirty, then the
-- usage hash per counter. ARGV: field, seconds, minute_s per counter.
for i = 2, #KEYS do
  local field, secs, minute = ARGV[3 * i - 5], ARGV[3 * i - 4], ARGV[3 * i - 3]
  local cur = tonumber(redis.call('HGET', KEYS[i], field) or 0)
  if tonumber(secs) > cur then
    redis.call('HSET', KEYS[i], field, secs)
    redis.call('PERSIST', KEYS[i])
    redis.call('ZADD', KEYS[1], minute, minute)
  end
end
return #KEYS - 1
