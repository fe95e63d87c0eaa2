-- A node can take a session when it is ready, alive, not draining or retired, and has room.
-- Expired reservations (tickets never used) are dropped first.
local function has_room(node_key, slots_key, now, timeout)
  local n = redis.call('HMGET', node_key, 'state', 'capacity', 'last_seen', 'drain_deadline',
                       'retired')
  if n[1] ~= 'ready' or (n[4] and n[4] ~= '') or n[5] then return false end
  if tonumber(n[3] or 0) < now - timeout then return false end
  redis.call('ZREMRANGEBYSCORE', slots_key, '-inf', '(' .. now)
  return redis.call('ZCARD', slots_key) < tonumber(n[2])
end
