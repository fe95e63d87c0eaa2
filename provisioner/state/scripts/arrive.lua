-- requires: arrive
-- KEYS: arrivals hash. ARGV: now, tau_s.
return tostring(arrive(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])))
