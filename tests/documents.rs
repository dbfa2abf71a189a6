//! Documents over real sockets and REST: JSON edits against a version, rebased when stale,
//! acked with the new version, broadcast as `doc` frames whose ops apply to `version - 1`,
//! listed in `joined`, counted in UTF-16 code units, and refused with the right codes.

mod common;

use std::time::Duration;

use common::{Backend, TestServer, WsClient, assert_error_body, get_json, post_json};
use serde_json::{Value, json};

/// Applies wire ops to a UTF-16 text, as a client would.
fn apply(text: &[u16], ops: &Value) -> Vec<u16> {
    let mut out = Vec::with_capacity(text.len());
    let mut at = 0usize;
    for op in ops
        .as_array()
        .unwrap_or_else(|| panic!("ops is not a list: {ops}"))
    {
        if let Some(n) = op["retain"].as_u64() {
            let end = at + n as usize;
            assert!(
                end <= text.len(),
                "retain {n} past the end of {} units",
                text.len()
            );
            out.extend_from_slice(&text[at..end]);
            at = end;
        } else if let Some(s) = op["insert"].as_str() {
            out.extend(s.encode_utf16());
        } else if let Some(n) = op["delete"].as_u64() {
            at += n as usize;
            assert!(
                at <= text.len(),
                "delete {n} past the end of {} units",
                text.len()
            );
        } else {
            panic!("unknown op component {op}");
        }
    }
    out.extend_from_slice(&text[at..]);
    out
}

/// Sends an edit and returns the reply to it (an ack or an error), skipping other frames.
async fn edit(
    client: &mut WsClient,
    session: &str,
    reference: &str,
    base: u64,
    ops: Value,
) -> Value {
    client
        .send(
            json!({"type": "edit", "ref": reference, "session": session, "doc": "main",
                     "base": base, "ops": ops}),
        )
        .await;
    client.recv_until(|f| f["ref"] == reference).await
}

async fn rest_doc(server: &TestServer, session: &str, doc: &str) -> (u16, Value) {
    get_json(&format!(
        "{}/v1/sessions/{session}/docs/{doc}",
        server.http_url()
    ))
    .await
}

async fn concurrent_edits_converge(backend: Backend) {
    let server = TestServer::start(backend, |_| {});
    let session = "co-edit";
    let mut a = WsClient::connect_hello(&server.ws_url(), "ada").await;
    let mut b = WsClient::connect_hello(&server.ws_url(), "bea").await;
    let mut watcher = WsClient::connect_hello(&server.ws_url(), "watcher").await;
    for client in [&mut a, &mut b, &mut watcher] {
        let joined = client.join(session, None, None).await;
        assert!(joined["docs"].is_array(), "joined without docs: {joined}");
    }

    let ack = edit(&mut a, session, "e1", 0, json!([{"insert": "hello"}])).await;
    assert_eq!(
        ack,
        json!({"type": "ack", "ref": "e1", "doc": "main", "version": 1})
    );

    // Both edit against version 1 at once: one of them is rebased.
    a.send(
        json!({"type": "edit", "ref": "ea", "session": session, "doc": "main", "base": 1,
                  "ops": [{"retain": 5}, {"insert": " world"}]}),
    )
    .await;
    b.send(
        json!({"type": "edit", "ref": "eb", "session": session, "doc": "main", "base": 1,
                  "ops": [{"insert": "Oh, "}]}),
    )
    .await;
    let ack_a = a.recv_until(|f| f["ref"] == "ea").await;
    let ack_b = b.recv_until(|f| f["ref"] == "eb").await;
    let mut versions = vec![
        ack_a["version"]
            .as_u64()
            .unwrap_or_else(|| panic!("{ack_a}")),
        ack_b["version"]
            .as_u64()
            .unwrap_or_else(|| panic!("{ack_b}")),
    ];
    versions.sort_unstable();
    assert_eq!(versions, [2, 3], "acks {ack_a} {ack_b}");

    // The watcher applies every doc frame in order and reaches the server's text.
    let mut text = Vec::new();
    for want in 1..=3u64 {
        let frame = watcher.recv_until(|f| f["type"] == "doc").await;
        assert_eq!(frame["session"], session, "{frame}");
        assert_eq!(frame["doc"], "main", "{frame}");
        assert_eq!(
            frame["version"].as_u64(),
            Some(want),
            "doc frames out of order: {frame}"
        );
        assert!(frame["actor"]["id"].is_string(), "{frame}");
        text = apply(&text, &frame["ops"]);
    }
    let text = String::from_utf16(&text).expect("utf-16");
    assert_eq!(text, "Oh, hello world", "the watcher's copy");
    let (status, doc) = rest_doc(&server, session, "main").await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(
        doc,
        json!({"name": "main", "version": 3, "text": "Oh, hello world"})
    );

    // The sender gets only its ack, never its own doc frame.
    for (who, client, own) in [("ada", &mut a, "ada"), ("bea", &mut b, "bea")] {
        for frame in client.drain(Duration::from_millis(200)).await {
            if frame["type"] == "doc" {
                assert_ne!(
                    frame["actor"]["name"], own,
                    "{who} got its own doc frame: {frame}"
                );
            }
        }
    }

    // A later joiner finds the document in `joined`.
    let mut late = WsClient::connect_hello(&server.ws_url(), "late").await;
    let joined = late.join(session, None, None).await;
    assert_eq!(
        joined["docs"],
        json!([{"name": "main", "version": 3, "text": "Oh, hello world"}]),
        "{joined}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_edits_converge_sqlite() {
    concurrent_edits_converge(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_edits_converge_postgres() {
    concurrent_edits_converge(Backend::Postgres).await;
}

#[tokio::test]
async fn offsets_count_utf16_code_units() {
    let server = TestServer::sqlite();
    let session = "utf16";
    let mut a = WsClient::connect_hello(&server.ws_url(), "ada").await;
    a.join(session, None, None).await;
    let ack = edit(&mut a, session, "1", 0, json!([{"insert": "a😀b"}])).await;
    assert_eq!(ack["version"], 1, "{ack}");
    // "a" is 1 unit, the emoji 2: retain 3 lands between the emoji and "b".
    let ack = edit(
        &mut a,
        session,
        "2",
        1,
        json!([{"retain": 3}, {"insert": "é"}]),
    )
    .await;
    assert_eq!(ack["version"], 2, "{ack}");
    let (_, doc) = rest_doc(&server, session, "main").await;
    assert_eq!(doc["text"], "a😀éb", "{doc}");
    // Splitting the surrogate pair is refused.
    let reply = edit(
        &mut a,
        session,
        "3",
        2,
        json!([{"retain": 2}, {"insert": "x"}]),
    )
    .await;
    assert_eq!(
        reply["type"], "error",
        "a split surrogate pair was accepted: {reply}"
    );
    assert_eq!(reply["code"], "bad_request", "{reply}");
    let (_, doc) = rest_doc(&server, session, "main").await;
    assert_eq!(doc, json!({"name": "main", "version": 2, "text": "a😀éb"}));
}

#[tokio::test]
async fn bad_edits_are_refused_and_change_nothing() {
    let server = TestServer::sqlite();
    let session = "bad-edits";
    let mut a = WsClient::connect_hello(&server.ws_url(), "ada").await;
    a.join(session, None, None).await;
    edit(&mut a, session, "ok", 0, json!([{"insert": "abc"}])).await;

    let cases = [
        ("base ahead", 5, json!([{"insert": "x"}])),
        (
            "retain past the end",
            1,
            json!([{"retain": 4}, {"insert": "x"}]),
        ),
        ("delete past the end", 1, json!([{"delete": 4}])),
        ("zero retain", 1, json!([{"retain": 0}, {"insert": "x"}])),
        ("empty insert", 1, json!([{"insert": ""}])),
        ("unknown component", 1, json!([{"move": 1}])),
        ("ops not a list", 1, json!({"insert": "x"})),
    ];
    for (i, (what, base, ops)) in cases.into_iter().enumerate() {
        let reply = edit(&mut a, session, &format!("bad-{i}"), base, ops).await;
        assert_eq!(reply["type"], "error", "{what} was accepted: {reply}");
        assert_eq!(reply["code"], "bad_request", "{what}: {reply}");
        a.ping_pong().await;
    }
    a.send_text(r#"{"type":"edit","ref":"bad-doc","session":"bad-edits","doc":"no/slash","base":1,"ops":[]}"#)
        .await;
    let reply = a.recv_until(|f| f["ref"] == "bad-doc").await;
    assert_eq!(reply["code"], "bad_request", "a bad doc name: {reply}");
    let (_, doc) = rest_doc(&server, session, "main").await;
    assert_eq!(
        doc,
        json!({"name": "main", "version": 1, "text": "abc"}),
        "a refused edit changed the doc"
    );
}

#[tokio::test]
async fn documents_over_rest() {
    let server = TestServer::sqlite();
    let base = server.http_url();
    let session = "rest-docs";
    let (status, body) = post_json(&format!("{base}/v1/sessions"), &json!({"id": session})).await;
    assert_eq!(status, 201, "{body}");

    // A document reads as version 0 and empty before its first edit.
    let (status, doc) = rest_doc(&server, session, "notes").await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc, json!({"name": "notes", "version": 0, "text": ""}));

    let mut member = WsClient::connect_hello(&server.ws_url(), "ada").await;
    member.join(session, None, None).await;

    let edits = format!("{base}/v1/sessions/{session}/docs/notes/edits");
    let (status, body) = post_json(&edits, &json!({"base": 0, "ops": [{"insert": "one"}]})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"version": 1}));
    let frame = member.recv_until(|f| f["type"] == "doc").await;
    assert_eq!(frame["doc"], "notes", "{frame}");
    assert_eq!(frame["version"], 1, "{frame}");
    assert_eq!(frame["ops"], json!([{"insert": "one"}]), "{frame}");

    // A stale base is rebased.
    let (status, body) = post_json(&edits, &json!({"base": 0, "ops": [{"insert": "zero "}]})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"version": 2}));
    let (_, doc) = rest_doc(&server, session, "notes").await;
    assert_eq!(doc["version"], 2, "{doc}");
    let text = doc["text"].as_str().expect("text");
    assert!(
        text == "zero one" || text == "onezero ",
        "a stale edit was lost: {text:?}"
    );

    let (status, body) = post_json(&edits, &json!({"base": 9, "ops": [{"insert": "x"}]})).await;
    assert_eq!(status, 400, "{body}");
    assert_error_body(&body, "bad_request");
    let (status, body) = post_json(&edits, &json!({"ops": [{"insert": "x"}]})).await;
    assert_eq!(status, 400, "missing base: {body}");
    assert_error_body(&body, "bad_request");
    let (status, body) = rest_doc(&server, session, "bad%20name").await;
    assert_eq!(status, 400, "{body}");
    assert_error_body(&body, "bad_request");
    let (status, body) = rest_doc(&server, "no-such-session", "notes").await;
    assert_eq!(status, 404, "{body}");
    assert_error_body(&body, "not_found");
    let (status, body) = post_json(
        &format!("{base}/v1/sessions/no-such-session/docs/notes/edits"),
        &json!({"base": 0, "ops": [{"insert": "x"}]}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_error_body(&body, "not_found");
}

/// A failed commit of an edit is refused, and the document never shows it, even though the
/// edit was already applied in memory when the commit failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_edit_commit_leaves_no_trace() {
    let server = TestServer::sqlite();
    let session = "doc-flaky";
    let mut a = WsClient::connect_hello(&server.ws_url(), "ada").await;
    a.join(session, None, None).await;
    a.recv_until(|f| f["type"] == "event" && f["kind"] == "member.joined")
        .await;
    let ack = edit(&mut a, session, "1", 0, json!([{"insert": "keep"}])).await;
    assert_eq!(ack["version"], 1, "{ack}");

    server.switch.fail_next_commits(1);
    let reply = edit(&mut a, session, "2", 1, json!([{"insert": "LOST"}])).await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "storage_unavailable", "{reply}");

    // The document is as committed; the next edit is version 2 on top of "keep".
    let (_, doc) = rest_doc(&server, session, "main").await;
    assert_eq!(doc, json!({"name": "main", "version": 1, "text": "keep"}));
    let ack = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let reply = edit(
                &mut a,
                session,
                "3",
                1,
                json!([{"retain": 4}, {"insert": "!"}]),
            )
            .await;
            // A refusal while the session reloads is allowed; an ack must be right.
            if reply["type"] == "ack" {
                return reply;
            }
            assert_eq!(reply["code"], "storage_unavailable", "{reply}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("edits never succeeded again after one failed commit");
    assert_eq!(ack["version"], 2, "{ack}");
    let (_, doc) = rest_doc(&server, session, "main").await;
    assert_eq!(doc, json!({"name": "main", "version": 2, "text": "keep!"}));
}
