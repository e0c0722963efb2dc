// An in-memory PresenceService for the unit tests: each test supplies the
// handlers it needs; calls go through connect-es' router transport, so the
// client under test runs its real code down to the wire format.
import { Code, ConnectError, type ServiceImpl, createRouterTransport } from "@connectrpc/connect";
import { create } from "@bufbuild/protobuf";
import { PresenceSchema, PresenceService, VisibleStatus } from "../src/gen/presence/v1/presence_pb.js";
import { createPresenceClient, type PresenceClient, type PresenceClientOptions } from "../src/index.js";

export type FakeService = Partial<ServiceImpl<typeof PresenceService>>;

/** A client talking to `service` in memory. */
export function fakeClient(service: FakeService, options: Partial<PresenceClientOptions> = {}): PresenceClient {
  const unimplemented = () => {
    throw new ConnectError("not in this fake", Code.Unimplemented);
  };
  return createPresenceClient({
    baseUrl: "http://fake.invalid",
    token: "test-token",
    session: false,
    disconnectOnPagehide: false,
    backoff: { initialMs: 5, maxMs: 20 },
    transport: ({ interceptors }) =>
      createRouterTransport(
        ({ service: register }) =>
          register(PresenceService, {
            touch: unimplemented,
            disconnect: unimplemented,
            setStatus: unimplemented,
            getPresence: unimplemented,
            getHistory: unimplemented,
            heartbeat: unimplemented,
            watchContacts: unimplemented,
            ...service,
          }),
        { transport: { interceptors } },
      ),
    ...options,
  });
}

/** A presence event for `userId` at `version`. */
export function presenceEvent(userId: string, version: number, status = VisibleStatus.ONLINE) {
  return {
    event: {
      case: "presence" as const,
      value: create(PresenceSchema, { userId, version: BigInt(version), status }),
    },
  };
}

export function snapshotComplete(watched: number) {
  return { event: { case: "snapshotComplete" as const, value: { watched } } };
}

/** Resolves when `predicate` holds, polling every few milliseconds; rejects after `timeoutMs`. */
export async function eventually(predicate: () => boolean, timeoutMs = 2000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error("condition not met in time");
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

/** A Web Locks stand-in: exclusive locks granted in request order, released when the callback settles. */
export class FakeLocks {
  private readonly queues = new Map<string, Array<() => void>>();

  request(name: string, options: { signal?: AbortSignal }, callback: () => Promise<void>): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const queue = this.queues.get(name) ?? [];
      this.queues.set(name, queue);
      const grant = () => {
        options.signal?.removeEventListener("abort", abort);
        callback()
          .then(resolve, reject)
          .finally(() => {
            queue.shift();
            queue[0]?.();
          });
      };
      const abort = () => {
        const index = queue.indexOf(grant);
        if (index > 0) queue.splice(index, 1);
        reject(new DOMException("aborted", "AbortError"));
      };
      options.signal?.addEventListener("abort", abort);
      queue.push(grant);
      if (queue.length === 1) grant();
    });
  }
}
