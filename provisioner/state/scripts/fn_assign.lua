-- requires: has_room
-- Hand waiting sessions, oldest first, to candidates with room (re-checked here, so a stale
-- order is harmless). Node hash + slot zset per candidate from KEYS[first]; their ids from
-- ARGV[first_id]. Returns the number assigned.
local function assign(queue, assigned, first, first_id, now, expiry, timeout)
  local n = 0
  while true do
    local head = redis.call('ZRANGE', queue, 0, 0)[1]
    if not head then return n end
    local placed = false
    for i = first, #KEYS, 2 do
      if has_room(KEYS[i], KEYS[i + 1], now, timeout) then
        redis.call('ZADD', KEYS[i + 1], expiry, head)
        redis.call('ZREM', queue, head)
        redis.call('HSET', assigned, head, ARGV[first_id + (i - first) / 2])
        n = n + 1
        placed = true
        break
      end
    end
    if not placed then return n end
  end
end
