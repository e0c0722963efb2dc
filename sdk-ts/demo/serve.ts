// `make demo`: a presence-server on the embedded backends, a few demo users
// linked as contacts (some of them kept busy by bots), and a static server
// for the board page with a dev-only token endpoint.
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { once } from "node:events";
import { readFile } from "node:fs/promises";
import { createServer } from "node:http";
import { connect } from "node:net";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { ContactsService } from "../src/gen/presence/v1/contacts_pb.js";
import { type PresenceClient, createPresenceClient } from "../src/index.js";

const packageDir = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
export const demoUsers = ["alice", "bob", "carol", "dave", "erin", "frank"];

export interface DemoOptions {
  serverBin: string;
  /** Where presence-server listens. */
  presencePort: number;
  /** Where the board page is served. */
  pagePort: number;
  /** Leave out the server's log (tests). Default: false. */
  quiet?: boolean;
}

export interface Demo {
  /** The board, as alice. */
  url: string;
  stop(): Promise<void>;
}

export async function startDemo({ serverBin, presencePort, pagePort, quiet = false }: DemoOptions): Promise<Demo> {
  const baseUrl = `http://127.0.0.1:${presencePort}`;
  const server = spawn(serverBin, ["--dev", "--listen", `127.0.0.1:${presencePort}`], { stdio: quiet ? "ignore" : "inherit" });
  await listening(server, presencePort);

  const token = async (user: string, admin = false) => {
    const args = ["token", "--dev", "--user", user, "--ttl", "1h", ...(admin ? ["--admin"] : [])];
    const { stdout } = await promisify(execFile)(serverBin, args);
    return stdout.trim();
  };
  const adminToken = await token("demo-admin", true);
  const contacts = createClient(
    ContactsService,
    createGrpcTransport({
      baseUrl,
      interceptors: [(next) => (request) => (request.header.set("authorization", `Bearer ${adminToken}`), next(request))],
    }),
  );
  for (const user of demoUsers) {
    await contacts.addContacts({ userId: user, contactIds: demoUsers.filter((other) => other !== user) });
  }
  const bots = await startBots(baseUrl, token);

  const page = createServer((request, response) => {
    const url = new URL(request.url ?? "/", "http://localhost");
    void (async () => {
      try {
        if (url.pathname === "/token") {
          // Dev only: anyone may be anyone. A real app's backend issues tokens.
          const user = url.searchParams.get("user") ?? "";
          if (!demoUsers.includes(user)) return void response.writeHead(404).end();
          return void response.writeHead(200, { "content-type": "text/plain" }).end(await token(user));
        }
        if (url.pathname === "/config.json") {
          return void response.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify({ baseUrl, users: demoUsers }));
        }
        if (url.pathname === "/demo.js") {
          const body = await readFile(join(packageDir, ".build/bundle/demo.js"));
          return void response.writeHead(200, { "content-type": "text/javascript" }).end(body);
        }
        const body = await readFile(join(packageDir, "demo/index.html"));
        response.writeHead(200, { "content-type": "text/html" }).end(body);
      } catch {
        response.writeHead(500).end();
      }
    })();
  });
  page.listen(pagePort, "127.0.0.1");
  await once(page, "listening");

  return {
    url: `http://localhost:${pagePort}/?user=alice`,
    async stop() {
      await Promise.all(bots.map((bot) => bot.close()));
      page.close();
      server.kill("SIGTERM");
      await once(server, "exit");
    },
  };
}

/** Demo users who are around without anyone opening their page. */
async function startBots(baseUrl: string, token: (user: string) => Promise<string>): Promise<PresenceClient[]> {
  const bot = (user: string) =>
    createPresenceClient({ baseUrl, token: () => token(user), platform: "service", transport: (options) => createGrpcTransport(options) });
  const carol = bot("carol");
  await carol.setStatus("busy", "presenting the Q3 numbers");
  const dave = bot("dave");
  await dave.setStatus("online", "working from Lisbon");
  await dave.setActivity("idle");
  const erin = bot("erin");
  await erin.setStatus("online", "back at 3");
  // Erin leaves: the board shows when she was last seen.
  await erin.close();
  return [carol, dave];
}

async function listening(child: ChildProcess, port: number): Promise<void> {
  for (let tries = 0; tries < 300; tries++) {
    if (child.exitCode !== null) throw new Error("presence-server exited");
    const up = await new Promise<boolean>((resolve) => {
      const socket = connect(port, "127.0.0.1");
      socket.once("connect", () => (socket.destroy(), resolve(true)));
      socket.once("error", () => resolve(false));
    });
    if (up) return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`presence-server did not listen on ${port}`);
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const demo = await startDemo({
    serverBin: process.env.PRESENCE_SERVER_BIN || resolve(packageDir, "../target/debug/presence-server"),
    presencePort: Number(process.env.PRESENCE_PORT ?? 50051),
    pagePort: Number(process.env.DEMO_PORT ?? 8080),
  });
  console.log(`\nPresence demo: open ${demo.url}\n(each card has a link to open that user in a new tab; Ctrl-C stops)\n`);
  const stop = () => void demo.stop().then(() => process.exit(0));
  process.once("SIGINT", stop);
  process.once("SIGTERM", stop);
}
