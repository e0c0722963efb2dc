-- Renews a node's lease, registering the node if needed.
--
-- KEYS[1]  the node registry hash
-- KEYS[2]  the node's lease
-- KEYS[3]  the claim on the node, if another node was reclaiming it
-- ARGV[1]  the node id
-- ARGV[2]  the lease in ms
-- ARGV[3]  "1" if the caller registered this node before, else "0"
-- ARGV[4]  now, Unix ms (kept for operators: registry = first seen,
--          lease = last renewed)
--
-- Returns 1 if the store still knew the node alive, 0 if it had lost it (the
-- lease ran out, or the data was lost) although the caller had registered it.
local registered = redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1
local known = registered and redis.call('EXISTS', KEYS[2]) == 1
if not registered then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
end
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[2])
-- The node is back: whoever was reclaiming it stops being the claimant.
redis.call('DEL', KEYS[3])
if known or ARGV[3] == '0' then
  return 1
end
return 0
