-- requires: assign, take_lock, arrive
-- A lobby request in one step: take the lock, count the arrival (not for a resume, nor for
-- a user whose demand does not scale), join the queue (a resume first), assign, and pick up
-- this session's node if it got one. A session left waiting whose demand does not scale is
-- marked in vc:unscaled, so the autoscaler does not count it (see waiting.lua).
-- KEYS: lock, fence, arrivals, queue, vc:queues, vc:assigned, vc:unscaled, then candidates.
-- ARGV: session, model, region, now, lock ttl, takeover, tau, resume (1/0), pool,
-- reservation expiry, heartbeat timeout, scales (1/0), unscaled marks' lifetime, candidate
-- ids...
-- Returns the lock refusal, or {1, fence, previous session, its node, node or '', position}.
local now = tonumber(ARGV[4])
local lock = take_lock(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
if lock[1] == 0 then return lock end
local scales = ARGV[12] == '1'
if ARGV[8] ~= '1' and scales then arrive(KEYS[3], now, tonumber(ARGV[7])) end
redis.call('ZADD', KEYS[4], 'NX', ARGV[8] == '1' and 0 or now, ARGV[1])
redis.call('SADD', KEYS[5], ARGV[9])
assign(KEYS[4], KEYS[6], 8, 14, now, ARGV[10], tonumber(ARGV[11]))
local node = redis.call('HGET', KEYS[6], ARGV[1])
if node then
  redis.call('HDEL', KEYS[6], ARGV[1])
  redis.call('ZREM', KEYS[7], ARGV[1])
  return {1, lock[2], lock[3], lock[4], node, 0}
end
if scales then
  redis.call('ZREM', KEYS[7], ARGV[1])
else   -- marks of lobbies long gone (placed, or their process died) expire here
  redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now - tonumber(ARGV[13]))
  redis.call('ZADD', KEYS[7], now, ARGV[1])
end
return {1, lock[2], lock[3], lock[4], '', redis.call('ZRANK', KEYS[4], ARGV[1]) + 1}
