-- A client reports its stream on this node lost (a lobby `resume`): unless the node has
-- heartbeated since `now`, it takes no session until it does (fn_has_room compares
-- last_seen with lost_at), for this user and every other. A node forgotten meanwhile is
-- not re-created. KEYS: node hash. ARGV: now. Returns 1 if marked.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'last_seen') or 0) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'lost_at', ARGV[1])
return 1
