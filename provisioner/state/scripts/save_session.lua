-- A session placed on a node (again), in one step: the node's placed hash records it (what
-- the node may report, beat.lua), its record is rewritten and kept ttl_s, and it is
-- displaced (placed away from its nearest region while that was down) or no longer.
-- KEYS: the session hash, the node's placed hash, vc:displaced
-- ARGV: session id, its placement "user|fence|placed_at", ttl_s, away_from ("" if none),
-- then field, value pairs of the record
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[1], 'away_from', 'recall_by')
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'away_from', ARGV[4])
  redis.call('SADD', KEYS[3], ARGV[1])
else
  redis.call('SREM', KEYS[3], ARGV[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
