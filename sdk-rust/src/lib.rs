//! Rust client SDK of the presence service, for internal services (chat,
//! notifications, bots) and tools.
//!
//! One [`PresenceClient`] per device (or service identity) does it all:
//!
//! - **a session** ([`start_session`](PresenceClient::start_session)): a
//!   background task keeps the bidirectional `Heartbeat` stream open, beats at
//!   the interval the server chooses, reports activity changes at once, and
//!   re-opens the same device's session after a broken stream or a server
//!   drain, quickly enough that contacts see no flicker.
//!   [`session_state`](PresenceClient::session_state) shows what it is doing;
//!   [`end_session`](PresenceClient::end_session) logs out.
//! - **watching** ([`watch_contacts`](PresenceClient::watch_contacts)): a
//!   [`Stream`](futures::Stream) of [`PresenceUpdate`]s, a snapshot then
//!   changes, that resumes after reconnects asking only for what changed and
//!   never delivers a duplicate or an older version. [`PresenceMap`] folds it
//!   into the latest presence per user.
//! - **queries and admin calls**: [`get_presence`](PresenceClient::get_presence),
//!   [`get_history`](PresenceClient::get_history),
//!   [`set_status`](PresenceClient::set_status), contacts management.
//! - **the change feed** (admin scope): [`tail`](PresenceClient::tail), every
//!   change from a moment on, for tools, and
//!   [`consume`](PresenceClient::consume), a member of a consumer group that
//!   acknowledges batches and reconnects by itself ([`Consumer`]).
//!
//! Every call carries `authorization: Bearer <token>` from
//! [`ClientConfig::token`]. Errors are one enum, [`Error`], mapped once from
//! gRPC statuses. The message types are the generated ones from
//! `presence-proto`, re-exported in [`proto`].
//!
//! # Example
//!
//! ```no_run
//! use futures::StreamExt;
//! use presence_sdk::{
//!     Activity, ClientConfig, Platform, PresenceClient, PresenceMap, PresenceUpdate,
//!     SessionOptions, UserStatus,
//! };
//!
//! #[tokio::main]
//! async fn main() -> Result<(), presence_sdk::Error> {
//!     let client = PresenceClient::connect(ClientConfig {
//!         endpoints: vec!["http://127.0.0.1:50051".into()],
//!         token: Some(std::env::var("PRESENCE_TOKEN").unwrap_or_default()),
//!         device_id: "laptop-1".into(),
//!         platform: Platform::Desktop,
//!         ..ClientConfig::default()
//!     })
//!     .await?;
//!
//!     // Go online; the SDK keeps the session alive from here on.
//!     client.start_session(SessionOptions::default()).await?;
//!     client.set_status(UserStatus::Busy, "in a meeting").await?;
//!
//!     // Follow the contacts' presence.
//!     let mut contacts = PresenceMap::new();
//!     let mut updates = client.watch_contacts();
//!     while let Some(update) = updates.next().await {
//!         let update = update?;
//!         contacts.apply(&update);
//!         match update {
//!             PresenceUpdate::Presence(p) => println!("{} is {:?}", p.user_id, p.status()),
//!             PresenceUpdate::SnapshotComplete { watched } => {
//!                 println!("watching {watched} contacts");
//!                 // No input for a while: tell contacts we are idle.
//!                 client.set_activity(Activity::Idle)?;
//!             }
//!             PresenceUpdate::Reconnecting { reason, .. } => println!("reconnecting: {reason}"),
//!             _ => {}
//!         }
//!         if contacts.len() > 100 {
//!             break;
//!         }
//!     }
//!
//!     // Log out at once rather than after the server's grace period.
//!     client.end_session().await
//! }
//! ```
//!
//! # Layout
//!
//! - `client`: [`PresenceClient`] and the unary calls;
//! - `session`: the background session task and [`SessionState`];
//! - `watch`: [`PresenceStream`], the version filter, [`PresenceMap`];
//! - `feed`: [`Consumer`] and the change feed's types;
//! - `connector`: endpoints, rotating through them, the token interceptor;
//! - `config`, `backoff`, `error`: [`ClientConfig`], [`Backoff`], [`Error`];
//! - `bin/presence.rs`: the `presence` CLI (feature `cli`, on by default).
//!
//! # Tasks and resources
//!
//! The session is the only background task. It holds no reference to the
//! client, so dropping the last clone of a [`PresenceClient`] stops it (the
//! server then ends the session after its grace period). A
//! [`PresenceStream`] runs no task at all: it does its work when polled and
//! cancels its RPC when dropped; so does a [`Consumer`], whose drop also
//! leaves its group. No queue grows without bound anywhere: the
//! session's outgoing beats go through a channel of four and a beat that
//! does not fit is skipped (the next one carries the same state), and a slow
//! watch consumer slows the HTTP/2 stream, which makes the server coalesce.

#![warn(missing_docs)]

mod backoff;
mod client;
mod config;
mod connector;
mod error;
mod feed;
mod reconnect;
mod session;
mod watch;

pub use backoff::Backoff;
pub use client::PresenceClient;
pub use config::{ClientConfig, DEFAULT_ENDPOINT, TlsConfig, TokenProvider};
pub use error::Error;
pub use feed::{ConsumeOptions, Consumer, FeedBatch, FeedStart, FeedUpdate};
pub use session::{SessionOptions, SessionState};
pub use watch::{PresenceMap, PresenceStream, PresenceUpdate};

/// The generated API types (`presence.v1`), for anything the SDK's own types
/// do not cover.
pub use presence_proto::v1 as proto;
pub use presence_proto::v1::{
    Activity, Assignment, ChangeEvent, DeviceSession, HistoryEntry, OfflineReason, Platform,
    Presence, UserStatus, VisibleStatus,
};
