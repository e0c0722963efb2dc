// The SDK against a real presence-server, from Node: over gRPC-web (the
// default transport, as in browsers) and over native gRPC (connect-node).
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { Code, type PresenceError, createPresenceClient } from "../../src/index.js";
import { type ServerProcess, addContacts, mintToken, startServer, uniqueUser, waitFor } from "../harness.js";

let server: ServerProcess;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.stop();
});

test("two users see each other's changes within 2 s", async () => {
  const alice = uniqueUser("alice");
  const bob = uniqueUser("bob");
  await addContacts(server.baseUrl, alice, [bob]);
  const aliceClient = createPresenceClient({ baseUrl: server.baseUrl, token: mintToken(alice) });
  // Bob speaks native gRPC over HTTP/2, as a Node service would.
  const bobClient = createPresenceClient({
    baseUrl: server.baseUrl,
    token: () => mintToken(bob),
    transport: (options) => createGrpcTransport(options),
  });
  try {
    const aliceWatch = aliceClient.watchContacts();
    const bobWatch = bobClient.watchContacts();
    await Promise.all([aliceWatch.synced(), bobWatch.synced()]);
    await waitFor(() => (aliceWatch.get(bob)?.status === "online" ? true : undefined), 2000, "alice sees bob online");
    await waitFor(() => (bobWatch.get(alice)?.status === "online" ? true : undefined), 2000, "bob sees alice online");

    const changes: Array<[() => Promise<unknown>, string, string]> = [
      [() => bobClient.setStatus("busy", "in a meeting"), "busy", "in a meeting"],
      [() => bobClient.setStatus("online"), "online", ""],
      [() => bobClient.setActivity("idle"), "idle", ""],
      [() => bobClient.setStatus("invisible"), "offline", ""],
    ];
    for (const [change, status, message] of changes) {
      const started = Date.now();
      await change();
      const seen = await waitFor(
        () => {
          const presence = aliceWatch.get(bob);
          return presence?.status === status && presence.customMessage === message ? presence : undefined;
        },
        2000,
        `alice sees bob ${status}`,
      );
      assert.ok(Date.now() - started < 2000);
      if (status === "offline") assert.equal(seen.offlineReason, "logout", "invisible looks like a logout to contacts");
    }

    await bobClient.setStatus("online");
    await bobClient.close();
    const gone = await waitFor(
      () => (aliceWatch.get(bob)?.status === "offline" ? aliceWatch.get(bob) : undefined),
      2000,
      "alice sees bob log out",
    );
    assert.equal(gone.offlineReason, "logout");
    assert.ok(gone.lastSeen instanceof Date && Date.now() - gone.lastSeen.getTime() < 5000);

    const [presence] = await aliceClient.getPresence([bob]);
    assert.equal(presence?.status, "offline");
    const pages = [];
    for await (const page of aliceClient.history(bob, { pageSize: 2 })) pages.push(page);
    const statuses = pages.flat().map((entry) => entry.status);
    assert.ok(pages.length >= 2, "paged");
    assert.deepEqual(statuses.slice(0, 2), ["online", "busy"]);
    assert.equal(statuses.at(-1), "offline");
  } finally {
    await Promise.all([aliceClient.close(), bobClient.close()]);
  }
});

async function rejectsWith(call: Promise<unknown>, code: Code): Promise<void> {
  await assert.rejects(call, (error: PresenceError) => {
    assert.equal(error.name, "PresenceError");
    assert.equal(Code[error.code], Code[code]);
    return true;
  });
}

test("a bad token, a forbidden call and an oversized batch are typed errors", async () => {
  const carol = uniqueUser("carol");
  const forged = createPresenceClient({ baseUrl: server.baseUrl, token: "not-a-jwt", session: false });
  await rejectsWith(forged.getPresence([carol]), Code.Unauthenticated);
  const watch = forged.watchContacts();
  await rejectsWith(watch.synced(), Code.Unauthenticated);
  assert.equal(watch.state, "closed");
  await forged.close();

  const client = createPresenceClient({ baseUrl: server.baseUrl, token: mintToken(carol), session: false });
  // Carol has no contacts: a stranger's history is forbidden.
  await rejectsWith(client.history(uniqueUser("stranger"))[Symbol.asyncIterator]().next(), Code.PermissionDenied);
  const tooMany = Array.from({ length: 101 }, (_, i) => `user-${i}`);
  await rejectsWith(client.getPresence(tooMany), Code.InvalidArgument);
  await client.close();
});

test("an expired token is replaced by asking the token function again", async () => {
  const dave = uniqueUser("dave");
  let issued = 0;
  const client = createPresenceClient({
    baseUrl: server.baseUrl,
    session: false,
    token: () => mintToken(dave, { ttlSeconds: ++issued === 1 ? -60 : 3600 }),
  });
  const [presence] = await client.getPresence([dave]);
  assert.equal(presence?.userId, dave);
  assert.equal(issued, 2);
  await client.close();
});
