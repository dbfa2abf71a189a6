//! The committed text of one document, as `joined` and REST show it.
//!
//! Every committed change arrives as an OT operation on the text before it. The text is a rope
//! (`ropey`), so a change costs O(log n) per component wherever it lands, and only a read copies
//! the whole text. A flat UTF-16 buffer copied the whole text per change: at ~120,000 Yjs
//! deliveries/s that copy was 44% of the node's CPU. Composing changes and applying them in
//! batches cut it, but each batch still copied the text, so the cost grew with the document:
//! 8% of the node's CPU by the end of a 20 s `conclave load yjs` run at R = 1,000, with 4 MiB
//! documents.

use ropey::Rope;

use super::ot::{Component, Operation, OtError, utf16_len};

pub struct Mirror {
    text: Rope,
    /// An operation did not apply: the text is behind the document until it is reset.
    stale: bool,
}

impl Mirror {
    pub fn new(text: &str) -> Self {
        Self {
            text: Rope::from_str(text),
            stale: false,
        }
    }

    /// Applies one committed change. One that does not fit the text (a Yjs client that split a
    /// surrogate pair, which JavaScript strings allow, gives offsets Rust text cannot follow)
    /// leaves the text as it was and marks the mirror stale, until [`Mirror::reset`] heals it;
    /// later changes wait for that too, since they were made on a text the mirror does not hold.
    pub fn push(&mut self, op: &Operation) {
        if self.stale {
            return;
        }
        if let Err(err) = self.apply(op) {
            tracing::warn!(%err, "an op did not apply to the committed mirror; it heals when the document settles");
            self.stale = true;
        }
    }

    /// Checks `op` against the text as a whole, then applies it: a failed check changes nothing.
    fn apply(&mut self, op: &Operation) -> Result<(), OtError> {
        let len = self.text.len_utf16_cu() as u64;
        op.check_against(len, |at| {
            let at = at as usize;
            self.text.char_to_utf16_cu(self.text.utf16_cu_to_char(at)) == at
        })?;
        // Offsets into the text as changed so far. The check holds for them too: inserts are
        // whole strings, so every offset past one moves by whole code points.
        let mut cursor = 0usize;
        for component in op.components() {
            match component {
                Component::Retain(n) => cursor += *n as usize,
                Component::Insert(s) => {
                    self.text.insert(self.text.utf16_cu_to_char(cursor), s);
                    cursor += utf16_len(s) as usize;
                }
                Component::Delete(n) => {
                    let from = self.text.utf16_cu_to_char(cursor);
                    let to = self.text.utf16_cu_to_char(cursor + *n as usize);
                    self.text.remove(from..to);
                }
            }
        }
        Ok(())
    }

    /// Whether the mirror is known good and `units` long: what the document holds when nothing
    /// is uncommitted. A cheap check, so a settled document is not copied for every commit.
    pub fn agrees_with(&self, units: u64) -> bool {
        !self.stale && self.text.len_utf16_cu() as u64 == units
    }

    /// Replaces the text with the document's own, when nothing in memory is uncommitted.
    pub fn reset(&mut self, text: &str) {
        self.text = Rope::from_str(text);
        self.stale = false;
    }

    /// The committed text.
    pub fn text(&self) -> String {
        self.text.to_string()
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

    /// The rope gives the text that applying each change to a flat UTF-16 buffer gives, with
    /// characters of one, two and three UTF-8 bytes and surrogate pairs on both sides of
    /// every edit.
    #[test]
    fn changes_read_as_applied_to_a_flat_text() {
        let mut mirror = Mirror::new("a😀b");
        let mut expected = units("a😀b");
        let inserts = ["<x>", "é", "😀", "中文", "z😀z"];
        for i in 0..2000u64 {
            let len = expected.len() as u64;
            let at = (i * 7919) % (len + 1);
            // Only offsets between code points: an edit never cuts a pair in half.
            let at = if at > 0 && at < len && (0xDC00..0xE000).contains(&expected[at as usize]) {
                at - 1
            } else {
                at
            };
            let change = if i % 3 == 2 && at < len {
                let width = if (0xD800..0xDC00).contains(&expected[at as usize]) {
                    2
                } else {
                    1
                };
                op(vec![Component::Retain(at), Component::Delete(width)])
            } else {
                let insert = inserts[(i % inserts.len() as u64) as usize];
                op(vec![
                    Component::Retain(at),
                    Component::Insert(insert.into()),
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

    /// An op that does not fit (past the end, or through a surrogate pair) marks the mirror
    /// stale and changes nothing, so the document's own text replaces it at the next settle.
    #[test]
    fn an_op_that_does_not_fit_is_healed_by_a_reset() {
        let mut mirror = Mirror::new("ab");
        mirror.push(&op(vec![
            Component::Retain(5),
            Component::Insert("x".into()),
        ]));
        assert_eq!(mirror.text(), "ab");
        assert!(!mirror.agrees_with(2));
        mirror.reset("abx");
        assert!(mirror.agrees_with(3));
        assert_eq!(mirror.text(), "abx");

        let mut mirror = Mirror::new("a😀b");
        mirror.push(&op(vec![
            Component::Retain(1),
            Component::Insert("x".into()),
            Component::Retain(1),
            Component::Delete(1),
        ]));
        assert_eq!(mirror.text(), "a😀b", "a failed check changes nothing");
        assert!(!mirror.agrees_with(4));
    }
}
