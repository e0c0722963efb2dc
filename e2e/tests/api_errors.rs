//! Every RPC refuses missing and invalid tokens, other users' data, and
//! malformed or oversized input with the right gRPC code and a clear message,
//! and none of it disturbs anyone else's stream.

mod support;

use std::time::Duration;

use presence_proto::v1::{self as pb, heartbeat_request, presence_event};
use support::{
    RawSession, TestServer, admin_token, authed, befriend, raw_watch, session_beat, session_open,
    token, user,
};
use tokio_stream::StreamExt;
use tonic::Code;

const WRONG_SECRET_TOKEN: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5IiwiZXhwIjo0MTAyNDQ0ODAwLCJpYXQiOjB9.3mZTRzYPnbkbbVbS6BdWbaSW3jQhUDtO8mU7pUT1fb0";

/// Signed with the development secret, expired in 2020.
const EXPIRED_TOKEN: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6MTYwMDAwMDAwMCwiaWF0IjoxNTk5OTkwMDAwfQ.klEbZPE5SihntxJFFxI_C1tnOwmUsBscO2-ygE7GtbU";

/// The tokens every RPC must refuse with UNAUTHENTICATED: none, garbage, a
/// token signed with another secret, an expired one, and a wrong scheme.
fn bad_credentials() -> Vec<(&'static str, Option<String>)> {
    vec![
        ("no token", None),
        ("garbage", Some("Bearer not-a-jwt".into())),
        ("other secret", Some(format!("Bearer {WRONG_SECRET_TOKEN}"))),
        ("wrong scheme", Some(format!("Basic {}", token("alice")))),
        ("expired", Some(format!("Bearer {EXPIRED_TOKEN}"))),
    ]
}

fn with_credentials<T>(message: T, credentials: &Option<String>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = credentials {
        request
            .metadata_mut()
            .insert("authorization", value.parse().unwrap());
    }
    request
}

fn assert_code<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, what: &str) {
    match result {
        Err(status) => {
            assert_eq!(status.code(), code, "{what}: {status:?}");
            assert!(!status.message().is_empty(), "{what}: a message says why");
        }
        Ok(value) => panic!("{what}: expected {code:?}, got {value:?}"),
    }
}

/// `messages` as a request stream that stays open after them, with the
/// metadata of `request`.
fn open_ended<T: Send + 'static>(
    request: tonic::Request<Vec<T>>,
) -> tonic::Request<impl tokio_stream::Stream<Item = T> + Send + 'static> {
    let (metadata, extensions, messages) = request.into_parts();
    let outbound = tokio_stream::iter(messages).chain(tokio_stream::pending());
    tonic::Request::from_parts(metadata, extensions, outbound)
}

/// What a server stream delivered until it ended or went quiet for 5 s, or
/// the error it (or its opening) ended with.
async fn outcome<M>(
    opened: Result<tonic::Response<tonic::Streaming<M>>, tonic::Status>,
) -> Result<Vec<M>, tonic::Status> {
    let mut inbound = opened?.into_inner();
    let mut received = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), inbound.message()).await {
            Ok(Ok(Some(message))) => received.push(message),
            Ok(Ok(None)) => return Ok(received),
            Ok(Err(status)) => return Err(status),
            Err(_) => return Ok(received),
        }
    }
}

/// Sends `messages` on a heartbeat stream and returns the first error the
/// server ends the stream with.
async fn heartbeat_error(
    server: &TestServer,
    request: tonic::Request<Vec<pb::HeartbeatRequest>>,
) -> Result<Vec<pb::HeartbeatResponse>, tonic::Status> {
    let mut presence = server.presence().await;
    outcome(presence.heartbeat(open_ended(request)).await).await
}

/// Sends `messages` on a Consume stream and returns the first error the
/// server ends the stream with.
async fn consume_error(
    server: &TestServer,
    request: tonic::Request<Vec<pb::ConsumeRequest>>,
) -> Result<Vec<pb::ConsumeResponse>, tonic::Status> {
    let mut feed = server.feed().await;
    outcome(feed.consume(open_ended(request)).await).await
}

/// The opening message of a Consume stream.
fn consume_start(start: pb::ConsumeStart) -> pb::ConsumeRequest {
    pb::ConsumeRequest {
        request: Some(pb::consume_request::Request::Start(start)),
    }
}

/// A valid opening message for `group`, with a short ack timeout.
fn valid_start(group: &str) -> pb::ConsumeStart {
    pb::ConsumeStart {
        group: group.into(),
        ack_timeout_ms: 1000,
        ..Default::default()
    }
}

fn consume_ack(batch_id: u64) -> pb::ConsumeRequest {
    pb::ConsumeRequest {
        request: Some(pb::consume_request::Request::Ack(pb::ConsumeAck {
            batch_id,
        })),
    }
}

#[tokio::test]
async fn every_rpc_refuses_missing_and_invalid_tokens() {
    let server = TestServer::start().await;
    for (what, credentials) in bad_credentials() {
        let mut presence = server.presence().await;
        let mut contacts = server.contacts().await;
        let c = &credentials;
        assert_code(
            heartbeat_error(&server, with_credentials(vec![session_open("d")], c)).await,
            Code::Unauthenticated,
            &format!("Heartbeat, {what}"),
        );
        assert_code(
            presence
                .touch(with_credentials(
                    pb::TouchRequest {
                        device_id: "d".into(),
                        ..Default::default()
                    },
                    c,
                ))
                .await,
            Code::Unauthenticated,
            &format!("Touch, {what}"),
        );
        assert_code(
            presence
                .disconnect(with_credentials(
                    pb::DisconnectRequest {
                        device_id: "d".into(),
                    },
                    c,
                ))
                .await,
            Code::Unauthenticated,
            &format!("Disconnect, {what}"),
        );
        assert_code(
            presence
                .set_status(with_credentials(
                    pb::SetStatusRequest {
                        status: 1,
                        ..Default::default()
                    },
                    c,
                ))
                .await,
            Code::Unauthenticated,
            &format!("SetStatus, {what}"),
        );
        assert_code(
            presence
                .get_presence(with_credentials(
                    pb::GetPresenceRequest {
                        user_ids: vec!["bob".into()],
                    },
                    c,
                ))
                .await,
            Code::Unauthenticated,
            &format!("GetPresence, {what}"),
        );
        assert_code(
            presence
                .watch_contacts(with_credentials(pb::WatchContactsRequest::default(), c))
                .await,
            Code::Unauthenticated,
            &format!("WatchContacts, {what}"),
        );
        assert_code(
            presence
                .get_history(with_credentials(
                    pb::GetHistoryRequest {
                        user_id: "bob".into(),
                        ..Default::default()
                    },
                    c,
                ))
                .await,
            Code::Unauthenticated,
            &format!("GetHistory, {what}"),
        );
        assert_code(
            contacts
                .add_contacts(with_credentials(
                    pb::AddContactsRequest {
                        user_id: "a".into(),
                        contact_ids: vec!["b".into()],
                    },
                    c,
                ))
                .await,
            Code::Unauthenticated,
            &format!("AddContacts, {what}"),
        );
        assert_code(
            contacts
                .remove_contacts(with_credentials(
                    pb::RemoveContactsRequest {
                        user_id: "a".into(),
                        contact_ids: vec!["b".into()],
                    },
                    c,
                ))
                .await,
            Code::Unauthenticated,
            &format!("RemoveContacts, {what}"),
        );
        assert_code(
            contacts
                .list_contacts(with_credentials(pb::ListContactsRequest::default(), c))
                .await,
            Code::Unauthenticated,
            &format!("ListContacts, {what}"),
        );
        assert_code(
            consume_error(
                &server,
                with_credentials(vec![consume_start(valid_start("g"))], c),
            )
            .await,
            Code::Unauthenticated,
            &format!("Consume, {what}"),
        );
        assert_code(
            server
                .feed()
                .await
                .tail(with_credentials(pb::TailRequest::default(), c))
                .await,
            Code::Unauthenticated,
            &format!("Tail, {what}"),
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn users_cannot_touch_what_is_not_theirs() {
    let server = TestServer::start().await;
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    befriend(&server, &alice, &[&bob]).await;
    let mut presence = server.presence().await;
    let mut contacts = server.contacts().await;
    let alice_token = token(&alice);

    assert_code(
        contacts
            .add_contacts(authed(
                pb::AddContactsRequest {
                    user_id: alice.clone(),
                    contact_ids: vec![carol.clone()],
                },
                &alice_token,
            ))
            .await,
        Code::PermissionDenied,
        "AddContacts without the admin scope",
    );
    assert_code(
        contacts
            .remove_contacts(authed(
                pb::RemoveContactsRequest {
                    user_id: alice.clone(),
                    contact_ids: vec![bob.clone()],
                },
                &alice_token,
            ))
            .await,
        Code::PermissionDenied,
        "RemoveContacts without the admin scope",
    );
    assert_code(
        contacts
            .list_contacts(authed(
                pb::ListContactsRequest {
                    user_id: bob.clone(),
                    ..Default::default()
                },
                &alice_token,
            ))
            .await,
        Code::PermissionDenied,
        "ListContacts of another user",
    );
    assert_code(
        presence
            .get_history(authed(
                pb::GetHistoryRequest {
                    user_id: carol.clone(),
                    ..Default::default()
                },
                &alice_token,
            ))
            .await,
        Code::PermissionDenied,
        "GetHistory of a stranger",
    );
    assert_code(
        presence
            .watch_contacts(authed(
                pb::WatchContactsRequest {
                    user_ids: vec![carol.clone()],
                    ..Default::default()
                },
                &alice_token,
            ))
            .await,
        Code::PermissionDenied,
        "WatchContacts naming users without the admin scope",
    );

    // What is allowed: her own contacts, her contacts' history, and anything
    // for an admin.
    let own = contacts
        .list_contacts(authed(pb::ListContactsRequest::default(), &alice_token))
        .await
        .unwrap();
    assert_eq!(own.into_inner().contact_ids, vec![bob.clone()]);
    presence
        .get_history(authed(
            pb::GetHistoryRequest {
                user_id: bob.clone(),
                ..Default::default()
            },
            &alice_token,
        ))
        .await
        .unwrap();
    presence
        .get_history(authed(
            pb::GetHistoryRequest {
                user_id: carol.clone(),
                ..Default::default()
            },
            &admin_token(),
        ))
        .await
        .unwrap();
    contacts
        .list_contacts(authed(
            pb::ListContactsRequest {
                user_id: bob,
                ..Default::default()
            },
            &admin_token(),
        ))
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn malformed_and_oversized_input_is_refused() {
    let server = TestServer::start().await;
    let alice = user("alice");
    let t = token(&alice);
    let mut presence = server.presence().await;
    let mut contacts = server.contacts().await;
    let long_id = "x".repeat(129);
    let many: Vec<String> = (0..101).map(|i| format!("u{i}")).collect();

    // Heartbeat: the first message must be an open, with a valid device.
    for (what, messages) in [
        ("first message a beat", vec![session_beat(1)]),
        (
            "empty request",
            vec![pb::HeartbeatRequest { request: None }],
        ),
        ("empty device id", vec![session_open("")]),
        ("oversized device id", vec![session_open(&long_id)]),
        (
            "control characters in the device id",
            vec![session_open("dev\u{0}ice")],
        ),
        ("a second open", vec![session_open("d"), session_open("d")]),
        (
            "an unknown platform",
            vec![pb::HeartbeatRequest {
                request: Some(heartbeat_request::Request::Open(pb::SessionOpen {
                    device_id: "d".into(),
                    platform: 99,
                    ..Default::default()
                })),
            }],
        ),
        (
            "an unknown activity in a beat",
            vec![
                session_open("d"),
                pb::HeartbeatRequest {
                    request: Some(heartbeat_request::Request::Beat(pb::SessionBeat {
                        seq: 1,
                        activity: 7,
                        ..Default::default()
                    })),
                },
            ],
        ),
        (
            "a custom message over the limit",
            vec![
                session_open("d"),
                pb::HeartbeatRequest {
                    request: Some(heartbeat_request::Request::Beat(pb::SessionBeat {
                        seq: 1,
                        status: pb::UserStatus::Busy as i32,
                        custom_message: "m".repeat(257),
                        ..Default::default()
                    })),
                },
            ],
        ),
    ] {
        assert_code(
            heartbeat_error(&server, authed(messages, &t)).await,
            Code::InvalidArgument,
            &format!("Heartbeat, {what}"),
        );
    }

    assert_code(
        presence
            .touch(authed(pb::TouchRequest::default(), &t))
            .await,
        Code::InvalidArgument,
        "Touch without a device",
    );
    assert_code(
        presence
            .touch(authed(
                pb::TouchRequest {
                    device_id: "d".into(),
                    platform: 42,
                    ..Default::default()
                },
                &t,
            ))
            .await,
        Code::InvalidArgument,
        "Touch with an unknown platform",
    );
    assert_code(
        presence
            .disconnect(authed(
                pb::DisconnectRequest {
                    device_id: long_id.clone(),
                },
                &t,
            ))
            .await,
        Code::InvalidArgument,
        "Disconnect, oversized id",
    );
    assert_code(
        presence
            .set_status(authed(pb::SetStatusRequest::default(), &t))
            .await,
        Code::InvalidArgument,
        "SetStatus without a status",
    );
    assert_code(
        presence
            .set_status(authed(
                pb::SetStatusRequest {
                    status: 9,
                    ..Default::default()
                },
                &t,
            ))
            .await,
        Code::InvalidArgument,
        "SetStatus with an unknown status",
    );
    assert_code(
        presence
            .set_status(authed(
                pb::SetStatusRequest {
                    status: 1,
                    custom_message: "m".repeat(257),
                },
                &t,
            ))
            .await,
        Code::InvalidArgument,
        "SetStatus with an oversized message",
    );
    assert_code(
        presence
            .get_presence(authed(pb::GetPresenceRequest::default(), &t))
            .await,
        Code::InvalidArgument,
        "GetPresence, no ids",
    );
    assert_code(
        presence
            .get_presence(authed(
                pb::GetPresenceRequest {
                    user_ids: many.clone(),
                },
                &t,
            ))
            .await,
        Code::InvalidArgument,
        "GetPresence, batch too large",
    );
    assert_code(
        presence
            .get_presence(authed(
                pb::GetPresenceRequest {
                    user_ids: vec![String::new()],
                },
                &t,
            ))
            .await,
        Code::InvalidArgument,
        "GetPresence, empty id",
    );
    assert_code(
        presence
            .get_history(authed(
                pb::GetHistoryRequest {
                    user_id: alice.clone(),
                    page_size: 5000,
                    ..Default::default()
                },
                &t,
            ))
            .await,
        Code::InvalidArgument,
        "GetHistory, page too large",
    );
    assert_code(
        presence
            .get_history(authed(
                pb::GetHistoryRequest {
                    user_id: alice.clone(),
                    page_token: "not-a-token".into(),
                    ..Default::default()
                },
                &t,
            ))
            .await,
        Code::InvalidArgument,
        "GetHistory, foreign page token",
    );
    assert_code(
        presence
            .get_history(authed(
                pb::GetHistoryRequest {
                    user_id: alice.clone(),
                    from_unix_ms: 2_000,
                    to_unix_ms: 1_000,
                    ..Default::default()
                },
                &t,
            ))
            .await,
        Code::InvalidArgument,
        "GetHistory, window ends before it starts",
    );
    assert_code(
        contacts
            .add_contacts(authed(
                pb::AddContactsRequest {
                    user_id: alice.clone(),
                    contact_ids: many,
                },
                &admin_token(),
            ))
            .await,
        Code::InvalidArgument,
        "AddContacts, batch too large",
    );
    assert_code(
        contacts
            .add_contacts(authed(
                pb::AddContactsRequest {
                    user_id: String::new(),
                    contact_ids: vec!["b".into()],
                },
                &admin_token(),
            ))
            .await,
        Code::InvalidArgument,
        "AddContacts, no user",
    );
    assert_code(
        contacts
            .remove_contacts(authed(
                pb::RemoveContactsRequest {
                    user_id: alice.clone(),
                    contact_ids: vec![],
                },
                &admin_token(),
            ))
            .await,
        Code::InvalidArgument,
        "RemoveContacts, no ids",
    );
    assert_code(
        contacts
            .list_contacts(authed(
                pb::ListContactsRequest {
                    user_id: long_id,
                    ..Default::default()
                },
                &admin_token(),
            ))
            .await,
        Code::InvalidArgument,
        "ListContacts, oversized id",
    );
    server.stop().await;
}

#[tokio::test]
async fn the_change_feed_is_for_admin_callers_only() {
    let server = TestServer::start().await;
    let alice = token(&user("alice"));
    assert_code(
        consume_error(
            &server,
            authed(vec![consume_start(valid_start("g"))], &alice),
        )
        .await,
        Code::PermissionDenied,
        "Consume without the admin scope",
    );
    assert_code(
        server
            .feed()
            .await
            .tail(authed(pb::TailRequest::default(), &alice))
            .await,
        Code::PermissionDenied,
        "Tail without the admin scope",
    );
    server.stop().await;
}

#[tokio::test]
async fn malformed_feed_requests_are_refused() {
    let server = TestServer::start().await;
    let admin = admin_token();
    let start = |change: fn(&mut pb::ConsumeStart)| {
        let mut start = valid_start("g");
        change(&mut start);
        vec![consume_start(start)]
    };
    for (what, messages) in [
        (
            "an empty first message",
            vec![pb::ConsumeRequest { request: None }],
        ),
        ("an ack before the start", vec![consume_ack(1)]),
        ("no group", start(|s| s.group.clear())),
        ("an oversized group", start(|s| s.group = "g".repeat(129))),
        (
            "a group of the server's",
            start(|s| s.group = "_history".into()),
        ),
        (
            "a space in the group",
            start(|s| s.group = "my group".into()),
        ),
        ("a non-ASCII group", start(|s| s.group = "grüße".into())),
        (
            "a consumer of the server's",
            start(|s| s.consumer = "_me".into()),
        ),
        (
            "a slash in the consumer",
            start(|s| s.consumer = "a/b".into()),
        ),
        ("max_batch above 1000", start(|s| s.max_batch = 1001)),
        (
            "an ack timeout under 1 s",
            start(|s| s.ack_timeout_ms = 999),
        ),
        (
            "an ack timeout over 1 h",
            start(|s| s.ack_timeout_ms = 3_600_001),
        ),
        ("an unknown start position", start(|s| s.start_from = 99)),
        (
            "a start time of 0",
            start(|s| s.start_from = pb::StartPosition::Time as i32),
        ),
        (
            "a negative start time",
            start(|s| {
                s.start_from = pb::StartPosition::Time as i32;
                s.start_unix_ms = -5;
            }),
        ),
        (
            "a second start",
            vec![
                consume_start(valid_start("g")),
                consume_start(valid_start("g")),
            ],
        ),
    ] {
        assert_code(
            consume_error(&server, authed(messages, &admin)).await,
            Code::InvalidArgument,
            &format!("Consume, {what}"),
        );
    }
    assert_code(
        server
            .feed()
            .await
            .tail(authed(pb::TailRequest { from_unix_ms: -1 }, &admin))
            .await,
        Code::InvalidArgument,
        "Tail, a negative from_unix_ms",
    );

    // Nothing above hurt the server: a valid member joins and is assigned.
    let joined = consume_error(
        &server,
        authed(vec![consume_start(valid_start("g"))], &admin),
    );
    let received = tokio::time::timeout(Duration::from_secs(10), joined).await;
    assert!(
        matches!(&received, Ok(Ok(responses)) if matches!(
            responses.first().and_then(|r| r.response.as_ref()),
            Some(pb::consume_response::Response::Assignment(_))
        )),
        "{received:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn limits_answer_resource_exhausted() {
    let server = TestServer::start_with(&[
        "--max-sessions-per-user",
        "2",
        "--max-watches-per-user",
        "1",
        "--max-contacts",
        "2",
    ])
    .await;
    let alice = user("alice");
    let t = token(&alice);

    // A third device.
    let mut presence = server.presence().await;
    for device in ["one", "two"] {
        presence
            .touch(authed(
                pb::TouchRequest {
                    device_id: device.into(),
                    ..Default::default()
                },
                &t,
            ))
            .await
            .unwrap();
    }
    assert_code(
        presence
            .touch(authed(
                pb::TouchRequest {
                    device_id: "three".into(),
                    ..Default::default()
                },
                &t,
            ))
            .await,
        Code::ResourceExhausted,
        "a device over the per-user limit",
    );

    // A second watch.
    let _first = presence
        .watch_contacts(authed(pb::WatchContactsRequest::default(), &t))
        .await
        .unwrap();
    let mut second = presence
        .watch_contacts(authed(pb::WatchContactsRequest::default(), &t))
        .await;
    if let Ok(stream) = &mut second {
        let first_item = stream.get_mut().message().await;
        assert_code(
            first_item,
            Code::ResourceExhausted,
            "a watch over the per-user limit",
        );
    } else {
        assert_code(
            second,
            Code::ResourceExhausted,
            "a watch over the per-user limit",
        );
    }

    // Too many contacts.
    assert_code(
        server
            .contacts()
            .await
            .add_contacts(authed(
                pb::AddContactsRequest {
                    user_id: alice.clone(),
                    contact_ids: vec!["a".into(), "b".into(), "c".into()],
                },
                &admin_token(),
            ))
            .await,
        Code::ResourceExhausted,
        "contacts over the limit",
    );

    // Beats faster than allowed end that stream, and only that stream.
    let flood: Vec<_> = std::iter::once(session_open("flood"))
        .chain((0..50).map(session_beat))
        .collect();
    let bob = user("bob");
    assert_code(
        heartbeat_error(&server, authed(flood, &token(&bob))).await,
        Code::ResourceExhausted,
        "heartbeats over the rate",
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_input_on_one_stream_leaves_other_streams_alone() {
    let server = TestServer::start().await;
    let (alice, bob, mallory) = (user("alice"), user("bob"), user("mallory"));
    befriend(&server, &alice, &[&bob]).await;
    let mut presence = server.presence().await;
    let mut watch = raw_watch(presence.clone(), &alice).await;

    // Mallory misbehaves on the same connection and on her own.
    for messages in [
        vec![session_beat(1)],
        vec![session_open("")],
        vec![session_open("m"), session_open("m")],
    ] {
        assert!(
            heartbeat_error(&server, authed(messages, &token(&mallory)))
                .await
                .is_err()
        );
    }
    presence
        .set_status(authed(
            pb::SetStatusRequest {
                status: 77,
                ..Default::default()
            },
            &token(&mallory),
        ))
        .await
        .unwrap_err();

    // Bob comes online; alice's stream still works.
    let _bob_session = RawSession::open(presence.clone(), &bob, "phone").await;
    let event = tokio::time::timeout(support::VISIBLE_WITHIN, watch.message())
        .await
        .expect("alice's watch still delivers")
        .unwrap()
        .unwrap();
    let Some(presence_event::Event::Presence(p)) = event.event else {
        panic!("{event:?}")
    };
    assert_eq!(p.user_id, bob);
    assert_eq!(p.status, pb::VisibleStatus::Online as i32);
    server.stop().await;
}
