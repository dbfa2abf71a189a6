//! The REST surface over real HTTP: every `/v1` route, health, readiness, metrics, the OpenAPI
//! document, the API reference and the web page. Errors are `{"error":{"code","message"}}`
//! with the status that matches the code.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{
    TestServer, WsClient, all_events, assert_error_body, assert_gap_free, get_json, http,
    post_json, token, with_tokens,
};
use conclave::protocol::Role;
use serde_json::{Value, json};

async fn delete(url: &str, bearer: Option<&str>) -> (u16, Value) {
    let mut request = http().delete(url);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("DELETE {url}: {e}"));
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn get_text(url: &str) -> (u16, String, String) {
    let response = http()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, content_type, response.text().await.expect("body"))
}

fn check_session_view(view: &Value, id: &str) {
    assert_eq!(view["id"], id, "{view}");
    assert!(view["title"].is_string(), "{view}");
    let created = view["created_at"]
        .as_str()
        .unwrap_or_else(|| panic!("no created_at: {view}"));
    chrono::DateTime::parse_from_rfc3339(created)
        .unwrap_or_else(|e| panic!("created_at {created:?} is not RFC 3339: {e}"));
    assert!(view["offset"].is_u64(), "{view}");
    assert!(view["docs"].is_array(), "{view}");
    assert!(view["members"].is_array(), "{view}");
    assert!(view.get("owner").is_some(), "no owner field: {view}");
}

#[tokio::test]
async fn health_readiness_metrics_openapi_docs_and_page() {
    let server = TestServer::sqlite();
    let base = server.http_url();

    let (status, body) = get_json(&format!("{base}/healthz")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = get_json(&format!("{base}/readyz")).await;
    assert_eq!(status, 200, "{body}");

    // Make every series exist: a connection, a message in, a commit and an error.
    let mut client = WsClient::connect_hello(&server.ws_url(), "metered").await;
    client.join("metered", None, None).await;
    client.chat("metered", "count me").await;
    client.send_text("not json").await;
    client.recv_until(|f| f["type"] == "error").await;

    let (status, content_type, text) = get_text(&format!("{base}/metrics")).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        content_type.starts_with("text/plain"),
        "metrics content type {content_type}"
    );
    for series in [
        "conclave_connections",
        "conclave_messages_in_total",
        "conclave_commit_seconds",
        "conclave_errors_total",
    ] {
        assert!(text.contains(series), "/metrics lacks {series}:\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("conclave_errors_total") && l.contains("bad_request")),
        "the bad_request error was not counted:\n{text}"
    );

    let (status, openapi) = get_json(&format!("{base}/openapi.json")).await;
    assert_eq!(status, 200);
    assert!(
        openapi["openapi"].is_string(),
        "not an OpenAPI document: {openapi}"
    );
    let paths = openapi["paths"].as_object().expect("paths");
    for path in [
        "/v1/sessions",
        "/v1/sessions/{id}",
        "/v1/sessions/{id}/events",
        "/v1/sessions/{id}/messages",
    ] {
        assert!(
            paths.contains_key(path),
            "openapi.json lacks {path}: {:?}",
            paths.keys()
        );
    }

    let (status, content_type, html) = get_text(&format!("{base}/docs/")).await;
    assert_eq!(status, 200, "/docs/: {html}");
    assert!(
        content_type.starts_with("text/html"),
        "/docs/ content type {content_type}"
    );
    assert!(html.to_lowercase().contains("<html"), "/docs/ is not HTML");

    let (status, content_type, html) = get_text(&format!("{base}/docs")).await;
    assert_eq!(status, 200, "/docs (redirected): {html}");
    assert!(
        content_type.starts_with("text/html"),
        "/docs content type {content_type}"
    );

    let (status, content_type, html) = get_text(&format!("{base}/")).await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("text/html"),
        "/ content type {content_type}"
    );
    assert!(html.to_lowercase().contains("<html"), "/ is not HTML");

    let (status, body) = get_json(&format!("{base}/no/such/page")).await;
    assert_eq!(status, 404);
    assert_error_body(&body, "not_found");
}

#[tokio::test]
async fn create_get_and_list_sessions() {
    let server = TestServer::sqlite();
    let base = server.http_url();
    let sessions = format!("{base}/v1/sessions");

    let (status, body) = post_json(&sessions, &json!({"id": "alpha", "title": "Alpha"})).await;
    assert_eq!(status, 201, "{body}");
    check_session_view(&body, "alpha");
    assert_eq!(body["title"], "Alpha");
    assert_eq!(body["offset"], 0);

    // A duplicate is a conflict; a bad id is a bad request.
    let (status, body) = post_json(&sessions, &json!({"id": "alpha", "title": "again"})).await;
    assert_eq!(status, 409, "{body}");
    assert_error_body(&body, "conflict");
    for bad in ["bad id", "", "slash/no", &"x".repeat(129)] {
        let (status, body) = post_json(&sessions, &json!({"id": bad, "title": "t"})).await;
        assert_eq!(status, 400, "id {bad:?}: {body}");
        assert_error_body(&body, "bad_request");
    }
    // A body that is not the expected JSON is a bad request too.
    let response = http()
        .post(&sessions)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status().as_u16(), 400);
    assert_error_body(
        &response.json::<Value>().await.expect("json"),
        "bad_request",
    );

    // No id: the server makes a UUIDv7.
    let (status, body) = post_json(&sessions, &json!({"title": "anonymous"})).await;
    assert_eq!(status, 201, "{body}");
    let made = body["id"].as_str().expect("id").to_owned();
    let uuid = uuid::Uuid::parse_str(&made).unwrap_or_else(|e| panic!("{made} is no UUID: {e}"));
    assert_eq!(uuid.get_version_num(), 7, "{made} is not a UUIDv7");
    check_session_view(&body, &made);

    // GET one, and 404 for one that does not exist.
    let (status, body) = get_json(&format!("{sessions}/alpha")).await;
    assert_eq!(status, 200, "{body}");
    check_session_view(&body, "alpha");
    assert_eq!(body["title"], "Alpha");
    let (status, body) = get_json(&format!("{sessions}/missing")).await;
    assert_eq!(status, 404, "{body}");
    assert_error_body(&body, "not_found");
    let (status, body) = get_json(&format!("{sessions}/bad%20id")).await;
    assert_eq!(status, 400, "{body}");
    assert_error_body(&body, "bad_request");

    // A live session shows its members and its owner node.
    let mut client = WsClient::connect_hello(&server.ws_url(), "ada").await;
    client.join("alpha", None, None).await;
    client
        .recv_until(|f| f["type"] == "event" && f["kind"] == "member.joined")
        .await;
    let (status, body) = get_json(&format!("{sessions}/alpha")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["owner"], server.node_id.as_str(), "{body}");
    assert_eq!(body["offset"], 1, "{body}");
    let members = body["members"].as_array().expect("members");
    assert_eq!(members.len(), 1, "{body}");
    assert_eq!(members[0]["id"], client.user_id().as_str(), "{body}");
    assert_eq!(members[0]["name"], "ada", "{body}");

    // Pagination: all sessions, each once, in id order, across pages of two.
    let mut want = BTreeSet::from(["alpha".to_owned(), made.clone()]);
    for i in 0..5 {
        let id = format!("page-{i}");
        let (status, body) = post_json(&sessions, &json!({"id": id, "title": id})).await;
        assert_eq!(status, 201, "{body}");
        want.insert(id);
    }
    let mut got = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..20 {
        let url = match &after {
            Some(cursor) => format!("{sessions}?limit=2&after={cursor}"),
            None => format!("{sessions}?limit=2"),
        };
        let (status, page) = get_json(&url).await;
        assert_eq!(status, 200, "{page}");
        let items = page["sessions"].as_array().expect("sessions");
        assert!(items.len() <= 2, "limit=2 returned {}", items.len());
        for item in items {
            check_session_view(item, item["id"].as_str().expect("id"));
            got.push(item["id"].as_str().expect("id").to_owned());
        }
        match page["next"].as_str() {
            Some(next) => {
                assert_eq!(
                    Some(next),
                    items.last().and_then(|i| i["id"].as_str()),
                    "{page}"
                );
                after = Some(next.to_owned());
            }
            None => break,
        }
    }
    let want: Vec<String> = want.into_iter().collect();
    assert_eq!(got, want, "paginated listing");
    let (status, page) = get_json(&format!("{sessions}?limit=1000")).await;
    assert_eq!(status, 200);
    assert_eq!(
        page["sessions"].as_array().expect("sessions").len(),
        want.len()
    );
    assert!(page["next"].is_null(), "a partial page has no next: {page}");
    let (status, body) = get_json(&format!("{sessions}?limit=many")).await;
    assert_eq!(status, 400, "{body}");
    assert_error_body(&body, "bad_request");
}

#[tokio::test]
async fn delete_archives_and_tells_the_members() {
    let server = TestServer::sqlite_with(with_tokens);
    let admin = token("root", Role::Admin);
    let admin = Some(admin.as_str());
    let base = server.http_url();
    let url = format!("{base}/v1/sessions/doomed");
    let (status, body) = post_json(
        &format!("{base}/v1/sessions"),
        &json!({"id": "doomed", "title": "x"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    let mut member = WsClient::connect_hello(&server.ws_url(), "ada").await;
    member.join("doomed", None, None).await;

    // Archiving is for admins: an anonymous editor is refused, and nothing happens.
    let (status, body) = delete(&url, None).await;
    assert_eq!(status, 403, "{body}");
    assert_error_body(&body, "forbidden");
    let (status, body) = delete(&url, Some(&token("ed", Role::Editor))).await;
    assert_eq!(status, 403, "{body}");
    assert_error_body(&body, "forbidden");
    let (status, body) = get_json(&url).await;
    assert_eq!(status, 200, "a refused delete archived the session: {body}");

    let (status, body) = delete(&url, admin).await;
    assert_eq!(status, 204, "{body}");
    let archived = member.recv_until(|f| f["type"] == "archived").await;
    assert_eq!(archived, json!({"type": "archived", "session": "doomed"}));
    let (status, body) = get_json(&url).await;
    assert_eq!(status, 404, "{body}");
    assert_error_body(&body, "not_found");
    let (status, body) = delete(&url, admin).await;
    assert_eq!(status, 404, "{body}");
    assert_error_body(&body, "not_found");
    let (status, body) = get_json(&format!("{url}/events")).await;
    assert_eq!(status, 404, "{body}");
    assert_error_body(&body, "not_found");
    let (status, body) = post_json(&format!("{url}/messages"), &json!({"text": "hello?"})).await;
    assert_eq!(status, 404, "{body}");
    assert_error_body(&body, "not_found");
    let (_, page) = get_json(&format!("{base}/v1/sessions")).await;
    assert!(
        page["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .all(|s| s["id"] != "doomed"),
        "an archived session is still listed: {page}"
    );

    // Joining it again is refused: it is gone, not recreated empty.
    let mut late = WsClient::connect_hello(&server.ws_url(), "bea").await;
    late.send(json!({"type": "join", "ref": "rejoin", "session": "doomed"}))
        .await;
    let reply = late.recv().await;
    assert_eq!(
        reply["type"], "error",
        "joining an archived session: {reply}"
    );
    assert_eq!(reply["code"], "not_found", "{reply}");
    assert_eq!(reply["ref"], "rejoin", "{reply}");

    let (status, body) = delete(&format!("{base}/v1/sessions/never-was"), admin).await;
    assert_eq!(status, 404, "{body}");
    assert_error_body(&body, "not_found");
}

#[tokio::test]
async fn messages_and_events() {
    let server = TestServer::sqlite();
    let base = server.http_url();
    let (status, body) = post_json(
        &format!("{base}/v1/sessions"),
        &json!({"id": "talk", "title": "t"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    let mut member = WsClient::connect_hello(&server.ws_url(), "ada").await;
    member.join("talk", None, None).await;
    let own = member
        .recv_until(|f| f["type"] == "event" && f["kind"] == "member.joined")
        .await;
    assert_eq!(own["offset"], 1);

    // A posted message gets its offset, and the member sees it as an event.
    let messages = format!("{base}/v1/sessions/talk/messages");
    let mut offsets = Vec::new();
    for i in 0..5 {
        let (status, body) = post_json(
            &messages,
            &json!({"text": format!("rest-{i}"), "name": "bot"}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let offset = body["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("no offset: {body}"));
        offsets.push(offset);
        let event = member.recv_until(|f| f["type"] == "event").await;
        assert_eq!(event["offset"].as_u64(), Some(offset), "{event}");
        assert_eq!(event["kind"], "chat", "{event}");
        assert_eq!(event["data"]["text"], format!("rest-{i}"), "{event}");
        assert_eq!(event["actor"]["name"], "bot", "{event}");
    }
    assert_eq!(offsets, vec![2, 3, 4, 5, 6]);

    // Bad posts.
    let (status, body) = post_json(&messages, &json!({"text": ""})).await;
    assert_eq!(status, 400, "empty text: {body}");
    assert_error_body(&body, "bad_request");
    let (status, body) = post_json(&messages, &json!({"words": "no text"})).await;
    assert_eq!(status, 400, "missing text: {body}");
    assert_error_body(&body, "bad_request");
    let (status, body) = post_json(
        &format!("{base}/v1/sessions/nowhere/messages"),
        &json!({"text": "x"}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_error_body(&body, "not_found");

    // Events: all, then a window with after and limit.
    let events_url = format!("{base}/v1/sessions/talk/events");
    let (status, body) = get_json(&events_url).await;
    assert_eq!(status, 200, "{body}");
    let events = body["events"].as_array().expect("events").clone();
    assert_eq!(events.len(), 6, "{body}");
    assert_gap_free(&events, 1);
    assert_eq!(events[0]["kind"], "member.joined");
    for event in &events {
        assert!(
            event["at"].is_string() && event["actor"]["id"].is_string(),
            "{event}"
        );
    }
    let (status, body) = get_json(&format!("{events_url}?after=2&limit=2")).await;
    assert_eq!(status, 200, "{body}");
    let window = body["events"].as_array().expect("events");
    assert_eq!(window.len(), 2, "{body}");
    assert_gap_free(window, 3);
    assert_eq!(window[0]["data"]["text"], "rest-1");
    let (status, body) = get_json(&format!("{events_url}?after=6")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"], json!([]), "nothing after the head: {body}");
    let (status, body) = get_json(&format!("{events_url}?after=-1")).await;
    assert_eq!(status, 400, "{body}");
    assert_error_body(&body, "bad_request");
    let (status, body) = get_json(&format!("{base}/v1/sessions/nowhere/events")).await;
    assert_eq!(status, 404, "{body}");
    assert_error_body(&body, "not_found");

    // A socket chat and REST posts share one log.
    let offset = member.chat("talk", "from the socket").await;
    assert_eq!(offset, 7);
    let log = all_events(&base, "talk").await;
    assert_gap_free(&log, 1);
    assert_eq!(log[6]["data"]["text"], "from the socket");
}

/// A member of a session that an admin archives; returns the member after `archived`.
async fn archived_member(server: &TestServer, session: &str) -> WsClient {
    let admin = token("root", Role::Admin);
    let mut member = WsClient::connect_hello(&server.ws_url(), "ada").await;
    member.join(session, None, None).await;
    let url = format!("{}/v1/sessions/{session}", server.http_url());
    let (status, body) = delete(&url, Some(&admin)).await;
    assert_eq!(status, 204, "{body}");
    member.recv_until(|f| f["type"] == "archived").await;
    member
}

/// After `archived`, the server has forgotten the client's membership: a chat to that session
/// is refused for good (`not_found`, or `bad_request` as for any session not joined), not with
/// `storage_unavailable`, which tells the client to retry what can never succeed.
#[tokio::test]
async fn a_chat_to_an_archived_session_is_refused_for_good() {
    let server = TestServer::sqlite_with(with_tokens);
    let mut member = archived_member(&server, "gone").await;
    member
        .send(json!({"type": "chat", "ref": "after", "session": "gone", "text": "x"}))
        .await;
    let reply = member.recv_until(|f| f["ref"] == "after").await;
    assert_eq!(
        reply["type"], "error",
        "a chat to an archived session: {reply}"
    );
    assert!(
        reply["code"] == "not_found" || reply["code"] == "bad_request",
        "a chat to an archived session should be not_found (or bad_request: not joined), got {reply}"
    );
}

/// Every request gets a reply: a `leave` of an archived session is answered (an `ack`, or an
/// `error` saying the client is not in it), never left unanswered.
#[tokio::test]
async fn a_leave_of_an_archived_session_is_answered() {
    let server = TestServer::sqlite_with(with_tokens);
    let mut member = archived_member(&server, "gone").await;
    member
        .send(json!({"type": "leave", "ref": "leave", "session": "gone"}))
        .await;
    let reply = member.try_recv(Duration::from_secs(3)).await;
    let reply = reply.unwrap_or_else(|| panic!("the leave of an archived session got no reply"));
    assert_eq!(reply["ref"], "leave", "{reply}");
    assert!(
        reply["type"] == "ack" || (reply["type"] == "error" && reply["code"] == "bad_request"),
        "{reply}"
    );
}
