//! The unary wrappers, against a scripted fake server (see `fake/`).

mod fake;

use fake::FakeServer;
use futures::TryStreamExt;
use presence_sdk::{ClientConfig, PresenceClient, VisibleStatus};

#[tokio::test]
async fn long_presence_batches_are_split_and_answers_keep_request_order() {
    let server = FakeServer::start(50).await;
    server.publish("u3", VisibleStatus::Busy, 9);
    let config = ClientConfig {
        max_batch: 2,
        ..ClientConfig::with_endpoint(&server.url)
    };
    let client = PresenceClient::connect(config).await.unwrap();
    let ids = ["u1", "u2", "u3", "u4", "u5"];
    let presences = client.get_presence(&ids).await.unwrap();
    let got: Vec<&str> = presences.iter().map(|p| p.user_id.as_str()).collect();
    assert_eq!(got, ids);
    assert_eq!(presences[2].status(), VisibleStatus::Busy);
    assert_eq!(server.log().presence_batches.len(), 3);

    let one = client.get_one("u3").await.unwrap();
    assert_eq!(one.version, 9);
}

#[tokio::test]
async fn history_streams_every_page_in_order() {
    let server = FakeServer::start(50).await;
    let client = server.client().await;
    let entries: Vec<_> = client
        .get_history("alice", None, None)
        .try_collect()
        .await
        .unwrap();
    let versions: Vec<u64> = entries.iter().map(|e| e.version).collect();
    assert_eq!(versions, [0, 1, 2, 3, 4, 5, 6]);
    let requests = &server.log().history_requests;
    assert_eq!(requests.len(), 3);
    assert!(
        requests
            .iter()
            .all(|r| r.user_id == "alice" && r.from_unix_ms == 0 && r.to_unix_ms == 0)
    );
}

#[tokio::test]
async fn contacts_can_be_added_listed_and_removed() {
    let server = FakeServer::start(50).await;
    let client = server.client().await;
    assert_eq!(
        client
            .add_contacts("alice", &["bob", "carol"])
            .await
            .unwrap(),
        2
    );
    assert_eq!(client.add_contacts("alice", &["bob"]).await.unwrap(), 0);
    assert_eq!(
        client.list_contacts(Some("alice")).await.unwrap(),
        ["bob", "carol"]
    );
    assert_eq!(client.remove_contacts("alice", &["bob"]).await.unwrap(), 1);
    assert_eq!(
        client.list_contacts(Some("bob")).await.unwrap(),
        Vec::<String>::new()
    );
}
