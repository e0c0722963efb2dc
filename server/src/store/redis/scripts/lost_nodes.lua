-- Finds the registered nodes whose lease ran out, and claims each for the
-- caller unless another store instance holds a live claim on it, so that one
-- node reclaims a lost node instead of all of them at once. A claimant that
-- dies lets its claim expire and another one takes over.
--
-- KEYS[1 .. n]     the leases of the registered nodes
-- KEYS[n+1 .. 2n]  the claims on the same nodes, in the same order
-- ARGV[1]          the caller's instance id
-- ARGV[2]          how long a claim lasts, in ms
--
-- Returns the 1-based positions of the nodes the caller should reclaim.
local n = #KEYS / 2
local lost = {}
for i = 1, n do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    local claimant = redis.call('GET', KEYS[n + i])
    if not claimant or claimant == ARGV[1] then
      redis.call('SET', KEYS[n + i], ARGV[1], 'PX', ARGV[2])
      lost[#lost + 1] = i
    end
  end
end
return lost
