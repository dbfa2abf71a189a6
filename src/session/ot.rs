//! Operational transformation for JSON edits, exactly as `OT.md` fixes it.
//!
//! An [`Operation`] is a list of retain / insert / delete components counted in UTF-16 code
//! units. [`Operation::normalize`] puts it in canonical form, [`transform`] rebases two concurrent
//! operations (the first argument wins insert ties), [`Operation::apply`] checks and applies one
//! to UTF-16 text, and [`compose`] joins two in sequence (the client's buffer). The server
//! applies the same walk to a yrs text; these pure functions are its reference and its tests.

use serde::{Deserialize, Serialize};

/// One component of an operation. Wire form: `{"retain":n}`, `{"insert":"s"}`, `{"delete":n}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Component {
    Retain(u64),
    Insert(String),
    Delete(u64),
}

/// The UTF-16 length of a string, the unit of every offset. ASCII, most text, is one unit per
/// byte, and checking for it is a vectorised scan rather than a walk of every character.
pub fn utf16_len(s: &str) -> u64 {
    if s.is_ascii() {
        return s.len() as u64;
    }
    s.encode_utf16().count() as u64
}

/// Why an operation was refused; every variant is a client error (`bad_request`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OtError {
    #[error("a retain or delete must count at least 1")]
    ZeroCount,
    #[error("an insert must not be empty")]
    EmptyInsert,
    #[error("the operation reaches {needed} code units into a document of {len}")]
    OutOfRange { needed: u64, len: u64 },
    #[error("the operation splits a surrogate pair at offset {0}")]
    SplitsSurrogate(u64),
    #[error("the operation reaches past {MAX_REACH} code units, longer than any document")]
    TooFar,
}

/// The furthest an operation may reach: yrs counts a text's length in `u32`, so no document is
/// longer. Refusing more in `normalize` keeps every later sum and `i64` conversion exact; a
/// client's counts are otherwise unbounded `u64`s (found by the `ot` fuzz target: two retains of
/// `u64::MAX` overflowed the sum).
pub const MAX_REACH: u64 = u32::MAX as u64;

/// A canonical operation: adjacent components merged, inserts before touching deletes, and no
/// final retain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Operation {
    components: Vec<Component>,
    /// How far into the document the operation reached as written, its dropped final retain
    /// included: a retain past the end is refused even though canonical form drops it.
    reach: u64,
}

impl Serialize for Operation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.components.serialize(s)
    }
}

impl Operation {
    /// Validates components and puts them in canonical form.
    pub fn normalize(components: Vec<Component>) -> Result<Self, OtError> {
        let mut op = Builder::default();
        let mut reach = 0u64;
        for component in components {
            if let Component::Retain(n) | Component::Delete(n) = &component {
                reach = reach
                    .checked_add(*n)
                    .filter(|r| *r <= MAX_REACH)
                    .ok_or(OtError::TooFar)?;
            }
            match component {
                Component::Retain(0) | Component::Delete(0) => return Err(OtError::ZeroCount),
                Component::Insert(s) if s.is_empty() => return Err(OtError::EmptyInsert),
                Component::Retain(n) => op.retain(n),
                Component::Insert(s) => op.insert(&s),
                Component::Delete(n) => op.delete(n),
            }
        }
        let mut op = op.finish();
        op.reach = reach;
        Ok(op)
    }

    pub fn components(&self) -> &[Component] {
        &self.components
    }

    pub fn is_noop(&self) -> bool {
        self.components.is_empty()
    }

    /// Retains plus deletes: the shortest document this operation applies to.
    pub fn base_len(&self) -> u64 {
        base_len(&self.components)
    }

    /// How far into the document the operation reached as written, a dropped final retain
    /// included.
    pub fn reach(&self) -> u64 {
        self.reach.max(self.base_len())
    }

    /// How much longer (or shorter) the operation makes a document, in UTF-16 units.
    pub fn len_delta(&self) -> i64 {
        self.components
            .iter()
            .map(|c| match c {
                Component::Insert(s) => utf16_len(s) as i64,
                Component::Delete(n) => -(*n as i64),
                Component::Retain(_) => 0,
            })
            .sum()
    }

    /// Checks that the operation fits `text` and cuts no surrogate pair.
    pub fn check(&self, text: &[u16]) -> Result<(), OtError> {
        self.check_against(text.len() as u64, |at| between_code_points(text, at))
    }

    /// [`Operation::check`] for a text held some other way: `len` UTF-16 units long, with
    /// `is_boundary(at)` telling whether offset `at` falls between two code points.
    pub fn check_against(
        &self,
        len: u64,
        is_boundary: impl Fn(u64) -> bool,
    ) -> Result<(), OtError> {
        let needed = self.reach();
        if needed > len {
            return Err(OtError::OutOfRange { needed, len });
        }
        let boundary = |at| {
            if is_boundary(at) {
                Ok(())
            } else {
                Err(OtError::SplitsSurrogate(at))
            }
        };
        let mut cursor = 0u64;
        for component in &self.components {
            boundary(cursor)?;
            if let Component::Retain(n) | Component::Delete(n) = component {
                cursor += n;
            }
        }
        boundary(cursor)?;
        // Where a dropped final retain ended must be a boundary too.
        boundary(needed)
    }

    /// Applies the operation to UTF-16 text.
    pub fn apply(&self, text: &[u16]) -> Result<Vec<u16>, OtError> {
        self.check(text)?;
        let mut out = Vec::with_capacity(text.len());
        let mut cursor = 0usize;
        for component in &self.components {
            match component {
                Component::Retain(n) => {
                    let end = cursor + *n as usize;
                    out.extend_from_slice(&text[cursor..end]);
                    cursor = end;
                }
                Component::Insert(s) => out.extend(s.encode_utf16()),
                Component::Delete(n) => cursor += *n as usize,
            }
        }
        out.extend_from_slice(&text[cursor..]);
        Ok(out)
    }
}

fn base_len(components: &[Component]) -> u64 {
    components
        .iter()
        .map(|c| match c {
            Component::Retain(n) | Component::Delete(n) => *n,
            Component::Insert(_) => 0,
        })
        .sum()
}

/// Is `at` between two code points (not inside a surrogate pair)?
fn between_code_points(text: &[u16], at: u64) -> bool {
    let i = at as usize;
    let inside = i > 0
        && i < text.len()
        && (0xD800..0xDC00).contains(&text[i - 1])
        && (0xDC00..0xE000).contains(&text[i]);
    !inside
}

/// Builds canonical operations component by component.
#[derive(Default)]
struct Builder(Vec<Component>);

impl Builder {
    fn retain(&mut self, n: u64) {
        if n == 0 {
            return;
        }
        if let Some(Component::Retain(last)) = self.0.last_mut() {
            *last += n;
        } else {
            self.0.push(Component::Retain(n));
        }
    }

    fn insert(&mut self, s: &str) {
        if s.is_empty() {
            return;
        }
        // Inserts go before a touching delete, so equal edits have one canonical form.
        let at = match self.0.last() {
            Some(Component::Delete(_)) => self.0.len() - 1,
            _ => self.0.len(),
        };
        match at.checked_sub(1).and_then(|i| self.0.get_mut(i)) {
            Some(Component::Insert(prev)) => prev.push_str(s),
            _ => self.0.insert(at, Component::Insert(s.to_owned())),
        }
    }

    fn delete(&mut self, n: u64) {
        if n == 0 {
            return;
        }
        if let Some(Component::Delete(last)) = self.0.last_mut() {
            *last += n;
        } else {
            self.0.push(Component::Delete(n));
        }
    }

    fn finish(mut self) -> Operation {
        if let Some(Component::Retain(_)) = self.0.last() {
            self.0.pop();
        }
        let reach = base_len(&self.0);
        Operation {
            components: self.0,
            reach,
        }
    }
}

/// Walks an operation's components, consuming them in parts on demand. Past the end it yields
/// an endless retain: an omitted final retain covers whatever the other side still has.
struct Cursor<'a> {
    components: &'a [Component],
    index: usize,
    /// UTF-16 units already consumed from the current component.
    used: u64,
}

#[derive(Debug)]
enum Piece<'a> {
    Retain(u64),
    Insert(&'a str),
    Delete(u64),
    /// The implicit retain after the last component.
    End,
}

impl<'a> Cursor<'a> {
    fn new(op: &'a Operation) -> Self {
        Self {
            components: &op.components,
            index: 0,
            used: 0,
        }
    }

    fn peek(&self) -> Piece<'a> {
        match self.components.get(self.index) {
            None => Piece::End,
            Some(Component::Retain(n)) => Piece::Retain(n - self.used),
            Some(Component::Delete(n)) => Piece::Delete(n - self.used),
            Some(Component::Insert(s)) => Piece::Insert(split_utf16(s, self.used).1),
        }
    }

    /// Consumes `n` units of the current component.
    fn advance(&mut self, n: u64) {
        let len = match self.components.get(self.index) {
            Some(Component::Retain(len) | Component::Delete(len)) => *len,
            Some(Component::Insert(s)) => utf16_len(s),
            None => return,
        };
        if self.used + n < len {
            self.used += n;
        } else {
            self.index += 1;
            self.used = 0;
        }
    }
}

/// Rebases two operations written against the same document: `x′` applies after `y`, `y′`
/// after `x`, and both orders give the same text. Where both insert at one position, `x`'s
/// insert goes first: pass first the operation the server ordered first.
pub fn transform(x: &Operation, y: &Operation) -> (Operation, Operation) {
    let (mut xs, mut ys) = (Builder::default(), Builder::default());
    let (mut a, mut b) = (Cursor::new(x), Cursor::new(y));
    loop {
        match (a.peek(), b.peek()) {
            (Piece::End, Piece::End) => break,
            (Piece::Insert(s), _) => {
                let len = utf16_len(s);
                xs.insert(s);
                ys.retain(len);
                a.advance(len);
            }
            (_, Piece::Insert(s)) => {
                let len = utf16_len(s);
                xs.retain(len);
                ys.insert(s);
                b.advance(len);
            }
            (Piece::Retain(n), Piece::End) => {
                xs.retain(n);
                ys.retain(n);
                a.advance(n);
            }
            (Piece::End, Piece::Retain(n)) => {
                xs.retain(n);
                ys.retain(n);
                b.advance(n);
            }
            (Piece::Delete(n), Piece::End) => {
                xs.delete(n);
                a.advance(n);
            }
            (Piece::End, Piece::Delete(n)) => {
                ys.delete(n);
                b.advance(n);
            }
            (Piece::Retain(n), Piece::Retain(m)) => {
                let k = n.min(m);
                xs.retain(k);
                ys.retain(k);
                a.advance(k);
                b.advance(k);
            }
            (Piece::Delete(n), Piece::Delete(m)) => {
                // Both removed the same text: neither result deletes it again.
                let k = n.min(m);
                a.advance(k);
                b.advance(k);
            }
            (Piece::Delete(n), Piece::Retain(m)) => {
                let k = n.min(m);
                xs.delete(k);
                a.advance(k);
                b.advance(k);
            }
            (Piece::Retain(n), Piece::Delete(m)) => {
                let k = n.min(m);
                ys.delete(k);
                a.advance(k);
                b.advance(k);
            }
        }
    }
    (xs.finish(), ys.finish())
}

/// One operation with the effect of `a` then `b` (the client's buffer of local edits).
pub fn compose(a: &Operation, b: &Operation) -> Operation {
    let mut out = Builder::default();
    let (mut x, mut y) = (Cursor::new(a), Cursor::new(b));
    loop {
        match (x.peek(), y.peek()) {
            (Piece::End, Piece::End) => break,
            // a's deletes happened before b saw the text.
            (Piece::Delete(n), _) => {
                out.delete(n);
                x.advance(n);
            }
            // b's inserts are new text, whatever a did there.
            (_, Piece::Insert(s)) => {
                out.insert(s);
                y.advance(utf16_len(s));
            }
            (Piece::End, Piece::Retain(n)) => {
                out.retain(n);
                y.advance(n);
            }
            (Piece::End, Piece::Delete(n)) => {
                out.delete(n);
                y.advance(n);
            }
            (Piece::Retain(n), Piece::End) => {
                out.retain(n);
                x.advance(n);
            }
            (Piece::Insert(s), Piece::End) => {
                out.insert(s);
                x.advance(utf16_len(s));
            }
            (Piece::Retain(n), Piece::Retain(m)) => {
                let k = n.min(m);
                out.retain(k);
                x.advance(k);
                y.advance(k);
            }
            (Piece::Retain(n), Piece::Delete(m)) => {
                let k = n.min(m);
                out.delete(k);
                x.advance(k);
                y.advance(k);
            }
            (Piece::Insert(s), Piece::Retain(m)) => {
                let (head, _) = split_utf16(s, m);
                let len = utf16_len(head);
                out.insert(head);
                x.advance(len);
                y.advance(len);
            }
            (Piece::Insert(s), Piece::Delete(m)) => {
                // b deletes text a inserted: it never existed.
                let k = utf16_len(s).min(m);
                x.advance(k);
                y.advance(k);
            }
        }
    }
    out.finish()
}

/// Splits a string after `units` UTF-16 code units, rounding up to a code point boundary.
/// Composing the committed mirror's pending operation splits its inserted text for every change
/// (`session::mirror`), so an ASCII prefix, one unit per byte, is split without a walk.
fn split_utf16(s: &str, units: u64) -> (&str, &str) {
    let prefix = usize::try_from(units).unwrap_or(usize::MAX).min(s.len());
    if s.as_bytes()[..prefix].is_ascii() {
        return s.split_at(prefix);
    }
    let mut count = 0u64;
    for (i, ch) in s.char_indices() {
        if count >= units {
            return s.split_at(i);
        }
        count += ch.len_utf16() as u64;
    }
    (s, "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;

    fn op(components: Vec<Component>) -> Operation {
        Operation::normalize(components).expect("valid op")
    }

    fn u(s: &str) -> Vec<u16> {
        s.encode_utf16().collect()
    }

    fn text(units: &[u16]) -> String {
        String::from_utf16(units).expect("valid utf-16")
    }

    #[test]
    fn normalizes_to_canonical_form() {
        let o = op(vec![
            Component::Retain(2),
            Component::Retain(1),
            Component::Delete(1),
            Component::Insert("a".into()),
            Component::Insert("b".into()),
            Component::Retain(4),
        ]);
        assert_eq!(
            o.components(),
            &[
                Component::Retain(3),
                Component::Insert("ab".into()),
                Component::Delete(1)
            ]
        );
        assert_eq!(
            Operation::normalize(vec![Component::Retain(0)]),
            Err(OtError::ZeroCount)
        );
        assert_eq!(
            Operation::normalize(vec![Component::Insert(String::new())]),
            Err(OtError::EmptyInsert)
        );
    }

    #[test]
    fn refuses_counts_past_any_document() {
        for components in [
            vec![Component::Retain(u64::MAX), Component::Retain(1)],
            vec![Component::Retain(MAX_REACH), Component::Delete(1)],
            vec![Component::Delete(u64::MAX)],
        ] {
            assert_eq!(Operation::normalize(components), Err(OtError::TooFar));
        }
        let furthest = op(vec![Component::Retain(MAX_REACH)]);
        assert_eq!(furthest.reach(), MAX_REACH);
    }

    #[test]
    fn rejects_out_of_range_and_surrogate_splits() {
        let doc = u("a😀b");
        assert!(matches!(
            op(vec![Component::Retain(5)]).apply(&doc),
            Err(OtError::OutOfRange { .. })
        ));
        assert_eq!(
            op(vec![Component::Retain(2), Component::Insert("x".into())]).apply(&doc),
            Err(OtError::SplitsSurrogate(2))
        );
        assert_eq!(
            op(vec![Component::Retain(1), Component::Delete(1)]).apply(&doc),
            Err(OtError::SplitsSurrogate(2))
        );
        assert_eq!(
            op(vec![Component::Retain(2)]).apply(&doc),
            Err(OtError::SplitsSurrogate(2))
        );
        let ok = op(vec![Component::Retain(3), Component::Insert("x".into())]);
        assert_eq!(text(&ok.apply(&doc).unwrap()), "a😀xb");
    }

    #[test]
    fn first_operation_wins_insert_ties() {
        let x = op(vec![Component::Retain(1), Component::Insert("X".into())]);
        let y = op(vec![Component::Retain(1), Component::Insert("Y".into())]);
        let (x2, y2) = transform(&x, &y);
        let doc = u("ab");
        let via_y = x2.apply(&y.apply(&doc).unwrap()).unwrap();
        let via_x = y2.apply(&x.apply(&doc).unwrap()).unwrap();
        assert_eq!(text(&via_y), "aXYb");
        assert_eq!(via_x, via_y);
    }

    /// A random valid operation on `doc`, built from code point boundaries.
    fn arb_op(doc: String) -> impl Strategy<Value = Operation> {
        let chars: Vec<char> = doc.chars().collect();
        let n = chars.len();
        proptest::collection::vec((0..4u8, 1..4usize, "[a-c😀é]{1,3}"), 0..6).prop_map(
            move |steps| {
                let mut components = Vec::new();
                let mut at = 0usize;
                for (kind, count, insert) in steps {
                    let count = count.min(n - at);
                    match kind {
                        0 if count > 0 => {
                            let units = chars[at..at + count]
                                .iter()
                                .map(|c| c.len_utf16())
                                .sum::<usize>();
                            components.push(Component::Retain(units as u64));
                            at += count;
                        }
                        1 if count > 0 => {
                            let units = chars[at..at + count]
                                .iter()
                                .map(|c| c.len_utf16())
                                .sum::<usize>();
                            components.push(Component::Delete(units as u64));
                            at += count;
                        }
                        _ => components.push(Component::Insert(insert)),
                    }
                }
                Operation::normalize(components).expect("generated ops are valid")
            },
        )
    }

    fn doc_and_two_ops() -> impl Strategy<Value = (String, Operation, Operation)> {
        "[a-d😀é]{0,12}".prop_flat_map(|doc| (Just(doc.clone()), arb_op(doc.clone()), arb_op(doc)))
    }

    proptest! {
        /// The ASCII fast paths of `split_utf16` and `utf16_len` agree with walking every
        /// character, rounding a split inside a surrogate pair up to the next code point.
        #[test]
        fn splits_and_lengths_agree_with_a_walk(s in "[ab\u{e9}\u{1F600}]{0,12}", units in 0u64..30) {
            let mut count = 0u64;
            let mut at = s.len();
            for (i, ch) in s.char_indices() {
                if count >= units {
                    at = i;
                    break;
                }
                count += ch.len_utf16() as u64;
            }
            prop_assert_eq!(split_utf16(&s, units), s.split_at(at));
            prop_assert_eq!(utf16_len(&s), s.encode_utf16().count() as u64);
        }

        /// OT.md property 1: both orders converge.
        #[test]
        fn transform_converges((doc, x, y) in doc_and_two_ops()) {
            let s = u(&doc);
            let (x2, y2) = transform(&x, &y);
            let via_y = x2.apply(&y.apply(&s).unwrap()).unwrap();
            let via_x = y2.apply(&x.apply(&s).unwrap()).unwrap();
            prop_assert_eq!(text(&via_y), text(&via_x));
        }

        /// compose(a, b) is a then b.
        #[test]
        fn compose_is_sequencing((doc, a, _unused) in doc_and_two_ops(), seed in any::<u64>()) {
            let s = u(&doc);
            let after_a = a.apply(&s).unwrap();
            let mid = text(&after_a);
            let b = {
                let mut runner = proptest::test_runner::TestRunner::new_with_rng(
                    Default::default(),
                    proptest::test_runner::TestRng::from_seed(
                        proptest::test_runner::RngAlgorithm::ChaCha,
                        &{
                            let mut bytes = [0u8; 32];
                            bytes[..8].copy_from_slice(&seed.to_le_bytes());
                            bytes
                        },
                    ),
                );
                arb_op(mid).new_tree(&mut runner).unwrap().current()
            };
            let sequential = b.apply(&after_a).unwrap();
            let composed = compose(&a, &b).apply(&s).unwrap();
            prop_assert_eq!(text(&composed), text(&sequential));
        }
    }
}
