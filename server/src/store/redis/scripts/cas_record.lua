-- Compare-and-set of one user's record, keeping the node index in step and,
-- when what contacts see changed, appending the change to the partition's
-- log and publishing it on the partition's channel, all in one atomic step:
-- no crash can leave a session the index does not know about (a ghost), or a
-- change written but not logged, or logged but not written. Every key and the
-- channel are in the user's partition's slot (see keys.rs).
--
-- KEYS[1]             the user's record hash
-- KEYS[2]             the partition's change log (a stream)
-- KEYS[3 .. 2+n]      node index sets the user must be in (one per node
--                     holding a session in the new record)
-- KEYS[3+n ..]        node index sets the user must leave
-- ARGV[1]             the revision the caller read ("0": no record)
-- ARGV[2]             the new record, serialized ("": delete the record)
-- ARGV[3]             the user id, the member of the index sets
-- ARGV[4]             n
-- ARGV[5]             expiry in ms for the new record ("0": none)
-- ARGV[6]             "1" if what contacts see changed: log and publish
-- ARGV[7]             the partition's fan-out channel
-- ARGV[8]             the fan-out message's header; the record follows it
-- ARGV[9]             the log's retention horizon: entries with older ids go
--                     (approximately, a whole node of the stream at a time)
-- ARGV[10 ..]         records to log before the new one, oldest first: the
--                     steps of a replay of several changes, each an event
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
for i = 3, 2 + n do
  redis.call('SADD', KEYS[i], ARGV[3])
end
for i = 3 + n, #KEYS do
  redis.call('SREM', KEYS[i], ARGV[3])
end

if ARGV[6] == '1' then
  for i = 10, #ARGV do
    redis.call('XADD', KEYS[2], 'MINID', '~', ARGV[9], '*', 'u', ARGV[3], 'd', ARGV[i])
  end
  redis.call('XADD', KEYS[2], 'MINID', '~', ARGV[9], '*', 'u', ARGV[3], 'd', ARGV[2])
  redis.call('SPUBLISH', ARGV[7], ARGV[8] .. ARGV[2])
end
return {1, written, ''}
