//! A real store outage: the test runs its own PostgreSQL (initdb + pg_ctl from the installed
//! binaries, on a random port), stops it under a serving node, and starts it again.
//!
//! While it is down, writes get `storage_unavailable` and are never acked, reads from memory go
//! on, and `/readyz` fails. When it is back, service resumes by itself.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{TestServer, WsClient};
use serde_json::json;

/// A private PostgreSQL cluster in a temp dir, stopped on drop.
struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

fn pg_bin() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(root)
        .expect("PostgreSQL server binaries under /usr/lib/postgresql (Debian: apt-get install postgresql)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL version with pg_ctl")
}

/// Runs a PostgreSQL binary as the `postgres` user when we are root (initdb refuses root).
fn run_pg(bin: &Path, tool: &str, args: &[&str]) -> std::process::Output {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let program = bin.join(tool);
    let output = if is_root {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(&program)
            .args(args)
            .output()
    } else {
        Command::new(&program).args(args).output()
    };
    output.unwrap_or_else(|e| panic!("running {}: {e}", program.display()))
}

impl PrivatePostgres {
    fn start() -> Self {
        let bin = pg_bin();
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("pgdata");
        // The cluster's files must belong to the user that runs it.
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status();
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let init = run_pg(
            &bin,
            "initdb",
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-U",
                "postgres",
                "-A",
                "trust",
            ],
        );
        assert!(init.status.success(), "initdb failed: {init:?}");
        let pg = Self {
            bin,
            data,
            port,
            _dir: dir,
        };
        pg.pg_ctl_start();
        pg
    }

    fn pg_ctl_start(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            self.data.display()
        );
        // `-l`: the server's output goes to a file, so it does not hold our pipes open (which
        // would make waiting for pg_ctl's output hang forever).
        let log = self.data.with_file_name("server.log");
        let out = run_pg(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().expect("utf-8"),
                "-l",
                log.to_str().expect("utf-8"),
                "-o",
                &opts,
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
        assert!(out.status.success(), "pg_ctl start failed: {out:?}");
    }

    fn pg_ctl_stop(&self) {
        let out = run_pg(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().expect("utf-8"),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
        assert!(out.status.success(), "pg_ctl stop failed: {out:?}");
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = run_pg(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap_or(""),
                "-m",
                "immediate",
                "stop",
            ],
        );
    }
}

async fn readyz(server: &TestServer) -> u16 {
    common::get_json(&format!("{}/readyz", server.http_url()))
        .await
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_refused_while_postgres_is_down_and_resume_after() {
    let pg = PrivatePostgres::start();
    let url = pg.url();
    let server = TestServer::sqlite_with(move |c| c.database_url = Some(url));
    let mut client = WsClient::connect_hello(&server.ws_url(), "ada").await;
    let mut peer = WsClient::connect_hello(&server.ws_url(), "bea").await;
    client.join("outage", None, None).await;
    peer.join("outage", None, None).await;
    let before = client.chat("outage", "before").await;
    assert_eq!(readyz(&server).await, 200);

    pg.pg_ctl_stop();

    // A write is refused, never acked.
    client
        .send(json!({"type": "chat", "ref": "down", "session": "outage", "text": "during"}))
        .await;
    let reply = client
        .recv_until_within(Duration::from_secs(15), |f| f["ref"] == "down")
        .await;
    assert_eq!(
        reply["type"], "error",
        "acked while the store was down: {reply}"
    );
    assert_eq!(reply["code"], "storage_unavailable", "{reply}");
    // Reads from memory go on: presence flows, ping answers, REST reads of live state work.
    client
        .send(json!({"type": "presence", "session": "outage", "state": {"status": "typing"}}))
        .await;
    let presence = peer
        .recv_until(|f| f["type"] == "presence" && f["state"]["status"] == "typing")
        .await;
    assert_eq!(presence["session"], "outage");
    client.send(json!({"type": "ping"})).await;
    client.recv_until(|f| f["type"] == "pong").await;
    assert_eq!(
        readyz(&server).await,
        503,
        "/readyz passed with the store down"
    );

    pg.pg_ctl_start();

    // Service resumes by itself: the pool reconnects.
    let deadline = Instant::now() + Duration::from_secs(30);
    let offset = loop {
        client
            .send(json!({"type": "chat", "ref": "up", "session": "outage", "text": "after"}))
            .await;
        let reply = client
            .recv_until_within(Duration::from_secs(15), |f| f["ref"] == "up")
            .await;
        if reply["type"] == "ack" {
            break reply["offset"].as_u64().expect("offset");
        }
        assert!(Instant::now() < deadline, "writes never resumed: {reply}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(offset, before + 1, "a refused write left a gap");
    assert_eq!(readyz(&server).await, 200);
    let texts: Vec<String> = common::all_events(&server.http_url(), "outage")
        .await
        .iter()
        .filter(|e| e["kind"] == "chat")
        .filter_map(|e| e["data"]["text"].as_str().map(String::from))
        .collect();
    assert_eq!(
        texts,
        vec!["before", "after"],
        "the refused chat was stored"
    );
}
