-- A minute's counters were billed: unless a report changed them since they were read, the
-- minute is clean (no longer dirty) and its hash may expire. Changed: it stays dirty and
-- the next settle step bills it again (billing merges counters, so that is harmless).
-- KEYS: vc:usage-dirty, the minute's usage hash. ARGV: keep_s, minute_s, then field and
-- seconds per counter billed. Returns 1 if clean now, 0 if still dirty.
local n = (#ARGV - 2) / 2
if redis.call('HLEN', KEYS[2]) ~= n then return 0 end
for i = 1, n do
  local cur = redis.call('HGET', KEYS[2], ARGV[1 + 2 * i])
  if not cur or tonumber(cur) ~= tonumber(ARGV[2 + 2 * i]) then return 0 end
end
redis.call('ZREM', KEYS[1], ARGV[2])
if n > 0 then redis.call('EXPIRE', KEYS[2], ARGV[1]) end
return 1
