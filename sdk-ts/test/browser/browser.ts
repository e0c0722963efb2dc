// What the browser tests share: headless Chromium (Debian's, never a
// download) and a static server for the test page on its own origin, so
// every call to the presence server is cross-origin and CORS is exercised.
import { execFileSync } from "node:child_process";
import { readFile } from "node:fs/promises";
import { type Server, createServer } from "node:http";
import { once } from "node:events";
import { join } from "node:path";
import { type Browser, chromium } from "playwright-core";
import { packageDir } from "../harness.js";

/** PRESENCE_CHROMIUM, else Debian's headless shell, else Debian's chromium. */
function chromiumPath(): string {
  if (process.env.PRESENCE_CHROMIUM) return process.env.PRESENCE_CHROMIUM;
  for (const name of ["chromium-headless-shell", "chromium"]) {
    try {
      return execFileSync("sh", ["-c", `command -v ${name}`]).toString().trim();
    } catch {
      // Not installed; try the next.
    }
  }
  throw new Error("no chromium: apt-get install -y chromium (scripts/test.sh does)");
}

export function launchBrowser(): Promise<Browser> {
  return chromium.launch({ executablePath: chromiumPath(), args: ["--no-sandbox"] });
}

export interface PageServer {
  /** http://localhost:<port>: another host and port than the presence server's 127.0.0.1. */
  readonly origin: string;
  close(): Promise<void>;
}

const types: Record<string, string> = { ".html": "text/html", ".js": "text/javascript", ".map": "application/json", ".png": "image/png" };

/** Serves the bundled pages from .build/bundle, and `extra` routes (the demo's token endpoint). */
export async function servePages(
  extra: (url: URL) => Promise<{ type: string; body: string } | undefined> = async () => undefined,
): Promise<PageServer & { server: Server }> {
  const bundleDir = join(packageDir, ".build/bundle");
  const server = createServer((request, response) => {
    const url = new URL(request.url ?? "/", "http://localhost");
    void (async () => {
      try {
        const routed = await extra(url);
        if (routed !== undefined) {
          response.writeHead(200, { "content-type": routed.type }).end(routed.body);
          return;
        }
        const path = url.pathname === "/" ? "/test-page.html" : url.pathname;
        const body = path.endsWith(".html")
          ? pageHtml(path.slice(1, -".html".length))
          : await readFile(join(bundleDir, path.replace(/\.\./g, "")));
        response.writeHead(200, { "content-type": types[path.slice(path.lastIndexOf("."))] ?? "application/octet-stream" }).end(body);
      } catch {
        response.writeHead(404).end();
      }
    })();
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const address = server.address();
  if (address === null || typeof address === "string") throw new Error("no address");
  return {
    origin: `http://localhost:${address.port}`,
    server,
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}

function pageHtml(bundle: string): string {
  return `<!doctype html><html><head><meta charset="utf-8"><title>Presence</title>
<link rel="icon" href="data:,"></head><body><ul id="contacts"></ul><div id="app"></div>
<script type="module" src="/${bundle}.js"></script></body></html>`;
}
