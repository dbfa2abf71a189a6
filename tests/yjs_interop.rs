//! Interop with the real Yjs: runs `tests/interop/yjs_interop.mjs` (yjs 13.6 + y-websocket 3.1
//! from the committed package-lock) against a real node, on both stores. Three Yjs clients and a
//! JSON client edit concurrently and converge; REST shows the same text; a late joiner gets the
//! whole document; awareness is relayed and removed.
//!
//! `scripts/test.sh` installs the npm packages first; without them this test fails and says so.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Backend, TestServer};

fn run_interop(backend: Backend) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
    assert!(
        dir.join("node_modules/yjs").is_dir() && dir.join("node_modules/y-websocket").is_dir(),
        "the interop packages are missing: run `npm ci` in tests/interop (scripts/test.sh does)"
    );
    let server = TestServer::start(backend, |_| {});
    let output = Command::new("node")
        .arg("yjs_interop.mjs")
        .arg(server.http_url())
        .current_dir(&dir)
        .output()
        .expect("running node (is Node.js installed?)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "interop failed on {backend:?}:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("ok: converged"), "{stdout}");
}

#[test]
fn real_yjs_clients_and_a_json_client_converge_on_sqlite() {
    run_interop(Backend::Sqlite);
}

#[test]
fn real_yjs_clients_and_a_json_client_converge_on_postgres() {
    run_interop(Backend::Postgres);
}
