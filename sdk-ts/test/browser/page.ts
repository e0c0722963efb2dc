// The page the browser tests drive: the SDK as a web app uses it, plus a log
// of what the page saw and when, read back by the test through Playwright.
import { Code, type ContactWatch, type PresenceClient, type PresenceClientOptions, PresenceError, createPresenceClient } from "../../src/index.js";

interface Seen {
  userId: string;
  status: string;
  message: string;
  version: string;
  /** Date.now() when the page received it: the same clock as the other page's. */
  at: number;
}

let client: PresenceClient | undefined;
let watch: ContactWatch | undefined;
const seen: Seen[] = [];
const states: string[] = [];

const harness = {
  open(options: Omit<PresenceClientOptions, "transport">) {
    client = createPresenceClient(options);
    watch = client.watchContacts();
    watch.subscribe((update) => {
      if (update.type !== "presence") return;
      const { presence } = update;
      seen.push({
        userId: presence.userId,
        status: presence.status,
        message: presence.customMessage,
        version: String(presence.version),
        at: Date.now(),
      });
      render();
    });
    watch.onStateChange((change) => states.push(change.state));
  },
  synced: () => watch!.synced(),
  status: (userId: string) => watch?.get(userId)?.status,
  message: (userId: string) => watch?.get(userId)?.customMessage,
  offlineReason: (userId: string) => watch?.get(userId)?.offlineReason,
  state: () => watch?.state,
  seen: () => seen,
  states: () => states,
  /** Runs a change and returns when it was made (Date.now()). */
  async setStatus(status: "online" | "busy" | "invisible", message = "") {
    const at = Date.now();
    await client!.setStatus(status, message);
    return at;
  },
  async setActivity(activity: "active" | "idle") {
    const at = Date.now();
    await client!.setActivity(activity);
    return at;
  },
  /** The error code name a call rejected with, or "ok". */
  async errorOf(call: "getPresence" | "history" | "getPresenceOversized" | "watch", userId = "someone") {
    try {
      if (call === "getPresence") await client!.getPresence([userId]);
      if (call === "getPresenceOversized") await client!.getPresence(Array.from({ length: 101 }, (_, i) => `u${i}`));
      if (call === "history") for await (const page of client!.history(userId)) void page;
      if (call === "watch") await watch!.synced();
      return "ok";
    } catch (error) {
      if (!(error instanceof PresenceError)) return `untyped: ${String(error)}`;
      return Code[error.code];
    }
  },
  close: () => client?.close(),
};

function render() {
  const list = document.getElementById("contacts")!;
  list.replaceChildren(
    ...[...(watch?.contacts.values() ?? [])].map((presence) => {
      const item = document.createElement("li");
      item.dataset.user = presence.userId;
      item.textContent = `${presence.userId}: ${presence.status} ${presence.customMessage}`;
      return item;
    }),
  );
}

(window as unknown as { harness: typeof harness }).harness = harness;
