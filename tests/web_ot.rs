//! The web page's OT client (static/ot.js and static/doc-client.js) against OT.md: runs the Node
//! property and end-to-end tests in tests/web/ot.test.mjs. Needs Node.js 20 or later on the PATH;
//! without it this test fails rather than skips. To reproduce a failing case, run the command
//! printed in the failure (`OT_SEED=… node --test …`) from the repository root.

use std::path::Path;
use std::process::Command;

#[test]
fn web_page_ot_client_meets_ot_md() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new("node")
        .args(["--test", "--test-reporter=spec", "tests/web/ot.test.mjs"])
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "could not run `node` ({e}): Node.js 20 or later must be installed and on the PATH \
                 to test the web page's OT client"
            )
        });
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "node --test tests/web/ot.test.mjs failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        output.status
    );
    // Show the run counts and statistics with `cargo test -- --nocapture`.
    println!("{stdout}");
}
