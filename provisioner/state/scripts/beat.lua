-- A node's heartbeat in one step: its health, its live slots, its users' locks, its usage,
-- and the locks of streams that closed since (released if still theirs, so the user may
-- start again at once). Refused (returns {0}) for a node the control plane forgot. While a
-- retarget is pending and the node does not serve the new model yet, its old state is not
-- written (the record already says LOADING for the new model).
-- KEYS: node hash, slot zset, vc:usage-dirty, then one lock per live stream, one usage
-- hash per counter, one lock per closed stream.
-- ARGV: now, state, progress, eta_ready, ready_at, lock ttl_s, node id, serving
-- "model:version", number of streams n, number of counters m, then session
-- and fence per live stream, "user|session:conn", seconds, minute per counter (the field
-- becomes "user|session:conn|node|model|region" from the node's record), session per closed
-- stream, and last the hash of the node's credential (checked against the record's: a
-- revoked node's beat changes nothing). Returns {1, drain_deadline, retarget, the state
-- before this beat, sessions whose lock another session took...}; {0} for a forgotten node,
-- {-1} for a credential that is not the node's.
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
if redis.call('HGET', KEYS[1], 'cred') ~= ARGV[#ARGV] then return {-1} end
local n, m = tonumber(ARGV[9]), tonumber(ARGV[10])
local flags = redis.call('HMGET', KEYS[1], 'drain_deadline', 'retarget', 'state', 'model',
                         'region')
local pending = flags[2] and string.sub(flags[2], 1, #ARGV[8] + 1) ~= ARGV[8] .. ':'
if flags[2] and not pending then
  redis.call('HDEL', KEYS[1], 'retarget', 'retired', 'idle_since')
  flags[2] = false
end
if pending then
  redis.call('HSET', KEYS[1], 'last_seen', ARGV[1])
else
  redis.call('HSET', KEYS[1], 'state', ARGV[2], 'progress', ARGV[3], 'eta_ready', ARGV[4],
             'ready_at', ARGV[5], 'last_seen', ARGV[1])
end
local mine = {}
for i = 1, n do
  mine[ARGV[9 + 2 * i]] = true
  redis.call('ZADD', KEYS[2], '+inf', ARGV[9 + 2 * i])
end
for _, sid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '+inf', '+inf')) do
  if not mine[sid] then redis.call('ZREM', KEYS[2], sid) end
end
local ttl = math.floor(tonumber(ARGV[6]) * 1000)
local out = {1, flags[1] or '', flags[2] or '', flags[3] or ''}
for i = 1, n do
  local lock, sid, fence = KEYS[3 + i], ARGV[9 + 2 * i], ARGV[10 + 2 * i]
  local cur = redis.call('HMGET', lock, 'session', 'fence')
  local mine_now = cur[1] == sid and cur[2] == fence
  if cur[1] and not mine_now and tonumber(cur[2] or 0) >= tonumber(fence) then
    -- taken over (another session, or a newer connection of this one): close this stream
    table.insert(out, sid)
  else
    -- ours; or expired while the node could not report; or held under an older fence
    -- (a lock re-created from a stale report): the newer fence wins
    redis.call('HSET', lock, 'session', sid, 'fence', fence, 'node', ARGV[7])
    redis.call('PEXPIRE', lock, ttl)
  end
end
local base = 10 + 2 * n
for j = 1, m do
  local key = KEYS[3 + n + j]
  -- the counter names what the control plane knows of the node, never the node's word
  local field = ARGV[base + 3 * j - 2] .. '|' .. ARGV[7] .. '|' .. (flags[4] or '') .. '|'
                .. (flags[5] or '')
  local secs, minute = ARGV[base + 3 * j - 1], ARGV[base + 3 * j]
  local cur = tonumber(redis.call('HGET', key, field) or 0)
  if tonumber(secs) > cur then   -- grew: dirty until settled, and kept until then
    redis.call('HSET', key, field, secs)
    redis.call('PERSIST', key)
    redis.call('ZADD', KEYS[3], minute, minute)
  end
end
base = base + 3 * m
for k = 1, #KEYS - 3 - n - m do
  local lock, sid = KEYS[3 + n + m + k], ARGV[base + k]
  -- not when the session streams on another node now (a planned move, make-before-break:
  -- the old connection closes after the new one took the lock)
  local h = redis.call('HMGET', lock, 'session', 'node')
  if not mine[sid] and h[1] == sid and (not h[2] or h[2] == ARGV[7]) then
    redis.call('DEL', lock)
  end
end
return out
