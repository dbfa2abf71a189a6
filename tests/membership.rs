//! Membership: `leave` is acked and ends delivery; a user with several connections is one
//! member, joined once and left once; roles and token scopes are enforced per session.

mod common;

use std::time::Duration;

use common::{TestServer, WsClient, all_events, token, with_tokens};
use conclave::protocol::Role;
use serde_json::json;

async fn hello_with_token(server: &TestServer, token: &str) -> WsClient {
    let mut client = WsClient::connect(&server.ws_url()).await;
    client
        .send(json!({"type": "hello", "token": token, "name": "ignored"}))
        .await;
    let welcome = client.recv().await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    client.welcome = Some(welcome);
    client
}

#[tokio::test]
async fn leave_is_acked_and_ends_delivery() {
    let server = TestServer::sqlite();
    let session = "comings-and-goings";
    let mut a = WsClient::connect_hello(&server.ws_url(), "ada").await;
    let mut b = WsClient::connect_hello(&server.ws_url(), "bea").await;
    let a_conn = a.conn_id();
    let a_id = a.user_id();
    a.join(session, None, None).await;
    b.join(session, None, None).await;
    a.send(json!({"type": "presence", "session": session, "state": {"here": true}}))
        .await;
    b.recv_until(|f| f["type"] == "presence" && f["conn"] == a_conn.as_str())
        .await;

    a.send(json!({"type": "leave", "ref": "bye", "session": session}))
        .await;
    let ack = a.recv_until(|f| f["ref"] == "bye").await;
    assert_eq!(
        ack,
        json!({"type": "ack", "ref": "bye"}),
        "leave is acked without an offset"
    );

    // The others see A's presence go and A's member.left.
    let gone = b
        .recv_until(|f| f["type"] == "presence" && f["conn"] == a_conn.as_str())
        .await;
    assert_eq!(gone["gone"], true, "{gone}");
    let left = b
        .recv_until(|f| f["type"] == "event" && f["kind"] == "member.left")
        .await;
    assert_eq!(left["data"]["user"]["id"], a_id.as_str(), "{left}");

    // A gets nothing more from the session, and may no longer write to it.
    b.chat(session, "after ada left").await;
    for frame in a.drain(Duration::from_millis(300)).await {
        assert_ne!(frame["session"], session, "delivered after leave: {frame}");
    }
    a.send(json!({"type": "chat", "ref": "late", "session": session, "text": "x"}))
        .await;
    let reply = a.recv().await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "bad_request", "{reply}");
    assert_eq!(reply["ref"], "late", "{reply}");

    // And may come back.
    let joined = a.join(session, None, None).await;
    let members: Vec<&str> = joined["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["name"].as_str().expect("name"))
        .collect();
    assert_eq!(members.len(), 2, "{joined}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_two_connections_is_one_member() {
    let server = TestServer::sqlite_with(with_tokens);
    let session = "two-tabs";
    let ada = token("ada", Role::Editor);
    let mut tab1 = hello_with_token(&server, &ada).await;
    let mut tab2 = hello_with_token(&server, &ada).await;
    assert_eq!(tab1.user_id(), "ada");
    assert_eq!(tab2.user_id(), "ada");
    assert_ne!(
        tab1.conn_id(),
        tab2.conn_id(),
        "two sockets, two connections"
    );
    let mut watcher = WsClient::connect_hello(&server.ws_url(), "watcher").await;
    watcher.join(session, None, None).await;

    tab1.join(session, None, None).await;
    let joined = tab2.join(session, None, None).await;
    let adas = joined["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter(|m| m["id"] == "ada")
        .count();
    assert_eq!(adas, 1, "one user, one member: {joined}");

    // The first tab closing does not make ada leave; the second does.
    tab1.close().await;
    tab2.chat(session, "still here").await;
    tab2.close().await;
    let left = watcher
        .recv_until(|f| f["type"] == "event" && f["kind"] == "member.left")
        .await;
    assert_eq!(left["data"]["user"]["id"], "ada", "{left}");

    let log = all_events(&server.http_url(), session).await;
    let kinds: Vec<(String, String)> = log
        .iter()
        .filter(|e| e["data"]["user"]["id"] == "ada" || e["kind"] == "chat")
        .map(|e| {
            (
                e["kind"].as_str().expect("kind").to_owned(),
                e["actor"]["id"].as_str().expect("actor").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("member.joined".to_owned(), "ada".to_owned()),
            ("chat".to_owned(), "ada".to_owned()),
            ("member.left".to_owned(), "ada".to_owned()),
        ],
        "ada's membership in the log"
    );
}

#[tokio::test]
async fn roles_and_scopes_are_enforced() {
    let server = TestServer::sqlite_with(with_tokens);
    let base = server.http_url();
    // An editor creates the session; a viewer may read it but not write.
    let mut editor = hello_with_token(&server, &token("ed", Role::Editor)).await;
    editor.join("open", None, None).await;
    editor.chat("open", "hello").await;

    let mut viewer = hello_with_token(&server, &token("vi", Role::Viewer)).await;
    assert_eq!(
        viewer.welcome.as_ref().expect("welcome")["user"]["role"],
        "viewer"
    );
    viewer.join("open", None, None).await;
    viewer
        .send(json!({"type": "chat", "ref": "v1", "session": "open", "text": "nope"}))
        .await;
    let reply = viewer.recv_until(|f| f["ref"] == "v1").await;
    assert_eq!(reply["code"], "forbidden", "a viewer chatted: {reply}");
    // A viewer cannot create a session by joining it.
    viewer
        .send(json!({"type": "join", "ref": "v2", "session": "not-yet"}))
        .await;
    let reply = viewer.recv_until(|f| f["ref"] == "v2").await;
    assert_eq!(
        reply["type"], "error",
        "a viewer created a session: {reply}"
    );
    assert_eq!(reply["code"], "not_found", "{reply}");

    // A token scoped to team-* cannot enter other sessions, on the socket or over REST.
    let auth = conclave::auth::Authenticator::new(Some(common::TEST_SECRET), None, false)
        .expect("authenticator");
    let exp = u64::try_from(chrono::Utc::now().timestamp()).expect("time") + 600;
    let scoped = auth
        .issue(&conclave::auth::Claims {
            sub: "sc".into(),
            name: None,
            role: Role::Editor,
            sessions: Some(vec!["team-*".into()]),
            exp,
        })
        .expect("token");
    let mut limited = hello_with_token(&server, &scoped).await;
    limited.join("team-a", None, None).await;
    limited
        .send(json!({"type": "join", "ref": "s1", "session": "open"}))
        .await;
    let reply = limited.recv_until(|f| f["ref"] == "s1").await;
    assert_eq!(reply["code"], "forbidden", "out of scope: {reply}");
    let response = common::http()
        .get(format!("{base}/v1/sessions/open/events"))
        .bearer_auth(&scoped)
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status().as_u16(), 403);
    common::assert_error_body(&response.json().await.expect("json"), "forbidden");

    // A forged or expired token is refused at hello and over REST.
    let other = conclave::auth::Authenticator::new(Some("another-secret"), None, false)
        .expect("authenticator")
        .issue(&conclave::auth::Claims {
            sub: "mallory".into(),
            name: None,
            role: Role::Admin,
            sessions: None,
            exp,
        })
        .expect("token");
    let mut forged = WsClient::connect(&server.ws_url()).await;
    forged.send(json!({"type": "hello", "token": other})).await;
    let reply = forged.recv().await;
    assert_eq!(
        reply["type"], "error",
        "a forged token was accepted: {reply}"
    );
    assert_eq!(reply["code"], "unauthorized", "{reply}");
    let response = common::http()
        .delete(format!("{base}/v1/sessions/open"))
        .bearer_auth(&other)
        .send()
        .await
        .expect("DELETE");
    assert_eq!(
        response.status().as_u16(),
        401,
        "a forged admin token over REST"
    );
}
