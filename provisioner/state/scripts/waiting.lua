-- How many sessions wait in each queue, and how many of them count as demand (those not
-- marked in vc:unscaled: anonymous users, when their demand does not scale).
-- KEYS: vc:unscaled, then one queue per pool. Returns {waiting, scaling} per queue.
local out = {}
local marked = redis.call('ZCARD', KEYS[1])
for i = 2, #KEYS do
  local waiting = redis.call('ZCARD', KEYS[i])
  local unscaled = 0
  if marked > 0 and waiting > 0 then
    unscaled = #redis.call('ZINTER', 2, KEYS[i], KEYS[1])
  end
  out[#out + 1] = waiting
  out[#out + 1] = waiting - unscaled
end
return out
