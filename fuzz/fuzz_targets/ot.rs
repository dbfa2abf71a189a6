//! Fuzzes the OT engine (OT.md): a document and two concurrent operations built from the input.
//!
//! - Normalizing and applying any operation, however far out of range, never panics, and an
//!   applied one changes the length by exactly its `len_delta`.
//! - When both operations are valid on the document, `transform` converges:
//!   `apply(apply(d, x), y′) == apply(apply(d, y), x′)`, and `compose(x, y′)` does the same as
//!   `x` then `y′`.
//! - The server's own path agrees: `Document::edit` applies `x` to a yrs text and rebases a
//!   stale `y` over it, and must end with the same text as the pure engine.

#![no_main]

use arbitrary::Arbitrary;
use conclave::config::Limits;
use conclave::protocol::DocName;
use conclave::session::document::Document;
use conclave::session::ot::{Component, Operation, compose, transform};
use libfuzzer_sys::fuzz_target;

/// One component as the input describes it. Counts are taken as they are (`fit == false`, to
/// reach overflow and range checks) or folded into what is left of the document (`fit == true`,
/// so that most operations are valid and the convergence checks run).
#[derive(Debug, Arbitrary)]
enum Step {
    Retain(u64),
    Insert(String),
    Delete(u64),
}

#[derive(Debug, Arbitrary)]
struct Input {
    doc: String,
    fit: bool,
    x: Vec<Step>,
    y: Vec<Step>,
}

/// Turns steps into components against a document of `len` UTF-16 units. Fitted counts may
/// still split a surrogate pair: such operations must be refused, not applied.
fn components(steps: &[Step], len: u64, fit: bool) -> Vec<Component> {
    let mut at = 0u64;
    let mut out = Vec::with_capacity(steps.len());
    for step in steps {
        match step {
            Step::Insert(s) => out.push(Component::Insert(s.clone())),
            Step::Retain(n) | Step::Delete(n) => {
                let n = if fit {
                    let left = len - at;
                    if left == 0 {
                        continue;
                    }
                    1 + n % left
                } else {
                    *n
                };
                at = at.saturating_add(n).min(len);
                out.push(match step {
                    Step::Retain(_) => Component::Retain(n),
                    _ => Component::Delete(n),
                });
            }
        }
    }
    out
}

/// Normalizes and applies; returns the operation and its result when both succeed.
fn valid_on(d: &[u16], comps: Vec<Component>) -> Option<(Operation, Vec<u16>)> {
    let op = Operation::normalize(comps).ok()?;
    let after = op.apply(d).ok()?;
    assert_eq!(
        after.len() as i64,
        d.len() as i64 + op.len_delta(),
        "{op:?} changed the length by other than its len_delta"
    );
    Some((op, after))
}

/// The server's path: a document holding `d`, then `x` on the current version, then `y` written
/// against the same version as `x` (so rebased over it). Returns the final text.
fn through_document(d: &str, x: &Operation, y: &Operation) -> Vec<u16> {
    let max = Limits::default().max_doc_units;
    let mut doc = Document::new(DocName::parse("main").expect("a valid literal name"));
    if !d.is_empty() {
        let applied = doc
            .edit(0, vec![Component::Insert(d.to_owned())], max)
            .expect("inserting the start text is valid")
            .expect("inserting non-empty text is a change");
        doc.committed(applied.version, Some(&applied.op));
    }
    let base = doc.version();
    for op in [x, y] {
        let applied = doc
            .edit(base, op.components().to_vec(), max)
            .unwrap_or_else(|refusal| {
                panic!("{op:?}, valid on the text, was refused: {refusal:?}")
            });
        if let Some(applied) = applied {
            doc.committed(applied.version, Some(&applied.op));
        }
    }
    doc.summary().text.encode_utf16().collect()
}

fuzz_target!(|input: Input| {
    let d: Vec<u16> = input.doc.encode_utf16().collect();
    let len = d.len() as u64;
    let x = valid_on(&d, components(&input.x, len, input.fit));
    let y = valid_on(&d, components(&input.y, len, input.fit));
    let (Some((x, after_x)), Some((y, after_y))) = (x, y) else {
        return;
    };
    let (x2, y2) = transform(&x, &y);
    let via_y = x2
        .apply(&after_y)
        .unwrap_or_else(|e| panic!("x′ {x2:?} does not apply after y: {e}"));
    let via_x = y2
        .apply(&after_x)
        .unwrap_or_else(|e| panic!("y′ {y2:?} does not apply after x: {e}"));
    assert_eq!(via_x, via_y, "transform diverged: x′ {x2:?}, y′ {y2:?}");
    let composed = compose(&x, &y2)
        .apply(&d)
        .unwrap_or_else(|e| panic!("compose(x, y′) does not apply: {e}"));
    assert_eq!(composed, via_x, "compose(x, y′) is not x then y′");
    assert_eq!(
        through_document(&input.doc, &x, &y),
        via_x,
        "Document::edit disagrees with the OT engine"
    );
});
