import type { Activity } from "./presence.js";

/** The opt-in idle detector of {@link PresenceClientOptions.idle}. */
export interface IdleOptions {
  /** How long without keyboard, pointer, wheel or touch input makes this tab idle. Default: 60 000 ms. */
  idleAfterMs?: number;
}

/** What the detector listens to: the page's window and document (replaceable in tests). */
export interface IdleEnvironment {
  /** Receives the input events. */
  window: EventTarget;
  /** Receives `visibilitychange`; `hidden` is read on each. */
  document: EventTarget & { readonly hidden: boolean };
}

const inputEvents = ["pointerdown", "pointermove", "keydown", "wheel", "touchstart", "scroll"];

/**
 * Reports `"idle"` when the page is hidden or has had no input for
 * `idleAfterMs`, and `"active"` on the next input while visible. Calls
 * `onChange` on transitions only. Returns the function that stops it.
 */
export function detectIdleness(
  onChange: (activity: Activity) => void,
  options: IdleOptions,
  environment: IdleEnvironment,
): () => void {
  const idleAfterMs = options.idleAfterMs ?? 60_000;
  let activity: Activity = "active";
  let lastInput = Date.now();
  let timer: ReturnType<typeof setTimeout> | undefined;

  const become = (next: Activity) => {
    if (next === activity) return;
    activity = next;
    onChange(next);
  };
  // One timer per idle period, not one per input event: pointermove fires
  // dozens of times a second, and re-arming a timer on each is wasted work.
  const arm = (delayMs: number) => {
    timer = setTimeout(() => {
      const quietFor = Date.now() - lastInput;
      if (quietFor >= idleAfterMs) {
        timer = undefined;
        become("idle");
      } else {
        arm(idleAfterMs - quietFor);
      }
    }, delayMs);
  };
  const onInput = () => {
    lastInput = Date.now();
    if (environment.document.hidden) return;
    become("active");
    if (timer === undefined) arm(idleAfterMs);
  };
  const onVisibility = () => {
    if (environment.document.hidden) become("idle");
    else onInput();
  };

  for (const type of inputEvents) {
    environment.window.addEventListener(type, onInput, { capture: true, passive: true });
  }
  environment.document.addEventListener("visibilitychange", onVisibility);
  if (environment.document.hidden) become("idle");
  else arm(idleAfterMs);

  return () => {
    clearTimeout(timer);
    for (const type of inputEvents) environment.window.removeEventListener(type, onInput, { capture: true });
    environment.document.removeEventListener("visibilitychange", onVisibility);
  };
}
