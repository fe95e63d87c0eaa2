-- A node can take a session when it is ready, alive, not draining or retired, not reported
-- lost by a client since its last heartbeat, and has room. Expired reservations (tickets
-- never used) are dropped first.
local function has_room(node_key, slots_key, now, timeout)
  local n = redis.call('HMGET', node_key, 'state', 'capacity', 'last_seen', 'drain_deadline',
                       'retired', 'lost_at')
  if n[1] ~= 'ready' or (n[4] and n[4] ~= '') or n[5] then return false end
  local seen = tonumber(n[3] or 0)
  if seen < now - timeout or (n[6] and tonumber(n[6]) > seen) then return false end
  redis.call('ZREMRANGEBYSCORE', slots_key, '-inf', '(' .. now)
  return redis.call('ZCARD', slots_key) < tonumber(n[2])
end
