-- Report cumulative usage counters; a counter only grows, so a stale or repeated report
-- never lowers or double counts. KEYS: vc:usage-minutes, then the usage hash per counter.
-- ARGV: keep_s, then field, seconds, minute_s per counter.
for i = 2, #KEYS do
  local field, secs, minute = ARGV[3 * i - 4], tonumber(ARGV[3 * i - 3]), ARGV[3 * i - 2]
  local cur = tonumber(redis.call('HGET', KEYS[i], field) or 0)
  if secs > cur then redis.call('HSET', KEYS[i], field, ARGV[3 * i - 3]) end
  redis.call('EXPIRE', KEYS[i], ARGV[1])
  redis.call('ZADD', KEYS[1], minute, minute)
end
return #KEYS - 1
