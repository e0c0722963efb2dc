//! `ChangeFeed`: the change log for internal services, over the consumer
//! groups of [`crate::feed`]. Admin callers only.

use std::sync::Arc;
use std::time::Duration;

use presence_proto::v1 as pb;
use presence_proto::v1::change_feed_server::ChangeFeed;
use tonic::{Request, Response, Status, Streaming};

use super::error::ApiError;
use super::{Api, ResponseStream, convert};
use crate::auth::Caller;
use crate::domain::{View, Viewer};
use crate::feed::{Delivery, Feed, MemberOptions};
use crate::quota::{StreamKind, StreamSlot};
use crate::store::{GroupStart, LoggedChange, Offset};

const DEFAULT_BATCH: usize = 100;
const MAX_BATCH: usize = 1000;
const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(30);
const ACK_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);
/// Group and member names: short, printable, safe in a Redis key.
const MAX_NAME_BYTES: usize = 128;
/// Changes a Tail stream reads from one partition at a time.
const TAIL_BATCH: usize = 200;
/// How long a Tail reader waits on one partition before it looks again.
const TAIL_WAIT: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct FeedApi {
    api: Api,
    feed: Arc<Feed>,
}

impl FeedApi {
    pub fn new(api: Api, feed: Arc<Feed>) -> Self {
        FeedApi { api, feed }
    }

    /// The caller of a feed stream, who must be an internal service, and
    /// the stream's place within the caller's bound.
    fn admit<T>(&self, request: &Request<T>) -> Result<(Caller, StreamSlot), ApiError> {
        let caller = self.api.caller(request)?;
        self.api.check_admin(&caller)?;
        let slot = self
            .api
            .node
            .admit_stream(&caller.user_id, StreamKind::Feed)?;
        Ok((caller, slot))
    }
}

fn event(change: LoggedChange) -> pb::ChangeEvent {
    pb::ChangeEvent {
        presence: Some(convert::presence(View::of(
            &change.user_id,
            Some(&change.record),
            Viewer::Admin,
        ))),
        partition: u32::from(change.partition),
        offset: change.offset.to_string(),
    }
}

fn name(value: &str, field: &str) -> Result<(), ApiError> {
    if value.is_empty() || value.len() > MAX_NAME_BYTES {
        return Err(ApiError::InvalidArgument(format!(
            "{field} must be 1 to {MAX_NAME_BYTES} bytes"
        )));
    }
    if value.starts_with('_') {
        return Err(ApiError::InvalidArgument(format!(
            "{field} may not start with '_' (reserved for the server's own groups)"
        )));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(ApiError::InvalidArgument(format!(
            "{field} may hold only letters, digits, '.', '_' and '-'"
        )));
    }
    Ok(())
}

/// Checks the opening message of a Consume stream.
fn member_options(start: pb::ConsumeStart) -> Result<MemberOptions, ApiError> {
    name(&start.group, "group")?;
    let member = if start.consumer.is_empty() {
        format!("member-{:016x}", rand::random::<u64>())
    } else {
        name(&start.consumer, "consumer")?;
        start.consumer
    };
    let position = pb::StartPosition::try_from(start.start_from).map_err(|_| {
        ApiError::InvalidArgument(format!("start_from has no value {}", start.start_from))
    })?;
    let start_at = match position {
        pb::StartPosition::Unspecified | pb::StartPosition::Latest => GroupStart::Latest,
        pb::StartPosition::Oldest => GroupStart::Oldest,
        pb::StartPosition::Time => match u64::try_from(start.start_unix_ms) {
            Ok(ms) if ms > 0 => GroupStart::At(ms),
            _ => {
                return Err(ApiError::InvalidArgument(
                    "START_POSITION_TIME needs a positive start_unix_ms".into(),
                ));
            }
        },
    };
    let max_batch = match start.max_batch as usize {
        0 => DEFAULT_BATCH,
        n if n > MAX_BATCH => {
            return Err(ApiError::InvalidArgument(format!(
                "max_batch is above {MAX_BATCH}"
            )));
        }
        n => n,
    };
    let ack_timeout = match start.ack_timeout_ms {
        0 => DEFAULT_ACK_TIMEOUT,
        ms => Duration::from_millis(u64::from(ms)),
    };
    if !ACK_TIMEOUT_RANGE.contains(&ack_timeout) {
        return Err(ApiError::InvalidArgument(
            "ack_timeout_ms must be from 1 s to 1 h".into(),
        ));
    }
    Ok(MemberOptions {
        group: start.group,
        member,
        start: start_at,
        max_batch,
        ack_timeout,
    })
}

/// What a Consume stream does next.
enum Step {
    Deliver(Option<Delivery>),
    Request(Result<Option<pb::ConsumeRequest>, Status>),
    End(ApiError),
}

fn response(delivery: Delivery) -> pb::ConsumeResponse {
    let response = match delivery {
        Delivery::Assigned {
            owned,
            members,
            partitions,
        } => pb::consume_response::Response::Assignment(pb::Assignment {
            partitions: owned.into_iter().map(u32::from).collect(),
            members: u32::try_from(members).unwrap_or(u32::MAX),
            partition_count: u32::from(partitions),
        }),
        Delivery::Batch(batch) => pb::consume_response::Response::Batch(pb::ChangeBatch {
            batch_id: batch.id,
            partition: u32::from(batch.partition),
            events: batch.changes.into_iter().map(event).collect(),
        }),
    };
    pb::ConsumeResponse {
        response: Some(response),
    }
}

#[tonic::async_trait]
impl ChangeFeed for FeedApi {
    type ConsumeStream = ResponseStream<pb::ConsumeResponse>;
    type TailStream = ResponseStream<pb::ChangeEvent>;

    async fn consume(
        &self,
        request: Request<Streaming<pb::ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        let (caller, slot) = self.admit(&request)?;
        let mut requests = request.into_inner();
        // The stream's body has no deadline (acks come for as long as it
        // lives), so its first message gets the one a request body has.
        let first = tokio::time::timeout(
            self.api.node.config.connections.request_body_timeout,
            requests.message(),
        )
        .await
        .map_err(|_| ApiError::InvalidArgument("no start message in time".into()))?;
        let start = match first? {
            Some(pb::ConsumeRequest {
                request: Some(pb::consume_request::Request::Start(start)),
            }) => start,
            _ => {
                return Err(ApiError::InvalidArgument(
                    "the first message of a Consume stream must be start".into(),
                )
                .into());
            }
        };
        let options = member_options(start)?;
        let mut member = self.feed.join(options).await.map_err(ApiError::from)?;
        let acker = member.acker();
        let drained = self.api.node.drained();
        let expired = tokio::time::sleep(caller.valid_for());
        Ok(Response::new(Box::pin(async_stream::try_stream! {
            let _slot = slot;
            tokio::pin!(drained, expired);
            loop {
                let step = tokio::select! {
                    delivery = member.deliveries.recv() => Step::Deliver(delivery),
                    request = requests.message() => Step::Request(request),
                    () = &mut drained => Step::End(ApiError::Unavailable("the server is draining: consume from another node".into())),
                    () = &mut expired => Step::End(ApiError::Unauthenticated("token expired".into())),
                };
                match step {
                    Step::Deliver(Some(delivery)) => yield response(delivery),
                    Step::Request(request) => match request? {
                        Some(pb::ConsumeRequest { request: Some(pb::consume_request::Request::Ack(ack)) }) => {
                            if acker.send(ack.batch_id).await.is_err() {
                                break;
                            }
                        }
                        Some(_) => Err(ApiError::InvalidArgument("after start, a Consume stream takes only ack".into()))?,
                        None => break,
                    },
                    Step::Deliver(None) => break,
                    Step::End(end) => Err(end)?,
                }
            }
        })))
    }

    async fn tail(
        &self,
        request: Request<pb::TailRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        let (caller, slot) = self.admit(&request)?;
        let from_ms = match request.into_inner().from_unix_ms {
            0 => crate::node::now_ms(),
            ms if ms > 0 => ms,
            _ => {
                return Err(
                    ApiError::InvalidArgument("from_unix_ms may not be negative".into()).into(),
                );
            }
        };
        let after = Offset::before(u64::try_from(from_ms).unwrap_or(0));
        let log = self.feed.log().clone();
        let (send, mut events) = tokio::sync::mpsc::channel::<Result<pb::ChangeEvent, Status>>(
            usize::from(log.partitions()).max(16),
        );
        // One reader per partition; they end when the stream's receiver does.
        for partition in 0..log.partitions() {
            let log = log.clone();
            let send = send.clone();
            tokio::spawn(async move {
                let mut after = after;
                loop {
                    let read = tokio::select! {
                        () = send.closed() => return,
                        read = log.read(partition, after, TAIL_BATCH, TAIL_WAIT) => read,
                    };
                    match read {
                        Ok(changes) => {
                            for change in changes {
                                after = change.offset;
                                if send.send(Ok(event(change))).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(error) => {
                            let _ = send.send(Err(ApiError::from(error).into())).await;
                            return;
                        }
                    }
                }
            });
        }
        drop(send);
        let drained = self.api.node.drained();
        let expired = tokio::time::sleep(caller.valid_for());
        Ok(Response::new(Box::pin(async_stream::try_stream! {
            let _slot = slot;
            tokio::pin!(drained, expired);
            loop {
                let next = tokio::select! {
                    event = events.recv() => Ok(event),
                    () = &mut drained => Err(ApiError::Unavailable("the server is draining: tail from another node".into())),
                    () = &mut expired => Err(ApiError::Unauthenticated("token expired".into())),
                };
                match next? {
                    Some(event) => yield event?,
                    None => break,
                }
            }
        })))
    }
}
