import { Code, ConnectError } from "@connectrpc/connect";

/**
 * The error every SDK call rejects with: a gRPC status `code` (compare it
 * with {@link Code}, e.g. `Code.Unauthenticated`) and the server's message.
 *
 * Network failures that never reached the server, including a browser
 * refusing a cross-origin response (CORS), have the code `Code.Unavailable`:
 * a page cannot tell them apart, and both are worth retrying later.
 */
export class PresenceError extends Error {
  override readonly name = "PresenceError";

  constructor(
    /** The gRPC status code. */
    readonly code: Code,
    message: string,
  ) {
    super(message);
  }
}

/** Whether retrying the same request could ever succeed. */
export function isRetryable(error: PresenceError): boolean {
  switch (error.code) {
    case Code.Unauthenticated:
    case Code.PermissionDenied:
    case Code.InvalidArgument:
    case Code.Unimplemented:
    case Code.Canceled:
      return false;
    default:
      return true;
  }
}

/**
 * Turns whatever a connect-es call threw into a {@link PresenceError}. The raw
 * cause stays out of it: transport internals are no part of our API.
 */
export function toPresenceError(error: unknown): PresenceError {
  if (error instanceof PresenceError) return error;
  // A failed fetch (server down, CORS refusal, offline) is a TypeError that
  // connect-es wraps with code Unknown; name it for what it is.
  const cause = error instanceof ConnectError ? error.cause : error;
  if (cause instanceof TypeError) {
    return new PresenceError(Code.Unavailable, `network error: ${cause.message}`);
  }
  const connectError = ConnectError.from(error);
  return new PresenceError(connectError.code, connectError.rawMessage);
}
