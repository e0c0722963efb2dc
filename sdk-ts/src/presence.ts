import type { Presence as PresenceMessage, HistoryEntry as HistoryEntryMessage } from "./gen/presence/v1/presence_pb.js";
import {
  Activity as ActivityEnum,
  OfflineReason as OfflineReasonEnum,
  UserStatus as UserStatusEnum,
  VisibleStatus as VisibleStatusEnum,
} from "./gen/presence/v1/presence_pb.js";

/** What contacts see: derived by the server from the user's sessions and chosen status. */
export type VisibleStatus = "offline" | "online" | "idle" | "busy";
/** What a user chooses for all of their devices. */
export type UserStatus = "online" | "busy" | "invisible";
/** What one device (here: one browser tab) reports about its user's attention. */
export type Activity = "active" | "idle";
/**
 * Why a user is offline. Contacts of an invisible user see `"logout"`; only
 * the user themself sees `"invisible"`.
 */
export type OfflineReason = "logout" | "connection_closed" | "lease_expired" | "node_lost" | "invisible";

/** One user's presence as the caller may see it. */
export interface Presence {
  userId: string;
  status: VisibleStatus;
  /** The user's custom message; empty while offline. */
  customMessage: string;
  /** The last moment the user was visibly online; undefined if never seen. */
  lastSeen: Date | undefined;
  /**
   * Strictly increasing per user with every change; `0n` means nothing is
   * known. A bigint because the server's versions are 64-bit (clock-based).
   */
  version: bigint;
  /** Set while `status` is `"offline"` and the user was seen before. */
  offlineReason: OfflineReason | undefined;
  /** The status the user chose: only in the caller's own presence. */
  chosenStatus: UserStatus | undefined;
}

/** One change of a user's visible status, from {@link PresenceClient.history}. */
export interface HistoryEntry {
  at: Date;
  status: VisibleStatus;
  offlineReason: OfflineReason | undefined;
  customMessage: string;
  version: bigint;
}

const visibleStatuses: Record<VisibleStatusEnum, VisibleStatus> = {
  [VisibleStatusEnum.UNSPECIFIED]: "offline",
  [VisibleStatusEnum.OFFLINE]: "offline",
  [VisibleStatusEnum.ONLINE]: "online",
  [VisibleStatusEnum.IDLE]: "idle",
  [VisibleStatusEnum.BUSY]: "busy",
};

const offlineReasons: Record<OfflineReasonEnum, OfflineReason | undefined> = {
  [OfflineReasonEnum.UNSPECIFIED]: undefined,
  [OfflineReasonEnum.LOGOUT]: "logout",
  [OfflineReasonEnum.CONNECTION_CLOSED]: "connection_closed",
  [OfflineReasonEnum.LEASE_EXPIRED]: "lease_expired",
  [OfflineReasonEnum.NODE_LOST]: "node_lost",
  [OfflineReasonEnum.INVISIBLE]: "invisible",
};

const userStatusesIn: Record<UserStatusEnum, UserStatus | undefined> = {
  [UserStatusEnum.UNSPECIFIED]: undefined,
  [UserStatusEnum.ONLINE]: "online",
  [UserStatusEnum.BUSY]: "busy",
  [UserStatusEnum.INVISIBLE]: "invisible",
};

const userStatusesOut: Record<UserStatus, UserStatusEnum> = {
  online: UserStatusEnum.ONLINE,
  busy: UserStatusEnum.BUSY,
  invisible: UserStatusEnum.INVISIBLE,
};

const activitiesOut: Record<Activity, ActivityEnum> = {
  active: ActivityEnum.ACTIVE,
  idle: ActivityEnum.IDLE,
};

function dateFromUnixMs(ms: bigint): Date | undefined {
  return ms === 0n ? undefined : new Date(Number(ms));
}

/** The one place protobuf presence becomes the SDK's. */
export function presenceFromMessage(message: PresenceMessage): Presence {
  return {
    userId: message.userId,
    status: visibleStatuses[message.status] ?? "offline",
    customMessage: message.customMessage,
    lastSeen: dateFromUnixMs(message.lastSeenUnixMs),
    version: message.version,
    offlineReason: offlineReasons[message.offlineReason],
    chosenStatus: userStatusesIn[message.chosenStatus],
  };
}

export function historyEntryFromMessage(message: HistoryEntryMessage): HistoryEntry {
  return {
    at: new Date(Number(message.atUnixMs)),
    status: visibleStatuses[message.status] ?? "offline",
    offlineReason: offlineReasons[message.offlineReason],
    customMessage: message.customMessage,
    version: message.version,
  };
}

export function userStatusToMessage(status: UserStatus): UserStatusEnum {
  const value = userStatusesOut[status];
  if (value === undefined) throw new TypeError(`unknown status "${String(status)}"`);
  return value;
}

export function activityToMessage(activity: Activity): ActivityEnum {
  const value = activitiesOut[activity];
  if (value === undefined) throw new TypeError(`unknown activity "${String(activity)}"`);
  return value;
}
