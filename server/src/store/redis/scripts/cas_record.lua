-- Compare-and-set of one user's record, keeping the node index in step in
-- the same atomic step, so that no crash can leave a session the index does
-- not know about. Every key is in the user's slot (see keys.rs).
--
-- KEYS[1]             the user's record hash presence:{u:<user>}
-- KEYS[2 .. 1+n]      node index sets the user must be in (one per node
--                     holding a session in the new record)
-- KEYS[2+n ..]        node index sets the user must leave
-- ARGV[1]             the revision the caller read ("0": no record)
-- ARGV[2]             the new record, serialized ("": delete the record)
-- ARGV[3]             the user id, the member of the index sets
-- ARGV[4]             n
-- ARGV[5]             expiry in ms for the new record ("0": none)
--
-- Returns {1, new revision, ""} when written, or {0, current revision,
-- current record} when the revision moved, so the caller can retry without
-- reading again.
local current = redis.call('HMGET', KEYS[1], 'r', 'd')
local revision = tonumber(current[1]) or 0
if revision ~= tonumber(ARGV[1]) then
  return {0, revision, current[2] or ''}
end

local written = 0
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  written = revision + 1
  redis.call('HSET', KEYS[1], 'r', written, 'd', ARGV[2])
  if ARGV[5] == '0' then
    redis.call('PERSIST', KEYS[1])
  else
    redis.call('PEXPIRE', KEYS[1], ARGV[5])
  end
end

-- Adding to every index the record needs (not only to new ones) repairs an
-- index entry lost by a failover at no extra round trip.
local n = tonumber(ARGV[4])
for i = 2, 1 + n do
  redis.call('SADD', KEYS[i], ARGV[3])
end
for i = 2 + n, #KEYS do
  redis.call('SREM', KEYS[i], ARGV[3])
end
return {1, written, ''}
