import assert from "node:assert/strict";
import { test } from "node:test";
import { ContactMap } from "./contact-map.js";
import type { Presence } from "./presence.js";

function presence(userId: string, version: number): Presence {
  return {
    userId,
    status: "online",
    customMessage: "",
    lastSeen: undefined,
    version: BigInt(version),
    offlineReason: undefined,
    chosenStatus: undefined,
  };
}

test("the contact map drops presence not newer than what it holds", () => {
  const map = new ContactMap();
  assert.ok(map.apply({ type: "presence", presence: presence("bob", 5) }));
  assert.equal(map.apply({ type: "presence", presence: presence("bob", 5) }), undefined);
  assert.equal(map.apply({ type: "presence", presence: presence("bob", 4) }), undefined);
  assert.ok(map.apply({ type: "presence", presence: presence("bob", 6) }));
  assert.equal(map.contacts.get("bob")?.version, 6n);
});

test("a removal is reported once, and only for a contact held", () => {
  const map = new ContactMap();
  map.apply({ type: "presence", presence: presence("bob", 1) });
  assert.deepEqual(map.apply({ type: "removed", userId: "bob" }), { type: "removed", userId: "bob" });
  assert.equal(map.apply({ type: "removed", userId: "bob" }), undefined);
  assert.equal(map.contacts.size, 0);
});

test("the first sync is the snapshot, later ones are resumes; known versions are what the map holds", () => {
  const map = new ContactMap();
  map.apply({ type: "presence", presence: presence("bob", 3) });
  map.apply({ type: "presence", presence: presence("carol", 9) });
  assert.deepEqual(map.apply({ type: "synced", watched: 2 }), { type: "synced", watched: 2, resumed: false });
  assert.deepEqual(map.apply({ type: "synced", watched: 2 }), { type: "synced", watched: 2, resumed: true });
  assert.deepEqual(map.knownVersions(), { bob: 3n, carol: 9n });
});
