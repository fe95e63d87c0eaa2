-- Make the live (+inf) slots exactly the node's own streams: a failed mark or release is
-- repaired at the next heartbeat. KEYS: slot zset. ARGV: the node's live session ids.
local mine = {}
for _, sid in ipairs(ARGV) do
  mine[sid] = true
  redis.call('ZADD', KEYS[1], '+inf', sid)
end
for _, sid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '+inf', '+inf')) do
  if not mine[sid] then redis.call('ZREM', KEYS[1], sid) end
end
return #ARGV
