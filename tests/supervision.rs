//! Supervision: a panic in one session actor restarts it from its checkpoint; its connections
//! stay open and get a `reset` with a fresh snapshot; other sessions never notice; a crash loop
//! is given up.

mod common;

use std::time::Duration;

use common::{TestServer, WsClient};
use serde_json::json;

async fn panic_session(server: &TestServer, session: &str) {
    let status = common::http()
        .post(format!(
            "{}/v1/faults/sessions/{session}/panic",
            server.http_url()
        ))
        .send()
        .await
        .expect("fault route")
        .status()
        .as_u16();
    assert_eq!(status, 202, "the fault route did not take");
}

async fn metric(server: &TestServer, name: &str) -> u64 {
    let text = common::http()
        .get(format!("{}/metrics", server.http_url()))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_session_restarts_and_its_clients_recover() {
    let server = TestServer::sqlite();
    let mut victim = WsClient::connect_hello(&server.ws_url(), "victim").await;
    let mut bystander = WsClient::connect_hello(&server.ws_url(), "bystander").await;
    victim.join("crashy", None, None).await;
    bystander.join("calm", None, None).await;
    let before = victim.chat("crashy", "acked before the crash").await;
    // An edit, too: the document must come back from the store.
    victim
        .send(
            json!({"type": "edit", "ref": "e", "session": "crashy", "doc": "main",
                     "base": 0, "ops": [{"insert": "kept"}]}),
        )
        .await;
    let ack = victim.recv_until(|f| f["ref"] == "e").await;
    assert_eq!(ack["version"], 1, "{ack}");

    panic_session(&server, "crashy").await;

    // The victim's socket stays open: it gets reset, then a snapshot with the committed state.
    let reset = victim.recv_until(|f| f["type"] == "reset").await;
    assert_eq!(reset["session"], "crashy");
    let snapshot = victim
        .recv_until(|f| f["type"] == "joined" && f["ref"].is_null())
        .await;
    assert_eq!(snapshot["offset"].as_u64(), Some(before), "{snapshot}");
    assert_eq!(snapshot["docs"][0]["text"], "kept", "{snapshot}");
    assert!(
        snapshot["members"]
            .as_array()
            .is_some_and(|m| m.iter().any(|u| u["name"] == "victim")),
        "the victim is no longer a member: {snapshot}"
    );
    // And it goes on, without rejoining, with gap-free offsets.
    let after = victim.chat("crashy", "after the crash").await;
    assert_eq!(after, before + 1, "offsets jumped across the restart");

    // The other session never noticed.
    bystander.chat("calm", "all quiet").await;
    let extra = bystander.drain(Duration::from_millis(200)).await;
    assert!(
        extra.iter().all(|f| f["type"] != "reset"),
        "a bystander was reset: {extra:?}"
    );
    assert!(metric(&server, "conclave_actor_panics_total").await >= 1);
    assert!(metric(&server, "conclave_actor_restarts_total").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_is_given_up() {
    let server = TestServer::sqlite();
    let mut client = WsClient::connect_hello(&server.ws_url(), "looper").await;
    client.join("loop", None, None).await;
    let mut gave_up = None;
    for _ in 0..10 {
        // Wait for the session to be back before crashing it again.
        let mut live = false;
        for _ in 0..100 {
            let status = common::http()
                .post(format!(
                    "{}/v1/faults/sessions/loop/panic",
                    server.http_url()
                ))
                .send()
                .await
                .expect("fault route")
                .status()
                .as_u16();
            if status == 202 {
                live = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(live, "the session never came back");
        let frame = client
            .recv_until(|f| f["type"] == "reset" || f["type"] == "error")
            .await;
        if frame["type"] == "error" {
            gave_up = Some(frame);
            break;
        }
    }
    let frame = gave_up.expect("the crash loop was never given up");
    assert_eq!(frame["code"], "internal", "{frame}");
    assert!(
        frame["message"]
            .as_str()
            .unwrap_or("")
            .contains("failed repeatedly"),
        "{frame}"
    );
    assert_eq!(
        metric(&server, "conclave_supervisor_gave_up_total").await,
        1
    );
    // Membership ended: a chat is refused as "not joined", and the node is healthy.
    client
        .send(json!({"type": "chat", "ref": "c", "session": "loop", "text": "hi"}))
        .await;
    let reply = client.recv_until(|f| f["ref"] == "c").await;
    assert_eq!(reply["code"], "bad_request", "{reply}");
    client.ping_pong().await;
}
