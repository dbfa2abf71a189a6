//! Fuzzes the native JSON frames as a socket delivers them: `parse_request` (user socket),
//! `parse_worker_request` (worker socket) and `reference_of` (frames refused before parsing),
//! then the pure checks the server runs next: a task's and a council's validation, a ballot's
//! parse, and an edit through the document.
//!
//! Every input must be refused or accepted without a panic. An edit that parses goes through
//! `Document::edit`, the session actor's own path, on a document that already has text and
//! history, and an accepted one must change the text exactly as the pure OT engine says.

#![no_main]

use conclave::config::Limits;
use conclave::council::strategy::{parse_proposal, parse_review};
use conclave::protocol::frames::{ServerFrame, reference_of};
use conclave::protocol::worker::parse_worker_request;
use conclave::protocol::{Command, DocName, parse_request};
use conclave::session::document::Document;
use conclave::session::ot::Component;
use libfuzzer_sys::fuzz_target;

/// The text the edited document holds at version 1, with a surrogate pair to split.
const START: &str = "héllo 😀 wörld";

/// A document at version 2: `START` inserted, then a concurrent-looking edit on top, so a `base`
/// of 0, 1 or 2 takes the rebase path.
fn document() -> Document {
    let name = DocName::parse("main").expect("a valid literal name");
    let mut doc = Document::new(name);
    let max = Limits::default().max_doc_units;
    for (base, ops) in [
        (0, vec![Component::Insert(START.into())]),
        (1, vec![Component::Retain(5), Component::Insert("!".into())]),
    ] {
        let applied = doc
            .edit(base, ops, max)
            .expect("the seed edit is valid")
            .expect("the seed edit changes the text");
        doc.committed(applied.version, Some(&applied.op));
    }
    doc
}

fn units(s: &str) -> Vec<u16> {
    s.encode_utf16().collect()
}

fuzz_target!(|data: &[u8]| {
    // A WebSocket text frame is valid UTF-8 by the time it reaches the parser (actix-ws checks).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = reference_of(text);
    if let Err(failure) = parse_worker_request(text) {
        let _ = failure.refusal.message.len();
    }
    let request = match parse_request(text) {
        Ok(request) => request,
        Err(failure) => {
            ServerFrame::error(failure.reference.as_deref(), &failure.refusal).encode();
            return;
        }
    };
    match request.command {
        Command::Edit { base, ops, .. } => {
            let mut doc = document();
            let before = units(&doc.summary().text);
            if let Ok(Some(applied)) = doc.edit(base, ops, Limits::default().max_doc_units) {
                doc.committed(applied.version, Some(&applied.op));
                let want = applied
                    .op
                    .apply(&before)
                    .expect("an accepted operation applies to the text it was checked on");
                assert_eq!(
                    units(&doc.summary().text),
                    want,
                    "the yrs document and the OT engine disagree on {:?}",
                    applied.op
                );
            }
        }
        Command::TaskSubmit { task, .. } => {
            let _ = task.validate();
        }
        Command::CouncilOpen { council, .. } => {
            let _ = council.validate();
        }
        Command::CouncilBallot { ballot, .. } => {
            let _ = parse_proposal(&ballot);
            let shown = ["A".to_owned(), "B".to_owned()];
            let _ = parse_review(&ballot, &shown, Some("C"));
        }
        _ => {}
    }
});
