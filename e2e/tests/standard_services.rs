//! What generic gRPC tooling relies on: health checking, server reflection
//! (v1 and v1alpha, for grpcurl, Postman and older tools), and gRPC-web with
//! CORS for browsers, all on the one port.

mod support;

use presence_proto::v1 as pb;
use presence_proto::v1::presence_service_client::PresenceServiceClient;
use support::{TestServer, authed, token, user};
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test]
async fn health_reports_serving_then_not_serving_while_draining() {
    let mut server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    for service in [
        "",
        "presence.v1.PresenceService",
        "presence.v1.ContactsService",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "presence.v1.PresenceService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    server.drain();
    let update = tokio::time::timeout(support::VISIBLE_WITHIN, watch.next())
        .await
        .expect("an update while draining");
    assert_eq!(update.unwrap().unwrap().status(), ServingStatus::NotServing);
    server.stop().await;
}

#[tokio::test]
async fn reflection_lists_the_api_in_v1_and_v1alpha() {
    let server = TestServer::start().await;
    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(server.channel().await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            responses.next().await.unwrap().unwrap().message_response
        else {
            panic!("no service list");
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        for expected in [
            "presence.v1.PresenceService",
            "presence.v1.ContactsService",
            "grpc.health.v1.Health",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} in {names:?}"
            );
        }
    }
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(server.channel().await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "presence.v1.PresenceService".into(),
            )),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let response = responses.next().await.unwrap().unwrap().message_response;
        assert!(
            matches!(response, Some(MessageResponse::FileDescriptorResponse(ref files)) if !files.file_descriptor_proto.is_empty()),
            "{response:?}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn grpc_web_over_http1_reaches_the_same_api() {
    let server = TestServer::start().await;
    let bob = user("bob");
    // A real gRPC-web client: HTTP/1.1 only, gRPC-web framing.
    let http1 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(false)
        .build_http();
    let service = tower::ServiceBuilder::new()
        .layer(tonic_web::GrpcWebClientLayer::new())
        .service(http1);
    let mut client = PresenceServiceClient::with_origin(service, server.url().parse().unwrap());

    let touched = client
        .touch(authed(
            pb::TouchRequest {
                device_id: "tab".into(),
                ..Default::default()
            },
            &token(&bob),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(touched.heartbeat_interval_ms > 0);
    let own = client
        .get_presence(authed(
            pb::GetPresenceRequest {
                user_ids: vec![bob.clone()],
            },
            &token(&bob),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.presences[0].status(), pb::VisibleStatus::Online);
    let refused = client
        .get_presence(tonic::Request::new(pb::GetPresenceRequest {
            user_ids: vec![bob],
        }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    server.stop().await;
}

/// A browser's CORS preflight for a gRPC-web call from `origin`.
async fn preflight(server: &TestServer, origin: &str) -> http::Response<hyper::body::Incoming> {
    let http1 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<String>();
    let preflight = http::Request::builder()
        .method("OPTIONS")
        .uri(format!(
            "{}/presence.v1.PresenceService/Touch",
            server.url()
        ))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type,x-grpc-web",
        )
        .body(String::new())
        .unwrap();
    http1.request(preflight).await.unwrap()
}

fn header<'a>(response: &'a http::Response<hyper::body::Incoming>, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .map(|value| value.to_str().unwrap())
}

#[tokio::test]
async fn browsers_may_call_from_any_origin_by_default_without_credentials() {
    let server = TestServer::start().await;
    let response = preflight(&server, "https://app.example").await;
    assert!(response.status().is_success(), "{response:?}");
    assert_eq!(header(&response, "access-control-allow-origin"), Some("*"));
    assert_eq!(header(&response, "access-control-allow-credentials"), None);
    let allowed = header(&response, "access-control-allow-headers").unwrap();
    assert!(allowed.contains("authorization"), "{allowed}");
    server.stop().await;
}

#[tokio::test]
async fn browsers_read_grpc_errors_across_origins() {
    let server = TestServer::start().await;
    let http1 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<String>();
    // A gRPC-web call without a token: the status comes in the headers.
    let call = http::Request::builder()
        .method("POST")
        .uri(format!(
            "{}/presence.v1.PresenceService/Touch",
            server.url()
        ))
        .header("origin", "https://app.example")
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(String::from_utf8(vec![0, 0, 0, 0, 0]).unwrap())
        .unwrap();
    let response = http1.request(call).await.unwrap();
    assert_eq!(header(&response, "grpc-status"), Some("16"), "{response:?}");
    let exposed = header(&response, "access-control-expose-headers").unwrap();
    for needed in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        assert!(
            exposed.contains(needed),
            "{needed} is not exposed: {exposed}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn only_the_configured_origins_may_call_from_a_browser() {
    let server = TestServer::start_with(&[
        "--cors-origins",
        "https://app.example,https://admin.example",
    ])
    .await;
    let response = preflight(&server, "https://admin.example").await;
    assert_eq!(
        header(&response, "access-control-allow-origin"),
        Some("https://admin.example")
    );
    let response = preflight(&server, "https://evil.example").await;
    assert_eq!(header(&response, "access-control-allow-origin"), None);
    server.stop().await;
}
