import assert from "node:assert/strict";
import { afterEach, test } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import { FakeLocks, eventually, fakeClient, presenceEvent, snapshotComplete } from "../test/fake-server.js";
import { Activity, type WatchContactsRequest } from "./gen/presence/v1/presence_pb.js";
import type { PresenceError, WatchUpdate } from "./index.js";

function versions(updates: WatchUpdate[]): string[] {
  return updates.map((update) =>
    update.type === "presence"
      ? `${update.presence.userId}@${update.presence.version}`
      : update.type === "synced"
        ? `synced${update.resumed ? " (resumed)" : ""}`
        : `removed ${update.userId}`,
  );
}

const globals = globalThis as { navigator?: unknown };
afterEach(() => {
  delete globals.navigator;
});

test("a broken watch reconnects and resumes with known_versions, repeating nothing", async () => {
  const requests: WatchContactsRequest[] = [];
  const client = fakeClient({
    async *watchContacts(request) {
      requests.push(request);
      if (requests.length === 1) {
        yield presenceEvent("bob", 1);
        yield snapshotComplete(1);
        throw new ConnectError("node restarting", Code.Unavailable);
      }
      // The server may repeat what the client holds; the SDK must drop it.
      yield presenceEvent("bob", 1);
      yield presenceEvent("bob", 2);
      yield snapshotComplete(1);
      await new Promise(() => {});
    },
  });
  const watch = client.watchContacts();
  const updates: WatchUpdate[] = [];
  const states: string[] = [];
  watch.subscribe((update) => updates.push(update));
  watch.onStateChange((change) => states.push(change.state));
  await eventually(() => updates.length === 4);
  assert.deepEqual(versions(updates), ["bob@1", "synced", "bob@2", "synced (resumed)"]);
  assert.deepEqual(requests[1]?.knownVersions, { bob: 1n });
  assert.deepEqual(states, ["connected", "reconnecting", "connected"]);
  assert.equal(watch.get("bob")?.version, 2n);
  await client.close();
  assert.equal(watch.state, "closed");
});

test("the watch is an async iterable that ends on close", async () => {
  const client = fakeClient({
    async *watchContacts() {
      yield presenceEvent("bob", 1);
      yield presenceEvent("carol", 1);
      yield snapshotComplete(2);
      await new Promise(() => {});
    },
  });
  const watch = client.watchContacts();
  const seen: WatchUpdate[] = [];
  for await (const update of watch) {
    seen.push(update);
    if (update.type === "synced") watch.close();
  }
  assert.deepEqual(versions(seen), ["bob@1", "carol@1", "synced"]);
});

test("a rejected token is refreshed once; rejected again, the watch closes with UNAUTHENTICATED", async () => {
  let tokensIssued = 0;
  const client = fakeClient(
    {
      async *watchContacts() {
        throw new ConnectError("token expired", Code.Unauthenticated);
      },
    },
    { token: async () => `token-${++tokensIssued}` },
  );
  const watch = client.watchContacts();
  await assert.rejects(watch.synced(), (error: PresenceError) => error.code === Code.Unauthenticated);
  assert.equal(watch.state, "closed");
  assert.equal(tokensIssued, 2);
});

test("a unary call rejected as UNAUTHENTICATED is retried with a fresh token", async () => {
  const seenTokens: string[] = [];
  let issued = 0;
  const client = fakeClient(
    {
      getPresence(_request, context) {
        const token = context.requestHeader.get("authorization") ?? "";
        seenTokens.push(token);
        if (token === "Bearer old-1") throw new ConnectError("expired", Code.Unauthenticated);
        return { presences: [] };
      },
    },
    { token: () => `old-${++issued}` },
  );
  await client.getPresence(["bob"]);
  assert.deepEqual(seenTokens, ["Bearer old-1", "Bearer old-2"]);
});

test("errors surface as PresenceError with the gRPC code and the server's message", async () => {
  const client = fakeClient({
    getPresence() {
      throw new ConnectError("at most 100 user ids", Code.InvalidArgument);
    },
  });
  await assert.rejects(client.getPresence(["x"]), (error: PresenceError) => {
    assert.equal(error.name, "PresenceError");
    assert.equal(error.code, Code.InvalidArgument);
    assert.equal(error.message, "at most 100 user ids");
    return true;
  });
});

test("Touch heartbeats at the interval the server returns; close disconnects and stops them", async () => {
  const touches: Activity[] = [];
  const disconnects: string[] = [];
  const client = fakeClient(
    {
      touch(request) {
        touches.push(request.activity);
        return { heartbeatIntervalMs: 100, leaseMs: 300 };
      },
      disconnect(request) {
        disconnects.push(request.deviceId);
        return {};
      },
    },
    { session: true, deviceId: "tab-1" },
  );
  await eventually(() => touches.length >= 4);
  await client.setActivity("idle");
  assert.equal(touches.at(-1), Activity.IDLE);
  await client.close();
  const after = touches.length;
  await new Promise((resolve) => setTimeout(resolve, 60));
  assert.equal(touches.length, after);
  assert.deepEqual(disconnects, ["tab-1"]);
});

test("a failing Touch is retried with backoff and reported", async () => {
  let calls = 0;
  const errors: PresenceError[] = [];
  const client = fakeClient(
    {
      touch() {
        calls += 1;
        if (calls < 3) throw new ConnectError("backend down", Code.Unavailable);
        return { heartbeatIntervalMs: 10_000, leaseMs: 30_000 };
      },
      disconnect: () => ({}),
    },
    { session: true, onSessionError: (error) => errors.push(error) },
  );
  await eventually(() => calls === 3);
  assert.deepEqual(
    errors.map((error) => error.code),
    [Code.Unavailable, Code.Unavailable],
  );
  await client.close();
});

test("tabs share one stream; when the leading tab closes, the next resumes from what it followed", async () => {
  globals.navigator = { locks: new FakeLocks() };
  const requests: WatchContactsRequest[] = [];
  const service = {
    async *watchContacts(request: WatchContactsRequest) {
      requests.push(request);
      yield presenceEvent("bob", requests.length);
      yield snapshotComplete(1);
      await new Promise(() => {});
    },
  };
  const token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.sig"; // sub: alice
  const tabs = [1, 2, 3].map(() => fakeClient(service, { token }));
  const watches = tabs.map((tab) => tab.watchContacts());
  await Promise.all(watches.map((watch) => watch.synced()));
  assert.equal(requests.length, 1);
  assert.ok(watches.every((watch) => watch.get("bob")?.version === 1n));

  await tabs[0]?.close();
  await eventually(() => watches[1]?.get("bob")?.version === 2n && watches[2]?.get("bob")?.version === 2n);
  assert.equal(requests.length, 2);
  assert.deepEqual(requests[1]?.knownVersions, { bob: 1n });
  await Promise.all(tabs.map((tab) => tab.close()));
});

test("tabs following another tab's stream see its reconnects, with the error's code", async () => {
  globals.navigator = { locks: new FakeLocks() };
  let calls = 0;
  const service = {
    async *watchContacts() {
      calls += 1;
      yield snapshotComplete(0);
      if (calls === 1) throw new ConnectError("draining", Code.Unavailable);
      await new Promise(() => {});
    },
  };
  const [leader, follower] = [fakeClient(service), fakeClient(service)];
  const leaderWatch = leader.watchContacts();
  await leaderWatch.synced();
  const followerWatch = follower.watchContacts();
  const seen: Array<[string, Code | undefined]> = [];
  followerWatch.onStateChange(({ state, error }) => seen.push([state, error?.code]));
  await eventually(() => calls === 2 && followerWatch.state === "connected");
  const reconnecting = seen.find(([state]) => state === "reconnecting");
  assert.deepEqual(reconnecting, ["reconnecting", Code.Unavailable]);
  await Promise.all([leader.close(), follower.close()]);
});

test("an async iterator that falls behind gets the latest presence per contact", async () => {
  const client = fakeClient({
    async *watchContacts() {
      yield presenceEvent("bob", 1);
      yield presenceEvent("carol", 1);
      yield presenceEvent("bob", 2);
      yield presenceEvent("bob", 3);
      yield snapshotComplete(2);
      await new Promise(() => {});
    },
  });
  const watch = client.watchContacts();
  const iterator = watch[Symbol.asyncIterator]();
  await watch.synced();
  const seen: WatchUpdate[] = [];
  for (let i = 0; i < 3; i++) seen.push((await iterator.next()).value as WatchUpdate);
  assert.deepEqual(versions(seen), ["carol@1", "bob@3", "synced"]);
  await client.close();
  assert.equal((await iterator.next()).done, true);
});
