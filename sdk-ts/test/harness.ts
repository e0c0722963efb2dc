// Real components for the integration and browser tests: a presence-server
// process per test file, dev tokens minted the way the server verifies them,
// and the admin calls that set up contacts.
import { type ChildProcess, spawn } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { once } from "node:events";
import { connect, createServer } from "node:net";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { ContactsService } from "../src/gen/presence/v1/contacts_pb.js";

/** The sdk-ts directory (this file runs from .build/test/). */
export const packageDir = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const repoDir = resolve(packageDir, "..");

/** The server binary: PRESENCE_SERVER_BIN, or the workspace's debug build. */
export const serverBin = process.env.PRESENCE_SERVER_BIN || resolve(repoDir, "target/debug/presence-server");

/** The secret `--dev` servers verify tokens with. */
const devSecret = "presence-development-secret-never-use-in-production";

/** Short timers, so that tests about leases and grace take a second or two. */
const fastTimers = ["--lease", "2s", "--grace", "500ms", "--heartbeat-interval", "500ms", "--sweep-interval", "100ms"];

/** A port nobody listens on now (bound, then released). */
export async function freePort(): Promise<number> {
  const server = createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const address = server.address();
  server.close();
  if (address === null || typeof address === "string") throw new Error("no port");
  return address.port;
}

export interface ServerProcess {
  readonly baseUrl: string;
  readonly port: number;
  /** Stops the process (SIGTERM; SIGKILL if it lingers). */
  stop(): Promise<void>;
  /** Stops it and starts it again on the same port with the same flags. */
  restart(): Promise<void>;
}

/** Starts `presence-server --dev` on a free port, and waits until it accepts connections. */
export async function startServer(extraArgs: string[] = []): Promise<ServerProcess> {
  const port = await freePort();
  const args = ["--dev", "--listen", `127.0.0.1:${port}`, ...fastTimers, ...extraArgs];
  let child = await spawnServer(args, port);
  return {
    baseUrl: `http://127.0.0.1:${port}`,
    port,
    stop: () => stopProcess(child),
    async restart() {
      await stopProcess(child);
      child = await spawnServer(args, port);
    },
  };
}

async function spawnServer(args: string[], port: number): Promise<ChildProcess> {
  const child = spawn(serverBin, args, { stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, RUST_LOG: "warn" } });
  let stderr = "";
  child.stderr?.on("data", (chunk: Buffer) => {
    stderr = (stderr + chunk.toString()).slice(-4000);
  });
  const deadline = Date.now() + 15_000;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`${serverBin} exited: ${stderr}`);
    }
    if (await accepts(port)) return child;
    if (Date.now() > deadline) {
      child.kill("SIGKILL");
      throw new Error(`${serverBin} did not listen on ${port}: ${stderr}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

function accepts(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect(port, "127.0.0.1");
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}

async function stopProcess(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = once(child, "exit");
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), 3000);
  await exited;
  clearTimeout(timer);
}

/** An HS256 JWT as the `--dev` server expects: `sub`, `iat`, `exp`, optional admin scope. */
export function mintToken(userId: string, options: { admin?: boolean; ttlSeconds?: number } = {}): string {
  const now = Math.floor(Date.now() / 1000);
  const claims = {
    sub: userId,
    iat: now,
    exp: now + (options.ttlSeconds ?? 3600),
    ...(options.admin ? { scope: "presence.admin" } : {}),
  };
  const encode = (value: object) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const unsigned = `${encode({ alg: "HS256", typ: "JWT" })}.${encode(claims)}`;
  const signature = createHmac("sha256", devSecret).update(unsigned).digest("base64url");
  return `${unsigned}.${signature}`;
}

/** A user id no earlier run used (servers on a shared Redis Cluster remember users). */
export function uniqueUser(name: string): string {
  return `${name}-${randomBytes(4).toString("hex")}`;
}

/** Links `userId` with each of `contactIds`, as an internal service would (admin token, native gRPC). */
export async function addContacts(baseUrl: string, userId: string, contactIds: string[]): Promise<void> {
  const admin = createClient(
    ContactsService,
    createGrpcTransport({
      baseUrl,
      interceptors: [
        (next) => (request) => {
          request.header.set("authorization", `Bearer ${mintToken("test-admin", { admin: true })}`);
          return next(request);
        },
      ],
    }),
  );
  await admin.addContacts({ userId, contactIds });
}

/** Polls `probe` until it returns a value, or fails after `timeoutMs`. */
export async function waitFor<T>(probe: () => T | undefined, timeoutMs: number, what: string): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`not within ${timeoutMs} ms: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}
