-- Adds one user to a contact's set: the other half of a link.
--
-- KEYS[1]  the contact's set
-- ARGV[1]  the user
-- ARGV[2]  the most contacts a user may have
--
-- Returns 1 if linked now, 0 if it already was, -1 if the contact's set is full.
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then
  return 0
end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return -1
end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
