//! The committed text of one document, as `joined` and REST show it, advanced lazily.
//!
//! Every committed change arrives as an OT operation on the text before it. Applying each one to
//! a flat UTF-16 buffer copies the whole text per change: under `conclave load yjs` at ~120,000
//! deliveries/s that copy was 44% of the node's CPU, and it grows with the document. So the
//! mirror composes committed operations into one pending operation and applies it only when the
//! text is read, or when the pending operation has grown past a small bound. Composing costs
//! what the two operations hold (their components and inserted text), not what the document
//! holds, so the bound keeps each change cheap, and the whole-text copy comes once per many
//! changes instead of once per change.

use super::ot::{Component, Operation, OtError, compose};

/// Components a pending operation may reach before it is applied: composing steps through each.
const MAX_PENDING_COMPONENTS: usize = 64;

/// Bytes of inserted text a pending operation may hold before it is applied: composing splits
/// and measures inserted text, so a large pending insert made every change slower (at 256 KiB,
/// `conclave load yjs` fell from ~135,000 to ~30,000 deliveries/s).
const MAX_PENDING_INSERTED: usize = 8 * 1024;

pub struct Mirror {
    /// The text before `pending`.
    text: Vec<u16>,
    /// Committed changes not yet applied to `text`, composed into one.
    pending: Option<Operation>,
    /// An operation did not apply: the text is behind the document until it is reset.
    stale: bool,
}

impl Mirror {
    pub fn new(text: Vec<u16>) -> Self {
        Self {
            text,
            pending: None,
            stale: false,
        }
    }

    /// Books one committed change.
    pub fn push(&mut self, op: &Operation) {
        let next = match self.pending.take() {
            Some(pending) => compose(&pending, op),
            None => op.clone(),
        };
        let inserted: usize = next
            .components()
            .iter()
            .map(|c| match c {
                Component::Insert(s) => s.len(),
                Component::Retain(_) | Component::Delete(_) => 0,
            })
            .sum();
        let large =
            next.components().len() > MAX_PENDING_COMPONENTS || inserted > MAX_PENDING_INSERTED;
        self.pending = Some(next);
        if large {
            self.apply_pending();
        }
    }

    /// Applies the pending operation. One that does not fit the text (a Yjs client that split a
    /// surrogate pair, which JavaScript strings allow, gives offsets Rust text cannot follow)
    /// leaves the text as it was and marks the mirror stale, until [`Mirror::reset`] heals it.
    fn apply_pending(&mut self) {
        let Some(op) = self.pending.take() else {
            return;
        };
        match op.apply(&self.text) {
            Ok(text) => self.text = text,
            Err(err) => self.mark_stale(&err),
        }
    }

    fn mark_stale(&mut self, err: &OtError) {
        tracing::warn!(%err, "an op did not apply to the committed mirror; it heals when the document settles");
        self.stale = true;
    }

    /// Whether the mirror, pending changes included, is known good and `units` long: what the
    /// document holds when nothing is uncommitted. A cheap check, so a settled document is not
    /// copied for every commit.
    pub fn agrees_with(&self, units: u64) -> bool {
        let delta = self.pending.as_ref().map_or(0, Operation::len_delta);
        !self.stale && self.text.len() as i64 + delta == units as i64
    }

    /// Replaces the text with the document's own, when nothing in memory is uncommitted.
    pub fn reset(&mut self, text: Vec<u16>) {
        self.text = text;
        self.pending = None;
        self.stale = false;
    }

    /// The committed text.
    pub fn text(&mut self) -> String {
        self.apply_pending();
        String::from_utf16_lossy(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An operation from components, a retain of 0 left out.
    fn op(components: Vec<Component>) -> Operation {
        let components = components
            .into_iter()
            .filter(|c| !matches!(c, Component::Retain(0)))
            .collect();
        Operation::normalize(components).unwrap()
    }

    fn units(s: &str) -> Vec<u16> {
        s.encode_utf16().collect()
    }

    /// Changes composed while nobody reads give the same text as applying each in turn, through
    /// the bound that applies them early.
    #[test]
    fn composed_changes_read_as_applied_one_by_one() {
        let mut mirror = Mirror::new(units("ab"));
        let mut expected = units("ab");
        for i in 0..1000u64 {
            let len = expected.len() as u64;
            let at = (i * 7919) % (len + 1);
            let change = if i % 5 == 4 && at < len {
                op(vec![Component::Retain(at), Component::Delete(1)])
            } else {
                op(vec![
                    Component::Retain(at),
                    Component::Insert(format!("<{i}>")),
                ])
            };
            expected = change.apply(&expected).unwrap();
            mirror.push(&change);
            assert!(mirror.agrees_with(expected.len() as u64));
            if i % 250 == 0 {
                assert_eq!(mirror.text(), String::from_utf16_lossy(&expected));
            }
        }
        assert_eq!(mirror.text(), String::from_utf16_lossy(&expected));
    }

    /// An op that does not fit marks the mirror stale, so the document's own text replaces it
    /// at the next settle.
    #[test]
    fn an_op_that_does_not_fit_is_healed_by_a_reset() {
        let mut mirror = Mirror::new(units("ab"));
        mirror.push(&op(vec![
            Component::Retain(5),
            Component::Insert("x".into()),
        ]));
        assert_eq!(mirror.text(), "ab");
        assert!(!mirror.agrees_with(2));
        mirror.reset(units("abx"));
        assert!(mirror.agrees_with(3));
        assert_eq!(mirror.text(), "abx");
    }
}
