-- Update a pool's arrival-rate EWMA (time constant tau_s).
local function arrive(key, now, tau)
  local h = redis.call('HMGET', key, 'rate', 't')
  local rate, t = tonumber(h[1] or 0), tonumber(h[2] or now)
  rate = rate * math.exp(-math.max(0, now - t) / tau) + 1 / tau
  redis.call('HSET', key, 'rate', rate, 't', now)
  return rate
end
