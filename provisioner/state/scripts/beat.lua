-- A node's heartbeat in one step: its health, its live slots, its users' locks, its usage,
-- and the locks of streams that closed since (released if still theirs, so the user may
-- start again at once). Refused (returns {0}) for a node the control plane forgot. While a
-- retarget is pending and the node does not serve the new model yet, its old state is not
-- written (the record already says LOADING for the new model).
-- A node is not trusted: every stream, counter and close it reports must be of a session
-- the control plane placed on it (the placed hash: session -> "user|fence|placed_at"),
-- with at most the fence issued, and usage only for minutes from a minute before its
-- placement to a minute ahead of now. Anything else is dropped and counted on the node
-- (dropped, dropped_why); past the lie limit the node is drained at once and marked
-- suspect (its own users move; nothing it says reaches anyone else).
-- KEYS: node hash, slot zset, vc:usage-dirty, then one lock per live stream, one usage
-- hash per counter, one lock per closed stream, and last the node's placed hash.
-- ARGV: now, state, progress, eta_ready, ready_at, lock ttl_s, node id, serving
-- "model:version", number of streams n, number of counters m, then user, session and
-- fence per live stream, "user|session:conn", seconds, minute per counter (the field
-- becomes "user|session:conn|node|model|region" from the node's record), user and session
-- per closed stream, then its clock's offset (s, the control plane's minus its own), the
-- usage slack s, the lie limit, and last the hash of the node's
-- credential (checked against the record's: a revoked node's beat changes nothing).
-- Returns {1, drain_deadline, retarget, the state before this beat, reports dropped now,
-- sessions whose lock another session took...}; {0} for a forgotten node, {-1} for a
-- credential that is not the node's.
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
if redis.call('HGET', KEYS[1], 'cred') ~= ARGV[#ARGV] then return {-1} end
local now, n, m = tonumber(ARGV[1]), tonumber(ARGV[9]), tonumber(ARGV[10])
local slack, limit = tonumber(ARGV[#ARGV - 2]), tonumber(ARGV[#ARGV - 1])
local clock_off = ARGV[#ARGV - 3]
local placed = KEYS[#KEYS]
local dropped, why = 0, nil

-- the placement of `sid` on this node for `user`: its fence and time, or nil
local function placement(user, sid)
  local raw = redis.call('HGET', placed, sid)
  if not raw then return nil end
  local u, f, at = string.match(raw, '^(.*)|(%d+)|([%d.e+]+)$')
  if u ~= user then return nil end
  return tonumber(f), tonumber(at)
end
local function drop(reason)
  dropped = dropped + 1
  why = reason
end

local flags = redis.call('HMGET', KEYS[1], 'drain_deadline', 'retarget', 'state', 'model',
                         'region')
local pending = flags[2] and string.sub(flags[2], 1, #ARGV[8] + 1) ~= ARGV[8] .. ':'
if flags[2] and not pending then
  redis.call('HDEL', KEYS[1], 'retarget', 'retired', 'idle_since')
  flags[2] = false
end
if pending then
  redis.call('HSET', KEYS[1], 'last_seen', ARGV[1], 'clock_off', clock_off)
else
  redis.call('HSET', KEYS[1], 'state', ARGV[2], 'progress', ARGV[3], 'eta_ready', ARGV[4],
             'ready_at', ARGV[5], 'last_seen', ARGV[1], 'clock_off', clock_off)
end
local ttl = math.floor(tonumber(ARGV[6]) * 1000)
local lost = {}
local mine = {}
for i = 1, n do
  local lock = KEYS[3 + i]
  local user, sid, fence = ARGV[8 + 3 * i], ARGV[9 + 3 * i], ARGV[10 + 3 * i]
  local issued = placement(user, sid)
  if not issued or tonumber(fence) > issued then
    drop('stream ' .. sid .. ' of ' .. user .. ' (fence ' .. fence .. ') was not placed here')
  else
    mine[sid] = true
    redis.call('ZADD', KEYS[2], '+inf', sid)
    local cur = redis.call('HMGET', lock, 'session', 'fence')
    local mine_now = cur[1] == sid and cur[2] == fence
    if cur[1] and not mine_now and tonumber(cur[2] or 0) >= tonumber(fence) then
      -- taken over (another session, or a newer connection of this one): close this stream
      table.insert(lost, sid)
    else
      -- ours; or expired while the node could not report; or held under an older fence
      -- (a lock re-created from a stale report): the newer fence wins
      redis.call('HSET', lock, 'session', sid, 'fence', fence, 'node', ARGV[7])
      redis.call('PEXPIRE', lock, ttl)
    end
  end
end
for _, sid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '+inf', '+inf')) do
  if not mine[sid] then redis.call('ZREM', KEYS[2], sid) end
end
local base = 10 + 3 * n
for j = 1, m do
  local key = KEYS[3 + n + j]
  local counter, secs, minute = ARGV[base + 3 * j - 2], ARGV[base + 3 * j - 1],
                                ARGV[base + 3 * j]
  local user, sid = string.match(counter, '^([^|]+)|([^|:]+):')
  local _, at = placement(user or '', sid or '')
  minute = tonumber(minute)
  if not at or minute < math.floor(at / 60) * 60 - slack or minute > now + slack then
    drop('usage of ' .. counter .. ' in minute ' .. minute .. ' is not of a session '
         .. 'placed here, in its time')
  else
    -- the counter names what the control plane knows of the node, never the node's word
    local field = counter .. '|' .. ARGV[7] .. '|' .. (flags[4] or '') .. '|' .. (flags[5] or '')
    local cur = tonumber(redis.call('HGET', key, field) or 0)
    if tonumber(secs) > cur then   -- grew: dirty until settled, and kept until then
      redis.call('HSET', key, field, secs)
      redis.call('PERSIST', key)
      redis.call('ZADD', KEYS[3], minute, minute)
    end
  end
end
base = base + 3 * m
for k = 1, #KEYS - 4 - n - m do
  local lock, user, sid = KEYS[3 + n + m + k], ARGV[base + 2 * k - 1], ARGV[base + 2 * k]
  -- not when the session streams on another node now (a planned move, make-before-break:
  -- the old connection closes after the new one took the lock), nor when a resume holds it
  -- and waits for a node (its lock names none yet)
  if not placement(user, sid) then
    drop('close of ' .. sid .. ' of ' .. user .. ', never placed here')
  else
    local h = redis.call('HMGET', lock, 'session', 'node')
    if not mine[sid] and h[1] == sid and h[2] == ARGV[7] then
      redis.call('DEL', lock)
    end
  end
end
if dropped > 0 then
  local total = redis.call('HINCRBY', KEYS[1], 'dropped', dropped)
  redis.call('HSET', KEYS[1], 'dropped_why', why)
  if total >= limit and not redis.call('HGET', KEYS[1], 'suspect') then
    -- it keeps lying: no new sessions, its users move now, an operator looks
    redis.call('HSET', KEYS[1], 'suspect', total .. ' reports dropped; last: ' .. why,
               'drain_deadline', ARGV[1])
    flags[1] = ARGV[1]
  end
end
local out = {1, flags[1] or '', flags[2] or '', flags[3] or '', dropped}
for _, sid in ipairs(lost) do table.insert(out, sid) end
return out
