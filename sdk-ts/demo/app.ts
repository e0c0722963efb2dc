// The demo board: the caller's contacts, live, with their status, message and
// when they were last seen, and buttons to change the caller's own status.
import { type Presence, type UserStatus, createPresenceClient } from "../src/index.js";

const me = new URLSearchParams(location.search).get("user") ?? "alice";
const { baseUrl } = (await (await fetch("/config.json")).json()) as { baseUrl: string };

const client = createPresenceClient({
  baseUrl,
  // The demo's page server mints dev tokens; a real app asks its backend.
  token: async () => (await fetch(`/token?user=${encodeURIComponent(me)}`)).text(),
  idle: { idleAfterMs: 30_000 },
});
const contacts = client.watchContacts();
let chosen: UserStatus = "online";
let message = "";

const element = (id: string) => document.getElementById(id)!;
element("who").textContent = `signed in as ${me}`;

function lastSeen(presence: Presence): string {
  if (presence.lastSeen === undefined) return "never seen";
  const minutes = Math.floor((Date.now() - presence.lastSeen.getTime()) / 60_000);
  if (minutes < 1) return "last seen just now";
  if (minutes < 60) return `last seen ${minutes} min ago`;
  return `last seen ${presence.lastSeen.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })}`;
}

function html(tag: string, attributes: Record<string, string>, ...children: Array<Node | string>): HTMLElement {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

function renderMe(): void {
  const buttons = (["online", "busy", "invisible"] as const).map((status) => {
    const button = html("button", { class: status === chosen ? "chosen" : "" }, html("span", { class: `dot ${status}` }), status);
    button.onclick = () => void choose(status, message);
    return button;
  });
  const input = html("input", { placeholder: "What's your status?", value: message }) as HTMLInputElement;
  input.onchange = () => void choose(chosen, input.value);
  element("me").replaceChildren(html("span", {}, "Your status"), ...buttons, input);
}

function renderBoard(): void {
  const people = [...contacts.contacts.values()].sort((a, b) => a.userId.localeCompare(b.userId));
  element("board").replaceChildren(
    ...people.map((presence) =>
      html(
        "div",
        { class: "card", "data-user": presence.userId },
        html("div", { class: "name" }, html("span", { class: `dot ${presence.status}` }), presence.userId),
        html("div", { class: "status" }, presence.status === "offline" ? `offline · ${lastSeen(presence)}` : presence.status),
        html("div", { class: "message" }, presence.customMessage),
        html("a", { href: `?user=${encodeURIComponent(presence.userId)}`, target: "_blank" }, `open as ${presence.userId} ↗`),
      ),
    ),
  );
}

async function choose(status: UserStatus, newMessage: string): Promise<void> {
  const own = await client.setStatus(status, newMessage);
  chosen = own.chosenStatus ?? status;
  message = newMessage;
  renderMe();
}

contacts.onChange(renderBoard);
contacts.onStateChange(({ state }) => {
  const badge = element("connection");
  badge.textContent = state;
  badge.className = `connection ${state}`;
});
// "last seen 3 min ago" moves on without any event.
setInterval(renderBoard, 30_000);

const [own] = await client.getPresence([me]);
chosen = own?.chosenStatus ?? "online";
message = own?.customMessage ?? "";
renderMe();
