//! Security at every door that exists: tokens on `/v1/ws` (expiry mid-connection, `alg: none`,
//! oversized), `?token=` on the Yjs socket (a viewer's updates are dropped with the y-protocols
//! "permission denied"), `Authorization: Bearer` on REST, and the secure-by-default start-up rule.

mod common;

use std::process::Command;
use std::time::Duration;

use common::yjs::{yjs_connect, yjs_insert, yjs_until};
use common::{TEST_SECRET, TestServer, WsClient, token};
use conclave::auth::{Authenticator, Claims, MAX_TOKEN_BYTES};
use conclave::protocol::Role;
use serde_json::json;
use yrs::sync::Message as YMessage;

/// Tokens only: no anonymous access.
fn tokens_only(config: &mut conclave::ServeConfig) {
    config.jwt_secret = Some(TEST_SECRET.to_owned());
}

fn signed(role: Role, exp_in_s: i64, sessions: Option<Vec<&str>>) -> String {
    let exp = u64::try_from(chrono::Utc::now().timestamp() + exp_in_s).expect("positive time");
    Authenticator::new(Some(TEST_SECRET), None, false)
        .expect("authenticator")
        .issue(&Claims {
            sub: format!("user-{role:?}"),
            name: None,
            role,
            sessions: sessions.map(|s| s.into_iter().map(String::from).collect()),
            exp,
        })
        .expect("signing")
}

async fn hello(server: &TestServer, token: Option<&str>) -> (WsClient, serde_json::Value) {
    let mut client = WsClient::connect(&server.ws_url()).await;
    client.send(json!({"type": "hello", "token": token})).await;
    let reply = client.recv().await;
    (client, reply)
}

#[tokio::test]
async fn a_token_that_expires_mid_connection_ends_it_with_4401() {
    let server = TestServer::sqlite_with(tokens_only);
    // Expired 25 s ago: still inside the 30 s leeway at hello, out of it ~5 s later.
    let (mut client, welcome) = hello(&server, Some(&signed(Role::Editor, -25, None))).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    client.join("exp", None, None).await;
    client
        .expect_closed_with(Duration::from_secs(15), "unauthorized", 4401)
        .await;
}

#[tokio::test]
async fn a_worker_token_that_expires_mid_connection_ends_it_with_4401() {
    let server = TestServer::sqlite_with(tokens_only);
    let mut worker = WsClient::connect(&format!("ws://{}/v1/workers", server.addr)).await;
    // Expired 27 s ago: still inside the 30 s leeway at hello, out of it ~3 s later.
    worker
        .send(
            json!({"type": "hello", "token": signed(Role::Agent, -27, None),
            "capabilities": ["k"], "capacity": 1}),
        )
        .await;
    let welcome = worker.recv().await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    worker
        .expect_closed_with(Duration::from_secs(15), "unauthorized", 4401)
        .await;
}

#[tokio::test]
async fn bad_tokens_are_unauthorized_and_join_nothing() {
    let server = TestServer::sqlite_with(tokens_only);
    // alg "none" with an admin claim and no signature.
    let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.\
                eyJzdWIiOiJ1MSIsInJvbGUiOiJhZG1pbiIsImV4cCI6OTk5OTk5OTk5OX0.";
    let tampered = {
        let good = token("eve", Role::Viewer);
        let mut parts: Vec<String> = good.split('.').map(String::from).collect();
        // Same signature, claims swapped for an admin's.
        parts[1] = signed(Role::Admin, 600, None)
            .split('.')
            .nth(1)
            .expect("claims part")
            .to_owned();
        parts.join(".")
    };
    let oversized = "a".repeat(MAX_TOKEN_BYTES + 1);
    for (what, bad) in [
        ("alg none", none.to_owned()),
        ("tampered", tampered),
        ("expired", signed(Role::Editor, -3600, None)),
        ("malformed", "not.a.jwt".to_owned()),
        ("oversized", oversized),
    ] {
        let (mut client, reply) = hello(&server, Some(&bad)).await;
        assert_eq!(reply["type"], "error", "{what} token accepted: {reply}");
        assert_eq!(reply["code"], "unauthorized", "{what}: {reply}");
        assert!(
            !reply["message"]
                .as_str()
                .unwrap_or("")
                .contains(&bad[..bad.len().min(20)]),
            "{what}: the error echoes the token"
        );
        // Nothing is joined: a join is refused as "send hello first".
        client
            .send(json!({"type": "join", "ref": "j", "session": "s"}))
            .await;
        let reply = client.recv_until(|f| f["ref"] == "j").await;
        assert_eq!(
            reply["code"], "unauthorized",
            "{what}: joined anyway: {reply}"
        );
        let response = common::http()
            .get(format!("{}/v1/sessions", server.http_url()))
            .bearer_auth(&bad)
            .send()
            .await
            .expect("GET");
        assert_eq!(response.status().as_u16(), 401, "{what} over REST");
    }
    // No token at all, where anonymous access is off.
    let (_, reply) = hello(&server, None).await;
    assert_eq!(reply["code"], "unauthorized", "{reply}");
    let response = common::http()
        .get(format!("{}/v1/sessions", server.http_url()))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status().as_u16(), 401);
    let metrics = common::http()
        .get(format!("{}/metrics", server.http_url()))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("conclave_auth_failures_total"),
        "auth failures are not counted"
    );
}

#[tokio::test]
async fn rest_roles_and_prefix_scopes() {
    let server = TestServer::sqlite_with(tokens_only);
    let base = server.http_url();
    let client = common::http();
    let editor = signed(Role::Editor, 600, Some(vec!["team-*", "exact"]));
    for (id, want) in [
        ("team-a", 201),
        ("exact", 201),
        ("exactly", 403),
        ("other", 403),
    ] {
        let status = client
            .post(format!("{base}/v1/sessions"))
            .bearer_auth(&editor)
            .json(&json!({"id": id}))
            .send()
            .await
            .expect("POST")
            .status()
            .as_u16();
        assert_eq!(status, want, "creating {id}");
    }
    let viewer = signed(Role::Viewer, 600, None);
    let read = client
        .get(format!("{base}/v1/sessions/team-a"))
        .bearer_auth(&viewer)
        .send()
        .await
        .expect("GET");
    assert_eq!(read.status().as_u16(), 200);
    let write = client
        .post(format!("{base}/v1/sessions/team-a/messages"))
        .bearer_auth(&viewer)
        .json(&json!({"text": "hi"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(write.status().as_u16(), 403, "a viewer posted");
    let delete = client
        .delete(format!("{base}/v1/sessions/team-a"))
        .bearer_auth(&editor)
        .send()
        .await
        .expect("DELETE");
    assert_eq!(delete.status().as_u16(), 403, "an editor deleted");
    let admin = signed(Role::Admin, 600, None);
    let delete = client
        .delete(format!("{base}/v1/sessions/team-a"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("DELETE");
    assert_eq!(delete.status().as_u16(), 204, "an admin could not delete");
    // The listing only shows sessions in scope.
    let list: serde_json::Value = client
        .get(format!("{base}/v1/sessions"))
        .bearer_auth(signed(Role::Viewer, 600, Some(vec!["exact"])))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    let ids: Vec<&str> = list["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["exact"]);
}

async fn doc_text(server: &TestServer, token: &str, path: &str) -> String {
    let body: serde_json::Value = common::http()
        .get(format!("{}/v1/sessions/{path}", server.http_url()))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET doc")
        .json()
        .await
        .expect("json");
    body["text"].as_str().expect("text").to_owned()
}

#[tokio::test]
async fn the_yjs_door_checks_tokens_and_drops_a_viewers_updates() {
    let server = TestServer::sqlite_with(tokens_only);
    let editor = signed(Role::Editor, 600, Some(vec!["yjs-*"]));
    let viewer = signed(Role::Viewer, 600, None);

    // Refused before the upgrade: no token, a forged one, out of scope.
    assert_eq!(
        yjs_connect(server.addr, "yjs-a/main", "").await.err(),
        Some(401)
    );
    assert_eq!(
        yjs_connect(server.addr, "yjs-a/main", "x.y.z").await.err(),
        Some(401)
    );
    assert_eq!(
        yjs_connect(server.addr, "other/main", &editor).await.err(),
        Some(403)
    );

    // An editor's update lands.
    let mut writer = yjs_connect(server.addr, "yjs-a/main", &editor)
        .await
        .expect("editor connects");
    yjs_insert(&mut writer, "from the editor").await;
    let mut text = String::new();
    for _ in 0..50 {
        text = doc_text(&server, &editor, "yjs-a/docs/main").await;
        if text == "from the editor" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(text, "from the editor");

    // A viewer's update is dropped and it is told "permission denied".
    let mut reader = yjs_connect(server.addr, "yjs-a/main", &viewer)
        .await
        .expect("viewer connects");
    yjs_insert(&mut reader, " and the viewer").await;
    let denied = yjs_until(&mut reader, |m| matches!(m, YMessage::Auth(_))).await;
    assert_eq!(
        denied,
        YMessage::Auth(Some(conclave::protocol::yjs::PERMISSION_DENIED.to_owned()))
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        doc_text(&server, &editor, "yjs-a/docs/main").await,
        "from the editor",
        "a viewer's Yjs update changed the document"
    );
}

#[test]
fn a_public_bind_without_a_secret_refuses_to_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_conclave"))
        .args(["serve", "--bind", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .env_remove("CONCLAVE_JWT_SECRET")
        .env_remove("CONCLAVE_INSECURE_ALLOW_ANONYMOUS")
        .env_remove("CONCLAVE_ANONYMOUS")
        .output()
        .expect("running the binary");
    assert!(
        !output.status.success(),
        "it started on 0.0.0.0 with no secret"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--insecure-allow-anonymous") && stderr.contains("--jwt-secret"),
        "the refusal does not name the flags: {stderr}"
    );
}

#[test]
fn conclave_token_prints_a_token_the_server_accepts() {
    let output = Command::new(env!("CARGO_BIN_EXE_conclave"))
        .args([
            "token",
            "--sub",
            "ada",
            "--role",
            "viewer",
            "--sessions",
            "a,b*",
            "--ttl",
            "2h",
        ])
        .env("CONCLAVE_JWT_SECRET", TEST_SECRET)
        .output()
        .expect("running conclave token");
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let token = stdout.lines().last().expect("a last line").trim();
    let principal = Authenticator::new(Some(TEST_SECRET), None, false)
        .expect("authenticator")
        .authenticate(Some(token), None)
        .expect("the printed token verifies");
    assert_eq!(principal.user.id, "ada");
    assert_eq!(principal.user.role, Role::Viewer);
    let in_scope = conclave::protocol::SessionId::parse("b-team").expect("id");
    let out_of_scope = conclave::protocol::SessionId::parse("c").expect("id");
    assert!(principal.check_session(&in_scope).is_ok());
    assert!(principal.check_session(&out_of_scope).is_err());
    let ttl = principal.expires_at.expect("exp") - chrono::Utc::now();
    assert!(ttl > chrono::Duration::minutes(119) && ttl <= chrono::Duration::hours(2));
}

#[tokio::test]
async fn rs256_tokens_are_checked_with_the_public_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let private = dir.path().join("private.pem");
    let public = dir.path().join("public.pem");
    let made = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&private)
        .status()
        .expect("openssl");
    assert!(made.success(), "openssl genpkey failed");
    let made = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .status()
        .expect("openssl");
    assert!(made.success(), "openssl pkey -pubout failed");
    let public_path = public.clone();
    let server = TestServer::sqlite_with(move |c| c.jwt_public_key = Some(public_path));
    let exp = u64::try_from(chrono::Utc::now().timestamp() + 600).expect("time");
    let claims = Claims {
        sub: "rsa-user".into(),
        name: Some("Rae".into()),
        role: Role::Editor,
        sessions: None,
        exp,
    };
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(&private).expect("pem"))
        .expect("private key");
    let rs256 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &key,
    )
    .expect("signing");
    let (_, welcome) = hello(&server, Some(&rs256)).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["user"]["id"], "rsa-user");
    // An HS256 token (any secret) is not accepted by an RS256 server.
    let (_, reply) = hello(&server, Some(&token("eve", Role::Admin))).await;
    assert_eq!(reply["code"], "unauthorized", "{reply}");
}
