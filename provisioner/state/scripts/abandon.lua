-- A lobby that leaves: out of the queue, and back with any node the assign script had
-- already given it (its reservation, never a live stream's slot). KEYS: queue, vc:assigned.
-- ARGV: session. Returns the node id it had been given, or ''.
redis.call('ZREM', KEYS[1], ARGV[1])
local node = redis.call('HGET', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return node or ''
