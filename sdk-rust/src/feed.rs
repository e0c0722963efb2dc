//! The change feed, for internal services with the admin scope: every change
//! of what contacts see, from the server's partitioned change log.
//!
//! [`Consumer`] is a member of a consumer group (`ChangeFeed.Consume`) that
//! reconnects by itself: the server keeps the group's position and
//! redelivers what a vanished member never acknowledged, so a new stream
//! loses nothing. [`tail`](crate::PresenceClient::tail) is the plain
//! `ChangeFeed.Tail` stream for tools, without a group and without
//! reconnects.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::Stream;
use presence_proto::v1::{
    Assignment, ChangeEvent, ConsumeAck, ConsumeRequest, ConsumeResponse, ConsumeStart,
    StartPosition, TailRequest, consume_request, consume_response,
};
use tokio::sync::mpsc;
use tonic::codec::Streaming;

use crate::connector::{Connector, Lease};
use crate::reconnect::Reconnects;
use crate::{Backoff, Error};

/// Where a group that does not exist yet starts reading. A group that exists
/// keeps its position, whatever its members ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FeedStart {
    /// Changes from now on.
    #[default]
    Latest,
    /// Everything the log still holds (its retention, 24 h by default).
    Oldest,
    /// Changes logged at or after this time.
    At(SystemTime),
}

/// What [`PresenceClient::consume`](crate::PresenceClient::consume) asks
/// for. Build it from [`ConsumeOptions::new`] and override what differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumeOptions {
    /// The group: 1 to 128 bytes of letters, digits, `.`, `_` and `-`, not
    /// starting with `_`. Groups read independently of each other; a
    /// group's members share its partitions.
    pub group: String,
    /// This member's name, unique among the group's live members, same rules.
    /// Empty: the server picks one (a new one on each reconnect).
    pub consumer: String,
    /// Where the group starts if it is new. Default: [`FeedStart::Latest`].
    pub start: FeedStart,
    /// Most changes in one batch, 1 to 1000; 0 lets the server pick (100).
    pub max_batch: u32,
    /// How long a delivered batch may stay unacknowledged before another
    /// member (or this one, after a reconnect) gets it again: 1 s to 1 h;
    /// zero lets the server pick (30 s).
    pub ack_timeout: Duration,
}

impl ConsumeOptions {
    /// Options for a member of `group` with the server's defaults.
    pub fn new(group: impl Into<String>) -> Self {
        Self {
            group: group.into(),
            consumer: String::new(),
            start: FeedStart::Latest,
            max_batch: 0,
            ack_timeout: Duration::ZERO,
        }
    }

    fn start_request(&self) -> ConsumeRequest {
        let (start_from, start_unix_ms) = match self.start {
            FeedStart::Latest => (StartPosition::Latest, 0),
            FeedStart::Oldest => (StartPosition::Oldest, 0),
            FeedStart::At(at) => (StartPosition::Time, crate::client::unix_ms(at)),
        };
        ConsumeRequest {
            request: Some(consume_request::Request::Start(ConsumeStart {
                group: self.group.clone(),
                consumer: self.consumer.clone(),
                start_from: start_from as i32,
                start_unix_ms,
                max_batch: self.max_batch,
                // Past u32 milliseconds (49 days) is far above the server's
                // bound: saturate and let the server refuse it.
                ack_timeout_ms: u32::try_from(self.ack_timeout.as_millis()).unwrap_or(u32::MAX),
            })),
        }
    }
}

/// Changes of one partition, in log order, to acknowledge with
/// [`Consumer::ack`] once handled.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedBatch {
    /// The server's id of the batch on the stream that delivered it.
    pub id: u64,
    /// The partition all of `events` come from.
    pub partition: u32,
    /// The changes: per user in version order.
    pub events: Vec<ChangeEvent>,
    /// The stream that delivered the batch: an ack makes sense only on it.
    stream: u64,
}

/// One thing a [`Consumer`] reports.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedUpdate {
    /// The partitions this member reads now: first after every (re)connect,
    /// then whenever members join or leave the group.
    Assigned(Assignment),
    /// Changes to handle, then acknowledge.
    Batch(FeedBatch),
    /// The stream broke and the consumer is reconnecting (after a backoff
    /// delay). Batches not acknowledged before come again, to this member or
    /// another, once their ack timeout passed.
    Reconnecting {
        /// 1 for the first attempt after the stream was lost.
        attempt: u32,
        /// Why, in words.
        reason: String,
    },
}

/// A member of a consumer group, returned by
/// [`PresenceClient::consume`](crate::PresenceClient::consume).
///
/// Call [`next`](Self::next) for batches and assignment changes and
/// [`ack`](Self::ack) each batch once it is handled: a partition's next
/// batch comes only after its previous one is acknowledged. Delivery is at
/// least once: a change can come twice, always with the same version, so
/// drop a change whose version you have already handled for that user.
///
/// It reconnects by itself after a broken stream, a server drain or
/// restart, on the next endpoint with exponential backoff, reporting
/// [`FeedUpdate::Reconnecting`]. That is safe because the group's position
/// and its unacknowledged changes live on the server. It ends with one `Err`
/// on an error retrying cannot fix (`Unauthenticated` without a token
/// provider, `PermissionDenied`, `InvalidArgument`). Dropping it leaves the
/// group at once: its partitions go to the other members.
pub struct Consumer {
    connector: Arc<Connector>,
    options: ConsumeOptions,
    open: Option<Open>,
    /// Streams opened so far; the current one's number tags its batches.
    streams: u64,
    reconnects: Reconnects,
}

/// An open Consume stream.
struct Open {
    acks: mpsc::Sender<ConsumeRequest>,
    inbound: Streaming<ConsumeResponse>,
    generation: u64,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("group", &self.options.group)
            .field("consumer", &self.options.consumer)
            .finish_non_exhaustive()
    }
}

/// Acks waiting to be sent on one stream. The server holds at most one
/// batch per partition in flight, so a consumer that acks as it goes never
/// fills this; one that does waits in [`Consumer::ack`].
const ACKS_IN_FLIGHT: usize = 64;

impl Consumer {
    /// Joins the group; fails with the error of this first attempt (a bad
    /// group name, a token without the admin scope, an unreachable server).
    pub(crate) async fn join(
        connector: Arc<Connector>,
        backoff: Backoff,
        options: ConsumeOptions,
    ) -> Result<Self, Error> {
        let mut consumer = Self {
            connector,
            options,
            open: None,
            streams: 0,
            reconnects: Reconnects::new(backoff),
        };
        consumer.open().await.map_err(|(error, _)| error)?;
        Ok(consumer)
    }

    /// Opens a stream and sends the start; the server checks the start
    /// before it answers.
    async fn open(&mut self) -> Result<(), (Error, u64)> {
        let lease = self.connector.lease();
        let (acks, outbound) = mpsc::channel(ACKS_IN_FLIGHT);
        acks.try_send(self.options.start_request())
            .expect("a new channel has room for the start");
        let request = tokio_stream::wrappers::ReceiverStream::new(outbound);
        match self.connector.feed(&lease).consume(request).await {
            Ok(response) => {
                self.streams += 1;
                self.open = Some(Open {
                    acks,
                    inbound: response.into_inner(),
                    generation: lease.generation,
                });
                Ok(())
            }
            Err(status) => Err((status.into(), lease.generation)),
        }
    }

    /// The next batch or assignment, reconnecting as needed. `None` only
    /// after an `Err` ended the consumer.
    pub async fn next(&mut self) -> Option<Result<FeedUpdate, Error>> {
        loop {
            if self.reconnects.finished() {
                return None;
            }
            let Some(open) = &mut self.open else {
                self.reconnects.pause().await;
                if let Err((error, generation)) = self.open().await {
                    return Some(self.failed(error, generation).await);
                }
                continue;
            };
            let generation = open.generation;
            let response = match open.inbound.message().await {
                Ok(Some(ConsumeResponse {
                    response: Some(response),
                })) => response,
                // A response of a kind this SDK does not know yet.
                Ok(Some(_)) => continue,
                Ok(None) => {
                    let error = Error::Unavailable("server closed the consume stream".to_owned());
                    return Some(self.failed(error, generation).await);
                }
                Err(status) => return Some(self.failed(status.into(), generation).await),
            };
            self.reconnects.served();
            return Some(Ok(match response {
                consume_response::Response::Assignment(assignment) => {
                    FeedUpdate::Assigned(assignment)
                }
                consume_response::Response::Batch(batch) => FeedUpdate::Batch(FeedBatch {
                    id: batch.batch_id,
                    partition: batch.partition,
                    events: batch.events,
                    stream: self.streams,
                }),
            }));
        }
    }

    /// Acknowledges `batch`: its changes will not come again, and its
    /// partition's next batch may come. Returns false if the stream that
    /// delivered it is gone (the consumer reconnected since): the batch then
    /// comes again after its ack timeout, and acking it on another stream
    /// could acknowledge another batch that happens to have the same id.
    pub async fn ack(&self, batch: &FeedBatch) -> bool {
        let Some(open) = self.open.as_ref().filter(|_| batch.stream == self.streams) else {
            return false;
        };
        let ack = ConsumeRequest {
            request: Some(consume_request::Request::Ack(ConsumeAck {
                batch_id: batch.id,
            })),
        };
        // A stream that broke meanwhile drops the ack; `next` notices.
        open.acks.send(ack).await.is_ok()
    }

    /// The item to yield for a failed attempt or a broken stream.
    async fn failed(&mut self, error: Error, generation: u64) -> Result<FeedUpdate, Error> {
        self.open = None;
        let stream = format!("consumer of group {}", self.options.group);
        let (attempt, reason) = self
            .reconnects
            .after(&self.connector, error, generation, &stream)
            .await?;
        Ok(FeedUpdate::Reconnecting { attempt, reason })
    }
}

/// `ChangeFeed.Tail` from `from` (`None`: from now) on `lease`, once the
/// server answered: one stream, ended by the first error.
pub(crate) async fn tail(
    connector: &Connector,
    lease: &Lease,
    from: Option<SystemTime>,
) -> Result<impl Stream<Item = Result<ChangeEvent, Error>> + Send + 'static + use<>, tonic::Status>
{
    use futures::TryStreamExt;

    let request = TailRequest {
        // 0 asks for "now"; a time before the epoch would be 0 too, so it
        // becomes the oldest instant the server accepts instead.
        from_unix_ms: from.map_or(0, |at| crate::client::unix_ms(at).max(1)),
    };
    let events = connector.feed(lease).tail(request).await?.into_inner();
    Ok(events.map_err(Error::from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn start(options: &ConsumeOptions) -> ConsumeStart {
        match options.start_request().request {
            Some(consume_request::Request::Start(start)) => start,
            other => panic!("not a start: {other:?}"),
        }
    }

    #[test]
    fn the_defaults_leave_the_choices_to_the_server() {
        let sent = start(&ConsumeOptions::new("notify"));
        assert_eq!(sent.group, "notify");
        assert_eq!(sent.consumer, "");
        assert_eq!(sent.start_from(), StartPosition::Latest);
        assert_eq!((sent.max_batch, sent.ack_timeout_ms), (0, 0));
    }

    #[test]
    fn start_positions_and_timeouts_map_to_the_wire() {
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let sent = start(&ConsumeOptions {
            start: FeedStart::At(at),
            ack_timeout: Duration::from_millis(1500),
            ..ConsumeOptions::new("g")
        });
        assert_eq!(sent.start_from(), StartPosition::Time);
        assert_eq!(sent.start_unix_ms, 1_700_000_000_123);
        assert_eq!(sent.ack_timeout_ms, 1500);
        let sent = start(&ConsumeOptions {
            start: FeedStart::Oldest,
            ack_timeout: Duration::from_secs(100 * 24 * 3600),
            ..ConsumeOptions::new("g")
        });
        assert_eq!(sent.start_from(), StartPosition::Oldest);
        // Saturated, for the server to refuse, rather than wrapped into range.
        assert_eq!(sent.ack_timeout_ms, u32::MAX);
    }
}
