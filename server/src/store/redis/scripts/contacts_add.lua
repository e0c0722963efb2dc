-- Adds contacts to one user's set, all or none, within the limit.
--
-- KEYS[1]      the user's contact set
-- ARGV[1]      the most contacts a user may have
-- ARGV[2 ..]   the contacts to add (distinct, never the user itself)
--
-- Returns {1, {added...}} with the contacts that were not linked yet, or
-- {0, {}} (and changes nothing) if they would take the set past the limit.
local added = {}
for i = 2, #ARGV do
  if redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 0 then
    added[#added + 1] = ARGV[i]
  end
end
if #added == 0 then
  return {1, {}}
end
if redis.call('SCARD', KEYS[1]) + #added > tonumber(ARGV[1]) then
  return {0, {}}
end
redis.call('SADD', KEYS[1], unpack(added))
return {1, added}
