// Bundles the pages the browser tests and the demo load (from the compiled
// sources in .build/), and with --size measures what a page that only
// watches and touches costs: minified, then gzipped.
import { gzipSync } from "node:zlib";
import { build } from "esbuild";

const pages = {
  "test-page": ".build/test/browser/page.js",
  demo: ".build/demo/app.js",
};

await build({
  entryPoints: pages,
  bundle: true,
  format: "esm",
  target: "es2022",
  outdir: ".build/bundle",
  sourcemap: true,
  logLevel: "warning",
});

if (process.argv.includes("--size")) {
  // The smallest useful page: create a client (which touches) and watch.
  const result = await build({
    stdin: {
      contents: `import { createPresenceClient } from "./dist/index.js";
        const client = createPresenceClient({ baseUrl: location.origin, token: "t" });
        client.watchContacts().onChange((contacts) => console.log(contacts.size));`,
      resolveDir: ".",
      loader: "js",
    },
    bundle: true,
    minify: true,
    format: "esm",
    target: "es2022",
    write: false,
  });
  const code = result.outputFiles[0].contents;
  const kib = (bytes) => `${(bytes / 1024).toFixed(1)} KiB`;
  console.log(`watch + touch page: ${kib(code.length)} minified, ${kib(gzipSync(code, { level: 9 }).length)} gzipped`);
}
