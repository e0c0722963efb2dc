//! [`PresenceClient`]: the handle everything goes through.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::Stream;
use futures::stream::BoxStream;
use presence_proto::v1::{
    Activity, AddContactsRequest, DisconnectRequest, GetHistoryRequest, GetHistoryResponse,
    GetPresenceRequest, HistoryEntry, ListContactsRequest, Presence, RemoveContactsRequest,
    SetStatusRequest, TouchRequest, TouchResponse, UserStatus,
};
use tokio::sync::{oneshot, watch};

use crate::connector::{Connector, Lease};
use crate::session::{Desired, SessionHandle, SessionTask};
use crate::{
    ChangeEvent, ClientConfig, ConsumeOptions, Consumer, Error, PresenceStream, SessionOptions,
    SessionState,
};

/// A connection to the presence service, for one device of one user (or one
/// service identity).
///
/// Cheap to clone: clones share the connection, the token and the session.
/// Every method takes `&self`. Dropping the last clone stops the session task
/// (the server then ends the session after its grace period; call
/// [`end_session`](Self::end_session) first for an immediate logout). Watch
/// streams are independent of the handle: each lives until it is dropped.
#[derive(Clone)]
pub struct PresenceClient {
    inner: Arc<Inner>,
}

struct Inner {
    /// Shared with the session task and watch streams, which must not hold
    /// the client itself (that would keep it alive forever).
    connector: Arc<Connector>,
    config: ClientConfig,
    /// The running session, if any. A std mutex, not Tokio's: it is held only
    /// to look at or swap the handle, never across an await.
    session: Mutex<Option<SessionHandle>>,
    /// Published by the session task; outlives any one session so observers
    /// can subscribe before `start_session` and see every session after.
    state: watch::Sender<SessionState>,
}

impl std::fmt::Debug for PresenceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceClient")
            .field("endpoint", &self.inner.connector.lease().endpoint)
            .field("device_id", &self.inner.config.device_id)
            .finish_non_exhaustive()
    }
}

impl PresenceClient {
    /// Connects to the first of `config.endpoints` that answers (each is
    /// tried once, in order, within `connect_timeout`).
    ///
    /// Fails with [`Error::Config`] on an unusable config and
    /// [`Error::Transport`] if no endpoint answers. The token is not checked
    /// here; the first call that needs it is.
    pub async fn connect(config: ClientConfig) -> Result<Self, Error> {
        let connector = Connector::connect(&config).await?;
        Ok(Self::from_parts(connector, config))
    }

    /// Like [`connect`](Self::connect) but without connecting: the first call
    /// does. For services that start before the presence server is up. Must
    /// be called inside a Tokio runtime.
    pub fn connect_lazy(config: ClientConfig) -> Result<Self, Error> {
        let connector = Connector::connect_lazy(&config)?;
        Ok(Self::from_parts(connector, config))
    }

    fn from_parts(connector: Connector, config: ClientConfig) -> Self {
        let (state, _) = watch::channel(SessionState::Idle);
        Self {
            inner: Arc::new(Inner {
                connector: Arc::new(connector),
                config,
                session: Mutex::new(None),
                state,
            }),
        }
    }

    /// Replaces the bearer token for every later call, including the next
    /// reconnect of the session and of watches (an open stream keeps the
    /// token it was opened with). `None` sends no token.
    pub fn set_token(&self, token: Option<&str>) -> Result<(), Error> {
        self.inner.connector.set_token(token)
    }

    fn lease(&self) -> Lease {
        self.inner.connector.lease()
    }

    /// Maps a failed unary call's status, and moves later calls to the next
    /// endpoint if this one looks gone. The call itself is not retried: the
    /// caller knows best whether and when to.
    fn unary_failed(&self, lease: &Lease, status: tonic::Status) -> Error {
        let error = Error::from(status);
        if matches!(error, Error::Unavailable(_) | Error::Transport(_)) {
            self.inner.connector.rotate(lease.generation);
        }
        error
    }

    fn device_id(&self) -> Result<&str, Error> {
        let device_id = self.inner.config.device_id.as_str();
        if device_id.is_empty() {
            return Err(Error::Config("device_id is not set".to_owned()));
        }
        Ok(device_id)
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Option<SessionHandle>> {
        // The guarded value is an `Option` swapped whole; a panic elsewhere
        // cannot leave it half-written.
        self.inner.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- the session ----

    /// Opens this device's session (`config.device_id`, `config.platform`)
    /// on the `Heartbeat` stream and keeps it alive in a background task.
    ///
    /// Returns once the server answered the open, or with the error that
    /// stopped the first attempt (nothing keeps running then). After that the
    /// task beats at the interval the server chose, and when the stream
    /// breaks or the server drains it re-opens the same device id with the
    /// current activity and status: on the next endpoint, after the server's
    /// requested delay or an exponential backoff with full jitter. A quick
    /// reconnect lands within the server's grace period, so contacts see no
    /// change. Only an error retrying cannot fix (an expired token) ends the
    /// session; watch [`session_state`](Self::session_state) to notice.
    ///
    /// Fails with [`Error::SessionAlreadyStarted`] if this client already
    /// runs a session.
    ///
    /// A re-open re-applies the status this client last set (through these
    /// options or [`set_status`](Self::set_status)), so a server that lost the
    /// user's state gets it back. If another device of the same user changed
    /// the status in the meantime, this device's choice wins at re-open: last
    /// writer wins.
    pub async fn start_session(&self, options: SessionOptions) -> Result<(), Error> {
        let device_id = self.device_id()?.to_owned();
        let (ready_tx, ready_rx) = oneshot::channel();
        {
            let mut session = self.session();
            if session.as_ref().is_some_and(SessionHandle::is_running) {
                return Err(Error::SessionAlreadyStarted);
            }
            let task = SessionTask {
                connector: Arc::clone(&self.inner.connector),
                backoff: self.inner.config.backoff,
                request_timeout: self.inner.config.request_timeout,
                device_id,
                platform: self.inner.config.platform,
                state: self.inner.state.clone(),
            };
            let activity = match options.activity {
                Activity::Unspecified => Activity::Active,
                activity => activity,
            };
            let desired = Desired {
                activity,
                status: options.status,
                custom_message: options.custom_message,
            };
            *session = Some(task.spawn(desired, ready_tx));
        }
        match ready_rx.await {
            Ok(result) => result,
            // The task ended without a word: `end_session` raced with us.
            Err(_) => Err(Error::NoSession),
        }
    }

    /// The session's state, now and as it changes: `Idle` before any
    /// session, then `Connecting`, `Connected`, `Reconnecting`, `Closed`.
    pub fn session_state(&self) -> watch::Receiver<SessionState> {
        self.inner.state.subscribe()
    }

    /// Reports this device's activity (`Active`, or `Idle` after no input for
    /// a while or in the background). Sent at once in a beat on the session
    /// stream, and carried by every later beat and re-open.
    ///
    /// Fails with [`Error::NoSession`] if no session runs (activity belongs to
    /// a session; without one, use [`touch`](Self::touch)), and with
    /// [`Error::InvalidArgument`] for `Activity::Unspecified`.
    pub fn set_activity(&self, activity: Activity) -> Result<(), Error> {
        if activity == Activity::Unspecified {
            return Err(Error::InvalidArgument(
                "activity must be active or idle".to_owned(),
            ));
        }
        let session = self.session();
        let handle = session
            .as_ref()
            .filter(|h| h.is_running())
            .ok_or(Error::NoSession)?;
        handle.desired.send_if_modified(|desired| {
            let changed = desired.activity != activity;
            desired.activity = activity;
            changed
        });
        Ok(())
    }

    /// Sets the user-level status (`Online`, `Busy`, `Invisible`) and custom
    /// message (empty clears it) for all of the user's devices, and returns
    /// the user's own presence after the change (`None` only if the server
    /// left it out).
    ///
    /// Always goes through the unary `SetStatus` call, session or not: the
    /// caller gets the server's verdict (say, a message too long) directly,
    /// and a rejected status cannot break the session stream. A running
    /// session remembers it for re-opens.
    pub async fn set_status(
        &self,
        status: UserStatus,
        custom_message: impl Into<String>,
    ) -> Result<Option<Presence>, Error> {
        let custom_message = custom_message.into();
        // Remembered for re-opens before the call, not after: a session that
        // re-opens while the call is in flight must carry this status, or it
        // would re-apply the older one over an acknowledged change.
        let previous = self.session().as_ref().map(|handle| {
            let mut previous = None;
            handle.desired.send_if_modified(|desired| {
                previous = Some((
                    desired.status,
                    std::mem::replace(&mut desired.custom_message, custom_message.clone()),
                ));
                desired.status = status;
                false
            });
            previous
        });
        let lease = self.lease();
        let request = SetStatusRequest {
            status: status as i32,
            custom_message: custom_message.clone(),
        };
        let response = match self
            .inner
            .connector
            .presence(&lease)
            .set_status(request)
            .await
        {
            Ok(response) => response.into_inner(),
            Err(error) => {
                // Put the older choice back, unless a later call replaced ours.
                if let (Some(handle), Some(Some((old_status, old_message)))) =
                    (self.session().as_ref(), previous)
                {
                    handle.desired.send_if_modified(|desired| {
                        if desired.status == status && desired.custom_message == custom_message {
                            desired.status = old_status;
                            desired.custom_message = old_message;
                        }
                        false
                    });
                }
                return Err(self.unary_failed(&lease, error));
            }
        };
        Ok(response.presence)
    }

    /// Ends this device's session now: stops the session task (if one runs),
    /// then sends `Disconnect`, so contacts see the user go offline with
    /// reason `LOGOUT` at once, without waiting for a grace period. The same
    /// as [`disconnect`](Self::disconnect).
    pub async fn end_session(&self) -> Result<(), Error> {
        self.disconnect().await
    }

    /// Explicit logout of this device (`config.device_id`). Stops this
    /// client's session task first, if one runs, so it cannot re-open the
    /// session behind the logout's back.
    pub async fn disconnect(&self) -> Result<(), Error> {
        let device_id = self.device_id()?.to_owned();
        let handle = self.session().take();
        if let Some(handle) = handle {
            handle.stop().await;
        }
        let lease = self.lease();
        match self
            .inner
            .connector
            .presence(&lease)
            .disconnect(DisconnectRequest { device_id })
            .await
        {
            Ok(_) => Ok(()),
            Err(status) => Err(self.unary_failed(&lease, status)),
        }
    }

    /// A unary heartbeat for this device: opens its session if needed and
    /// renews the lease. For callers that do not keep a session stream; call
    /// it at least every `heartbeat_interval_ms` of the response.
    /// `Activity::Unspecified` leaves the activity as it is.
    pub async fn touch(&self, activity: Activity) -> Result<TouchResponse, Error> {
        let request = TouchRequest {
            device_id: self.device_id()?.to_owned(),
            platform: self.inner.config.platform as i32,
            activity: activity as i32,
        };
        let lease = self.lease();
        match self.inner.connector.presence(&lease).touch(request).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(self.unary_failed(&lease, status)),
        }
    }

    // ---- queries ----

    /// The presence of each of `user_ids`, in the same order. Users the
    /// caller may not see, and unknown users, come back `OFFLINE` with
    /// version 0. Lists longer than `config.max_batch` are sent as several
    /// requests, one after the other.
    pub async fn get_presence<S: AsRef<str>>(
        &self,
        user_ids: &[S],
    ) -> Result<Vec<Presence>, Error> {
        let mut presences = Vec::with_capacity(user_ids.len());
        for chunk in user_ids.chunks(self.inner.config.max_batch.max(1)) {
            let request = GetPresenceRequest {
                user_ids: chunk.iter().map(|id| id.as_ref().to_owned()).collect(),
            };
            let lease = self.lease();
            match self
                .inner
                .connector
                .presence(&lease)
                .get_presence(request)
                .await
            {
                Ok(response) => presences.extend(response.into_inner().presences),
                Err(status) => return Err(self.unary_failed(&lease, status)),
            }
        }
        Ok(presences)
    }

    /// The presence of one user (see [`get_presence`](Self::get_presence)).
    pub async fn get_one(&self, user_id: &str) -> Result<Presence, Error> {
        let mut presences = self.get_presence(&[user_id]).await?;
        match presences.pop() {
            Some(presence) if presences.is_empty() => Ok(presence),
            _ => Err(Error::Protocol(
                "expected exactly one presence in the response".to_owned(),
            )),
        }
    }

    /// One page of a user's history. `from`/`to` default to the start of
    /// the retention and now; pass the previous response's
    /// `next_page_token` as `page_token`. Most callers want
    /// [`get_history`](Self::get_history), which pages by itself.
    pub async fn get_history_page(
        &self,
        user_id: &str,
        from: Option<SystemTime>,
        to: Option<SystemTime>,
        page_size: u32,
        page_token: &str,
    ) -> Result<GetHistoryResponse, Error> {
        let request = GetHistoryRequest {
            user_id: user_id.to_owned(),
            from_unix_ms: from.map_or(0, unix_ms),
            to_unix_ms: to.map_or(0, unix_ms),
            page_size,
            page_token: page_token.to_owned(),
        };
        let lease = self.lease();
        match self
            .inner
            .connector
            .presence(&lease)
            .get_history(request)
            .await
        {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(self.unary_failed(&lease, status)),
        }
    }

    /// A user's visible-status changes between `from` (default: the start of
    /// the retention, 24 h) and `to` (default: now), oldest first, fetching
    /// pages as the stream is read. The caller may see its own history and
    /// its contacts'; admin callers anyone's. Collect with
    /// `futures::TryStreamExt::try_collect::<Vec<_>>()` if a `Vec` suits
    /// better.
    pub fn get_history(
        &self,
        user_id: &str,
        from: Option<SystemTime>,
        to: Option<SystemTime>,
    ) -> impl Stream<Item = Result<HistoryEntry, Error>> + Send + 'static {
        history_stream(self.clone(), user_id.to_owned(), from, to)
    }

    // ---- watching ----

    /// The caller's contacts' presence: a snapshot, then every change,
    /// resuming by itself across reconnects. See [`PresenceStream`] and
    /// [`PresenceUpdate`](crate::PresenceUpdate).
    pub fn watch_contacts(&self) -> PresenceStream {
        self.watch_users(Vec::<String>::new())
    }

    /// Like [`watch_contacts`](Self::watch_contacts), for the named users
    /// instead of the caller's contacts. Needs the admin scope
    /// (`presence.admin`); otherwise the stream ends with
    /// [`Error::PermissionDenied`]. An empty list watches the caller's
    /// contacts.
    pub fn watch_users<I, S>(&self, user_ids: I) -> PresenceStream
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        PresenceStream::new(
            Arc::clone(&self.inner.connector),
            self.inner.config.backoff,
            user_ids.into_iter().map(Into::into).collect(),
        )
    }

    // ---- the change feed (admin) ----

    /// Every change from `from` on (`None`: from the moment the server
    /// answered, which is when this returns), as the server logs it: per
    /// partition in log order, so per user in version order. Needs the admin
    /// scope: fails at once with [`Error::PermissionDenied`] without it. For
    /// tools: the stream does not reconnect, it ends with the first error;
    /// start again from the time of the last event seen and drop what
    /// repeats (same user and version).
    pub async fn tail(
        &self,
        from: Option<SystemTime>,
    ) -> Result<impl Stream<Item = Result<ChangeEvent, Error>> + Send + 'static, Error> {
        let lease = self.lease();
        crate::feed::tail(&self.inner.connector, &lease, from)
            .await
            .map_err(|status| self.unary_failed(&lease, status))
    }

    /// Joins a consumer group of the change feed and returns the member,
    /// which reconnects by itself (see [`Consumer`]). Needs the admin scope.
    /// Fails with the error of the first attempt: [`Error::InvalidArgument`]
    /// for bad options, [`Error::PermissionDenied`] without the admin scope,
    /// [`Error::Unavailable`] or [`Error::Transport`] if the server cannot be
    /// reached.
    pub async fn consume(&self, options: ConsumeOptions) -> Result<Consumer, Error> {
        Consumer::join(
            Arc::clone(&self.inner.connector),
            self.inner.config.backoff,
            options,
        )
        .await
    }

    // ---- contacts ----

    /// Links `user_id` with each of `contact_ids`, both ways, and returns how
    /// many links were new. Needs the admin scope. Open watches of both sides
    /// pick the new contacts up.
    pub async fn add_contacts<S: AsRef<str>>(
        &self,
        user_id: &str,
        contact_ids: &[S],
    ) -> Result<u32, Error> {
        let request = AddContactsRequest {
            user_id: user_id.to_owned(),
            contact_ids: contact_ids
                .iter()
                .map(|id| id.as_ref().to_owned())
                .collect(),
        };
        let lease = self.lease();
        match self
            .inner
            .connector
            .contacts(&lease)
            .add_contacts(request)
            .await
        {
            Ok(response) => Ok(response.into_inner().added),
            Err(status) => Err(self.unary_failed(&lease, status)),
        }
    }

    /// Removes the links between `user_id` and each of `contact_ids`, both
    /// ways, and returns how many existed. Needs the admin scope.
    pub async fn remove_contacts<S: AsRef<str>>(
        &self,
        user_id: &str,
        contact_ids: &[S],
    ) -> Result<u32, Error> {
        let request = RemoveContactsRequest {
            user_id: user_id.to_owned(),
            contact_ids: contact_ids
                .iter()
                .map(|id| id.as_ref().to_owned())
                .collect(),
        };
        let lease = self.lease();
        match self
            .inner
            .connector
            .contacts(&lease)
            .remove_contacts(request)
            .await
        {
            Ok(response) => Ok(response.into_inner().removed),
            Err(status) => Err(self.unary_failed(&lease, status)),
        }
    }

    /// A user's contacts, sorted. `None` means the caller's own; anyone
    /// else's needs the admin scope. Long lists come in pages, which this
    /// follows to the end.
    pub async fn list_contacts(&self, user_id: Option<&str>) -> Result<Vec<String>, Error> {
        let mut contacts = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = ListContactsRequest {
                user_id: user_id.unwrap_or_default().to_owned(),
                page_size: 0,
                page_token,
            };
            let lease = self.lease();
            let page = match self
                .inner
                .connector
                .contacts(&lease)
                .list_contacts(request)
                .await
            {
                Ok(response) => response.into_inner(),
                Err(status) => return Err(self.unary_failed(&lease, status)),
            };
            contacts.extend(page.contact_ids);
            if page.next_page_token.is_empty() {
                return Ok(contacts);
            }
            page_token = page.next_page_token;
        }
    }
}

/// Milliseconds since the Unix epoch, as the API counts time; times before
/// the epoch become 0.
pub(crate) fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn history_stream(
    client: PresenceClient,
    user_id: String,
    from: Option<SystemTime>,
    to: Option<SystemTime>,
) -> BoxStream<'static, Result<HistoryEntry, Error>> {
    use futures::StreamExt;

    /// `None` once the last page was fetched (or a fetch failed).
    type Cursor = Option<String>;
    let pages = futures::stream::unfold(Some(String::new()), move |cursor: Cursor| {
        let client = client.clone();
        let user_id = user_id.clone();
        async move {
            let token = cursor?;
            // 0 lets the server pick its default page size.
            match client.get_history_page(&user_id, from, to, 0, &token).await {
                Ok(page) => {
                    let next = if page.next_page_token.is_empty() {
                        None
                    } else if page.next_page_token == token {
                        // A server handing back the same token would page
                        // forever; stop after this page instead.
                        tracing::warn!("history paging returned the same token twice, stopping");
                        None
                    } else {
                        Some(page.next_page_token)
                    };
                    let entries = page.entries.into_iter().map(Ok);
                    Some((futures::stream::iter(entries).left_stream(), next))
                }
                Err(error) => Some((
                    futures::stream::once(async { Err(error) }).right_stream(),
                    None,
                )),
            }
        }
    });
    pages.flatten().boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_convert_to_unix_milliseconds() {
        assert_eq!(unix_ms(UNIX_EPOCH), 0);
        assert_eq!(
            unix_ms(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
            1_700_000_000_123
        );
        assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
    }

    #[tokio::test]
    async fn session_calls_need_a_device_id() {
        let client = PresenceClient::connect_lazy(ClientConfig::default()).unwrap();
        assert!(matches!(
            client.start_session(SessionOptions::default()).await,
            Err(Error::Config(_))
        ));
        assert!(matches!(
            client.touch(Activity::Active).await,
            Err(Error::Config(_))
        ));
        assert!(matches!(
            client.set_activity(Activity::Idle),
            Err(Error::NoSession)
        ));
        assert!(matches!(
            client.session_state().borrow().clone(),
            SessionState::Idle
        ));
    }

    #[tokio::test]
    async fn a_first_open_that_fails_is_reported_and_leaves_nothing_running() {
        // Port 1 on loopback refuses connections.
        let config = ClientConfig {
            device_id: "d1".into(),
            connect_timeout: Duration::from_millis(500),
            ..ClientConfig::with_endpoint("http://127.0.0.1:1")
        };
        let client = PresenceClient::connect_lazy(config).unwrap();
        let error = client
            .start_session(SessionOptions::default())
            .await
            .unwrap_err();
        assert!(error.is_retryable(), "{error}");
        let mut state = client.session_state();
        let closed = state
            .wait_for(|s| matches!(s, SessionState::Closed { .. }))
            .await;
        assert!(closed.is_ok());
        assert!(matches!(
            client.set_activity(Activity::Idle),
            Err(Error::NoSession)
        ));
    }

    #[tokio::test]
    async fn connect_fails_when_no_endpoint_answers() {
        let config = ClientConfig {
            endpoints: vec!["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()],
            connect_timeout: Duration::from_millis(500),
            ..ClientConfig::default()
        };
        assert!(matches!(
            PresenceClient::connect(config).await,
            Err(Error::Transport(_))
        ));
    }
}
