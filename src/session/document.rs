//! One co-edited document of a session: a `yrs::Doc` whose `Y.Text` named `content` is the text,
//! with the OT history JSON edits are rebased on, and a mirror of the committed text.
//!
//! The yrs document runs ahead of the store: an edit is applied to it as soon as it is accepted,
//! so the next edit is checked and rebased against it. What readers see (`joined`, REST) is the
//! committed mirror, advanced only when a batch commits, so no one is shown a change a crash
//! could take back.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use yrs::sync::Awareness;
use yrs::sync::awareness::AwarenessUpdate;
use yrs::types::Delta;
use yrs::types::text::TextEvent;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::{Encoder, EncoderV1};
use yrs::{
    Doc, GetString, Observable, OffsetKind, Options, Out, ReadTxn, StateVector, Text, TextRef,
    Transact, Update,
};

use super::mirror::Mirror;
use super::ot::{Component, Operation, transform, utf16_len};
use crate::protocol::frames::DocSummary;
use crate::protocol::{DocName, ErrorCode, Refusal};
use crate::store::{DocSnapshot, DocUpdate, StoredDoc};

/// The name of the `Y.Text` that holds a document's text.
pub const CONTENT: &str = "content";

/// Versions of OT history kept per document; an edit based on an older version must resync.
pub const HISTORY: usize = 1024;

/// A JSON edit accepted and applied in memory, waiting for its batch to commit.
#[derive(Debug, Clone)]
pub struct AppliedEdit {
    /// The operation as applied: rebased onto the version before `version`.
    pub op: Operation,
    pub version: u64,
    pub update: DocUpdate,
}

/// A Yjs update accepted and applied in memory, waiting for its batch to commit.
#[derive(Debug, Clone)]
pub struct AppliedYjsUpdate {
    /// The change to `content` as an operation on the version before `version`; `None` when the
    /// update touched only other shared types (no new version).
    pub op: Option<Operation>,
    pub version: u64,
    pub update: DocUpdate,
}

/// What [`Document::apply_yjs_updates`] did with a group of updates.
pub struct AppliedYjsGroup {
    /// Whether each update applied, in order.
    pub results: Vec<Result<(), Refusal>>,
    /// The applied ones as one update, to store and to send the document's Yjs clients;
    /// `None` when none applied.
    pub applied: Option<AppliedYjsUpdate>,
}

/// Text deltas observed during one transaction, turned into an operation.
type DeltaSink = Arc<Mutex<Vec<Component>>>;

fn too_long(len: i64, max_units: u64) -> Refusal {
    Refusal::new(
        ErrorCode::TooLarge,
        format!("the document would reach {len} UTF-16 units; the limit is {max_units}"),
    )
}

/// Decodes an update from a client. yrs 0.28's decoder panics on some hostile bytes in builds with
/// checks (debug, tests): a `u32` sum that overflows (`clock + len` in `id_set.rs`), a
/// `debug_assert!` that a client id fits 53 bits (`block.rs`). Release builds wrap and go on.
/// Decoding touches no state, so such a panic is only a malformed update, refused like any other.
/// Both were found by the `yjs` fuzz target.
/// The highest awareness clock accepted from a client. Real clients count one per change of
/// their state; two billion leaves yrs's own increments far from `u32::MAX`.
pub const MAX_AWARENESS_CLOCK: u32 = u32::MAX / 2;

fn decode_untrusted(data: &[u8]) -> Result<Update, String> {
    match std::panic::catch_unwind(|| Update::decode_v1(data)) {
        Ok(decoded) => decoded.map_err(|e| e.to_string()),
        Err(_) => Err("yrs failed on it (a panic in its decoder)".to_owned()),
    }
}

/// Why a stored document could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("document {doc}: {reason}")]
pub struct LoadError {
    doc: String,
    reason: String,
}

pub struct Document {
    name: DocName,
    doc: Doc,
    text: TextRef,
    /// Filled by the `content` observer while an update applies; owned by this document alone.
    deltas: DeltaSink,
    /// The Yjs clients' awareness states for this document.
    awareness: Awareness,
    /// The version including edits not yet committed.
    version: u64,
    next_seq: u64,
    /// `(version, operation)` for the newest versions, oldest first.
    history: VecDeque<(u64, Operation)>,
    mirror: Mirror,
    committed_version: u64,
    /// Updates applied in memory whose batch has not committed yet.
    uncommitted: u64,
    /// The seq the stored snapshot covers; updates after it are replayed on load.
    snapshot_seq: u64,
    /// Bytes of the stored snapshot, and of the updates after it (stored, or applied and
    /// waiting for their commit): see [`Document::compaction_due`].
    snapshot_bytes: u64,
    logged_bytes: u64,
    /// The compaction in flight, if any.
    compacting: Option<Compaction>,
}

/// A compaction in flight: what it will have rewritten once its snapshot is stored.
#[derive(Debug, Clone, Copy)]
struct Compaction {
    /// `logged_bytes` when it began: the updates the snapshot covers.
    logged_bytes: u64,
    snapshot_bytes: u64,
}

/// A compaction by count waits until the updates since the snapshot hold at least
/// 1/`SNAPSHOT_PER_LOG` of the snapshot's bytes, as Redis rewrites its append-only file once it
/// has doubled. Rewriting a large document's snapshot every few hundred updates made
/// compaction the node's largest cost under steady typing (README, "Compaction in
/// proportion"); this way a compaction writes no more than the log it replaces, and a load
/// replays at most the snapshot's size again in updates beyond the count.
const SNAPSHOT_PER_LOG: u64 = 1;

fn new_doc() -> (Doc, TextRef, DeltaSink) {
    let doc = Doc::with_options(Options {
        offset_kind: OffsetKind::Utf16,
        ..Options::default()
    });
    let text = doc.get_or_insert_text(CONTENT);
    let deltas: DeltaSink = Arc::default();
    let sink = deltas.clone();
    text.observe("conclave-delta", move |txn, event: &TextEvent| {
        let mut sink = sink.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for delta in event.delta(txn) {
            sink.push(match delta {
                Delta::Retain(n, _) => Component::Retain(u64::from(*n)),
                Delta::Deleted(n) => Component::Delete(u64::from(*n)),
                Delta::Inserted(Out::Any(yrs::Any::String(s)), _) => {
                    Component::Insert(s.to_string())
                }
                // Embeds have no JSON view: one U+FFFC keeps the offsets right (OT.md).
                Delta::Inserted(_, _) => Component::Insert("\u{FFFC}".to_owned()),
            });
        }
    });
    (doc, text, deltas)
}

/// The text of `content` in UTF-16 units, the unit of every offset.
fn utf16_text(doc: &Doc, text: &TextRef) -> Vec<u16> {
    text.get_string(&doc.transact()).encode_utf16().collect()
}

/// Refuses an update that does not connect to a document whose state vector is `known`: for
/// some client, its first block starts past the clock the document has for that client, so it
/// depends on blocks the server never received. A client of one server never sends one (it sends what it made
/// after what it was sent), and yrs 0.28 mishandles them: it integrates a GC block out of
/// order, and the next delete of that client's blocks underflows in its binary search
/// (`block_store.rs`, found by the `yjs` fuzz target); other blocks wait as pending data
/// that never completes and only grows.
///
/// Likewise for deletes: each must fall within what the document or the update itself
/// holds, or yrs keeps it as a pending delete set, which it cannot merge back when it
/// encodes the whole document (a panic in `merge_pending_v1` at compaction, which
/// `encode_whole` has to catch).
fn check_connects(known: &StateVector, update: &Update) -> Result<(), Refusal> {
    let refuse = |what: String| {
        Err(Refusal::bad_request(format!(
            "Yjs update does not connect: {what}; resync by state vector"
        )))
    };
    if let Some((client, clock)) = update
        .state_vector_lower()
        .iter()
        .find(|(client, clock)| **clock > known.get(client))
    {
        return refuse(format!(
            "client {client} starts at clock {clock}, the document has it up to {}",
            known.get(client)
        ));
    }
    let inserted = update.insertions(true);
    for (client, deleted) in update.delete_set().iter() {
        let brought = inserted
            .iter()
            .find(|(c, _)| *c == client)
            .map_or(0, |(_, r)| {
                r.iter().map(|range| range.end).max().unwrap_or(0)
            });
        let reach = known.get(client).max(brought);
        if let Some(range) = deleted
            .iter()
            .find(|range| range.end > reach || range.is_empty())
        {
            return refuse(format!(
                "it deletes clocks {range:?} of client {client}, which reach past {reach}"
            ));
        }
    }
    Ok(())
}

impl Document {
    /// A document that does not exist yet: version 0, empty.
    pub fn new(name: DocName) -> Self {
        let (doc, text, deltas) = new_doc();
        Self {
            name,
            awareness: Awareness::new(doc.clone()),
            doc,
            text,
            deltas,
            version: 0,
            next_seq: 1,
            history: VecDeque::new(),
            mirror: Mirror::new(""),
            committed_version: 0,
            uncommitted: 0,
            snapshot_seq: 0,
            snapshot_bytes: 0,
            logged_bytes: 0,
            compacting: None,
        }
    }

    /// Rebuilds a document from its snapshot and the updates after it.
    pub fn load(stored: StoredDoc) -> Result<Self, LoadError> {
        let fail = |reason: String| LoadError {
            doc: stored.name.to_string(),
            reason,
        };
        let (doc, text, deltas) = new_doc();
        {
            let mut txn = doc.transact_mut();
            let snapshot = stored.snapshot.iter().map(|s| &s.data);
            for data in snapshot.chain(stored.updates.iter().map(|u| &u.data)) {
                let update = Update::decode_v1(data).map_err(|e| fail(e.to_string()))?;
                txn.apply_update(update).map_err(|e| fail(e.to_string()))?;
            }
        }
        let mirror = Mirror::new(&text.get_string(&doc.transact()));
        deltas.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let version = stored.version();
        Ok(Self {
            name: stored.name.clone(),
            awareness: Awareness::new(doc.clone()),
            doc,
            text,
            deltas,
            version,
            next_seq: stored.last_seq() + 1,
            history: VecDeque::new(),
            mirror,
            committed_version: version,
            uncommitted: 0,
            snapshot_seq: stored.snapshot.as_ref().map_or(0, |s| s.upto_seq),
            snapshot_bytes: stored.snapshot.as_ref().map_or(0, |s| s.data.len() as u64),
            logged_bytes: stored.updates.iter().map(|u| u.data.len() as u64).sum(),
            compacting: None,
        })
    }

    pub fn name(&self) -> &DocName {
        &self.name
    }

    /// Checks, rebases and applies a JSON edit written against version `base`. `None` when the
    /// rebased edit changes nothing (its text was already deleted): no new version.
    pub fn edit(
        &mut self,
        base: u64,
        components: Vec<Component>,
        max_units: u64,
    ) -> Result<Option<AppliedEdit>, Refusal> {
        if base > self.version {
            return Err(Refusal::bad_request(format!(
                "base {base} is ahead of the document's version {}",
                self.version
            )));
        }
        let oldest_base = self.version - self.history.len() as u64;
        if base < oldest_base {
            return Err(Refusal::new(
                ErrorCode::ResyncRequired,
                format!(
                    "base {base} is older than the history kept (from {oldest_base}); reload the document"
                ),
            ));
        }
        let mut op =
            Operation::normalize(components).map_err(|e| Refusal::bad_request(e.to_string()))?;
        let current = utf16_text(&self.doc, &self.text);
        // The op was written against version `base`: it must fit the document as it was then,
        // not merely after rebasing (which can stretch a retain over text inserted since).
        let since_base = self.history.iter().filter(|(v, _)| *v > base);
        let len_at_base =
            current.len() as i64 - since_base.map(|(_, h)| h.len_delta()).sum::<i64>();
        if op.reach() as i64 > len_at_base {
            return Err(Refusal::bad_request(format!(
                "the operation reaches {} code units into version {base}, which had {len_at_base}",
                op.reach()
            )));
        }
        for (_, earlier) in self.history.iter().filter(|(v, _)| *v > base) {
            op = transform(earlier, &op).1;
        }
        op.check(&current)
            .map_err(|e| Refusal::bad_request(e.to_string()))?;
        let new_len = current.len() as i64 + op.len_delta();
        // A limit past `i64::MAX` (none, in effect) must not wrap to a negative one.
        if new_len > i64::try_from(max_units).unwrap_or(i64::MAX) {
            return Err(too_long(new_len, max_units));
        }
        if op.is_noop() {
            return Ok(None);
        }
        let data = {
            let mut txn = self.doc.transact_mut();
            let mut cursor = 0u32;
            for component in op.components() {
                match component {
                    Component::Retain(n) => cursor += *n as u32,
                    Component::Insert(s) => {
                        self.text.insert(&mut txn, cursor, s);
                        cursor += utf16_len(s) as u32;
                    }
                    Component::Delete(n) => self.text.remove_range(&mut txn, cursor, *n as u32),
                }
            }
            txn.encode_update_v1()
        };
        // The observer saw this edit too; the operation is already known.
        self.take_deltas();
        let seq = self.record(Some(&op), data.len());
        Ok(Some(AppliedEdit {
            op,
            version: self.version,
            update: DocUpdate {
                doc: self.name.clone(),
                seq,
                version: self.version,
                data,
            },
        }))
    }

    /// Books one update of `bytes` applied in memory: a change to the text (`op`) is a new
    /// version in the OT history; every update gets the next seq and waits for its commit.
    /// Returns the seq.
    fn record(&mut self, op: Option<&Operation>, bytes: usize) -> u64 {
        self.logged_bytes += bytes as u64;
        if let Some(op) = op {
            self.version += 1;
            self.history.push_back((self.version, op.clone()));
            if self.history.len() > HISTORY {
                self.history.pop_front();
            }
        }
        self.uncommitted += 1;
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    fn take_deltas(&self) -> Vec<Component> {
        std::mem::take(&mut *self.deltas.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Applies an update from a Yjs client. A change to `content` becomes a new version with its
    /// operation in the OT history, so JSON clients can follow and rebase on it.
    pub fn apply_yjs_update(
        &mut self,
        data: Vec<u8>,
        max_units: u64,
    ) -> Result<AppliedYjsUpdate, Refusal> {
        let group = self.apply_yjs_updates(vec![data], max_units);
        match group.results.into_iter().next() {
            Some(Err(refusal)) => Err(refusal),
            _ => group
                .applied
                .ok_or_else(|| Refusal::bad_request("no Yjs update")),
        }
    }

    /// Applies Yjs clients' updates in one transaction, each checked on its own. A refused
    /// update leaves the document as it was and the others apply.
    ///
    /// What the group applied is one change: one new version with one operation, stored as
    /// one update, sent to the document's Yjs clients as one. Turning a transaction into an
    /// operation walks the text from its start (yrs's `TextEvent::delta`), and with updates that
    /// each insert an item of their own (people typing at the same end), one walk per update
    /// was the node's bottleneck. The stored and sent update is the transaction's own encoding,
    /// what Yjs's `update` event holds: the blocks past the state it started from and the
    /// deletions it made. It holds only what the document took in, and it costs less than
    /// storing and sending the updates one by one (a row and a frame each) or merging them
    /// again (`merge_updates_v1` decodes each a second time: 17% of the node's time with
    /// hundreds of typists). A group is committed whole or not at all, so a crash never keeps
    /// part of one.
    ///
    /// An update cannot be unapplied, so the size limit is checked before applying, against
    /// the update's encoded length: it bounds what the update can insert.
    pub fn apply_yjs_updates(&mut self, updates: Vec<Vec<u8>>, max_units: u64) -> AppliedYjsGroup {
        self.take_deltas();
        let (results, data) = {
            let mut txn = self.doc.transact_mut();
            let mut only = None;
            let results: Vec<Result<(), Refusal>> = updates
                .into_iter()
                .map(|data| {
                    let len = u64::from(self.text.len(&txn));
                    if len + data.len() as u64 > max_units {
                        return Err(too_long((len + data.len() as u64) as i64, max_units));
                    }
                    let update = decode_untrusted(&data).map_err(|e| {
                        Refusal::bad_request(format!("undecodable Yjs update: {e}"))
                    })?;
                    check_connects(&txn.state_vector(), &update)?;
                    txn.apply_update(update).map_err(|e| {
                        Refusal::bad_request(format!("Yjs update did not apply: {e}"))
                    })?;
                    only = Some(data);
                    Ok(())
                })
                .collect();
            // One applied update is its own encoding; several are encoded once, together.
            let data = match results.iter().filter(|r| r.is_ok()).count() {
                0 => None,
                1 => only,
                _ => Some(txn.encode_update_v1()),
            };
            (results, data)
        };
        let op = Operation::normalize(self.take_deltas())
            .ok()
            .filter(|op| !op.is_noop());
        let applied = data.map(|data| {
            let seq = self.record(op.as_ref(), data.len());
            AppliedYjsUpdate {
                op,
                version: self.version,
                update: DocUpdate {
                    doc: self.name.clone(),
                    seq,
                    version: self.version,
                    data,
                },
            }
        });
        AppliedYjsGroup { results, applied }
    }

    /// Whether everything applied in memory is committed.
    pub fn is_settled(&self) -> bool {
        self.uncommitted == 0
    }

    /// The document's state vector, for the server's sync step 1.
    pub fn state_vector(&self) -> StateVector {
        self.doc.transact().state_vector()
    }

    /// What a Yjs client with state vector `sv` is missing (sync step 2).
    pub fn diff(&self, sv: &StateVector) -> Vec<u8> {
        self.doc.transact().encode_diff_v1(sv)
    }

    pub fn awareness(&self) -> &Awareness {
        &self.awareness
    }

    /// Applies a Yjs client's awareness update. An entry whose clock is past
    /// [`MAX_AWARENESS_CLOCK`] is refused: yrs adds 1 to a client's clock when it removes its
    /// state (at disconnect), which overflows at `u32::MAX` and panics in builds with overflow
    /// checks, as the release profile compiles yrs (found by the `yjs` fuzz target).
    pub fn apply_awareness(&mut self, update: AwarenessUpdate) -> Result<(), Refusal> {
        if update
            .clients
            .values()
            .any(|entry| entry.clock > MAX_AWARENESS_CLOCK)
        {
            return Err(Refusal::bad_request(format!(
                "awareness clock past {MAX_AWARENESS_CLOCK}"
            )));
        }
        self.awareness
            .apply_update(update)
            .map_err(|e| Refusal::bad_request(format!("awareness update refused: {e}")))
    }

    /// Marks an awareness client gone, as its connection closed.
    pub fn remove_awareness(&mut self, client: yrs::block::ClientID) {
        self.awareness.remove_state(client);
    }

    /// The version the next edit would be based on, committed or not.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Advances the committed mirror by one committed update (`op` is its change to the text).
    pub fn committed(&mut self, version: u64, op: Option<&Operation>) {
        self.uncommitted = self.uncommitted.saturating_sub(1);
        if let Some(op) = op {
            self.mirror.push(op);
        }
        self.committed_version = version;
        if self.uncommitted == 0 {
            // Nothing in memory is uncommitted: the mirror must be the document itself. One
            // that an op could not reach (a Yjs client that split a surrogate pair, which JS
            // strings allow) is healed from it here.
            let units = u64::from(self.text.len(&self.doc.transact()));
            if !self.mirror.agrees_with(units) {
                self.mirror
                    .reset(&self.text.get_string(&self.doc.transact()));
            }
        }
    }

    /// The committed state, as `joined` and REST show it.
    pub fn summary(&self) -> DocSummary {
        DocSummary {
            name: self.name.to_string(),
            version: self.committed_version,
            text: self.mirror.text(),
        }
    }

    /// Updates stored since the snapshot.
    pub fn updates_since_snapshot(&self) -> u64 {
        (self.next_seq - 1).saturating_sub(self.snapshot_seq)
    }

    /// Whether compaction by count is due: at least `every` updates since the snapshot, holding
    /// at least 1/[`SNAPSHOT_PER_LOG`] of its bytes.
    pub fn compaction_due(&self, every: u64) -> bool {
        self.updates_since_snapshot() >= every.max(1)
            && self.logged_bytes.saturating_mul(SNAPSHOT_PER_LOG) >= self.snapshot_bytes
    }

    /// A snapshot of the whole document, if everything in memory is committed and no other
    /// compaction is running. Marks the document as compacting.
    pub fn begin_compaction(&mut self) -> Option<DocSnapshot> {
        if self.compacting.is_some() || !self.is_settled() || self.updates_since_snapshot() == 0 {
            return None;
        }
        let data = self.encode_whole();
        if !self.reloads_as_is(&data) {
            tracing::warn!(doc = %self.name, "the snapshot would not load back to the same text; the update log is kept instead");
            return None;
        }
        self.compacting = Some(Compaction {
            logged_bytes: self.logged_bytes,
            snapshot_bytes: data.len() as u64,
        });
        Some(DocSnapshot {
            upto_seq: self.next_seq - 1,
            version: self.committed_version,
            data,
        })
    }

    /// The whole document as one update, with the updates yrs holds pending (their dependencies
    /// have not arrived) merged in. yrs 0.28 can hold pending data from a hostile update that it
    /// cannot read back: merging it panics (an `unwrap` in `merge_pending_v1`), which crashed
    /// the session at every compaction, again after each restart (found by the `yjs` fuzz target).
    /// Encoding only reads the document, so the panic is caught and the snapshot leaves the
    /// unreadable pending data out; the text and everything integrated are kept.
    fn encode_whole(&self) -> Vec<u8> {
        let txn = self.doc.transact();
        let all = StateVector::default();
        match std::panic::catch_unwind(AssertUnwindSafe(|| txn.encode_state_as_update_v1(&all))) {
            Ok(data) => data,
            Err(_) => {
                tracing::warn!(doc = %self.name, "pending Yjs data could not be merged; the snapshot leaves it out");
                let mut encoder = EncoderV1::new();
                txn.encode_state_as_update(&all, &mut encoder);
                encoder.to_vec()
            }
        }
    }

    /// Whether `snapshot`, loaded into a new document, gives this document's text. A snapshot
    /// replaces the update log it covers, so one that does not load would lose the document for
    /// good. yrs 0.28 (its debug assertions off, as in release builds) accepts an update whose
    /// client id is past 53 bits, and encodes a snapshot of it that does not decode (found by
    /// the `yjs` fuzz target); the log of such updates still loads, so it is kept instead.
    fn reloads_as_is(&self, snapshot: &[u8]) -> bool {
        let want = self.text.get_string(&self.doc.transact());
        std::panic::catch_unwind(|| {
            let (doc, text, _) = new_doc();
            let update = Update::decode_v1(snapshot).ok()?;
            doc.transact_mut().apply_update(update).ok()?;
            Some(text.get_string(&doc.transact()))
        })
        .ok()
        .flatten()
        .is_some_and(|text| text == want)
    }

    /// Ends the compaction in flight: `stored` is the seq its snapshot covers, or `None` if
    /// storing it failed and the log stays as it was.
    pub fn end_compaction(&mut self, stored: Option<u64>) {
        let compaction = self.compacting.take();
        if let (Some(upto_seq), Some(compaction)) = (stored, compaction) {
            self.snapshot_seq = upto_seq;
            self.snapshot_bytes = compaction.snapshot_bytes;
            self.logged_bytes = self.logged_bytes.saturating_sub(compaction.logged_bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::yjs;
    use yrs::sync::awareness::AwarenessUpdateEntry;
    use yrs::sync::{Message, SyncMessage};

    /// A GC block far past what the document has for its client, then a delete of that
    /// client's blocks: yrs 0.28 integrated the block out of order and underflowed in its
    /// binary search (a panic in the session; fuzz/corpus/yjs/update-that-does-not-connect).
    #[test]
    fn an_update_that_does_not_connect_is_refused() {
        let mut doc = Document::new(DocName::parse("main").expect("name"));
        let update: Vec<u8> = vec![
            1, 1, 2, 241, 255, 255, 255, 255, 255, 51, 0, 2, 2, 2, 2, 2, 0, 6, 1, 0, 4, 0, 43, 0,
            0, 0, 126, 0, 0, 0, 171, 0,
        ];
        let refused = doc.apply_yjs_update(update, 1 << 20).map(|_| ());
        let refusal = refused.expect_err("a gap in client 2's clocks");
        assert!(refusal.message.contains("does not connect"), "{refusal:?}");
        assert_eq!(doc.summary().text, "");
    }

    /// Compaction by count waits for the updates since the snapshot to hold as many bytes as
    /// it; a stored snapshot counts from what came after it, a failed one changes nothing.
    #[test]
    fn compaction_by_count_waits_for_the_log_to_weigh_as_much_as_the_snapshot() {
        let mut doc = Document::new(DocName::parse("main").expect("name"));
        let type_one = |doc: &mut Document| {
            let at = u64::from(doc.text.len(&doc.doc.transact()));
            let edit = doc
                .edit(
                    doc.version(),
                    vec![Component::Retain(at), Component::Insert("y".into())],
                    1 << 20,
                )
                .expect("an edit at the end")
                .expect("a change");
            doc.committed(edit.version, Some(&edit.op));
            edit.update
        };
        let big = doc
            .edit(0, vec![Component::Insert("x".repeat(4000))], 1 << 20)
            .expect("the first edit")
            .expect("a change");
        doc.committed(big.version, Some(&big.op));
        assert!(doc.compaction_due(1), "nothing to weigh against yet");
        assert!(!doc.compaction_due(2), "one update of the two asked");

        doc.begin_compaction().expect("a settled document");
        type_one(&mut doc);
        doc.end_compaction(None);
        assert_eq!(doc.snapshot_bytes, 0, "a failed compaction changes nothing");
        let snapshot = doc.begin_compaction().expect("settled again");
        let mut stored_after = vec![type_one(&mut doc)];
        doc.end_compaction(Some(snapshot.upto_seq));
        assert_eq!(doc.snapshot_bytes, snapshot.data.len() as u64);
        assert_eq!(
            doc.updates_since_snapshot(),
            1,
            "the edit during the compaction"
        );
        let one_edit = doc.logged_bytes;
        assert!(one_edit > 0 && one_edit < 100, "{one_edit} bytes");

        let mut typed = 1u64;
        while !doc.compaction_due(1) {
            stored_after.push(type_one(&mut doc));
            typed += 1;
            assert!(typed < 4000, "never due");
        }
        assert!(doc.logged_bytes * SNAPSHOT_PER_LOG >= doc.snapshot_bytes);
        assert!(
            (doc.logged_bytes - one_edit) * SNAPSHOT_PER_LOG < doc.snapshot_bytes,
            "due as soon as the log weighs enough, not later"
        );
        assert!(
            typed > 10,
            "{typed} edits, each far smaller than the snapshot"
        );
        assert!(!doc.compaction_due(typed + 1));

        // A reload weighs its snapshot and log as the live document did.
        let reloaded = Document::load(StoredDoc {
            name: DocName::parse("main").expect("name"),
            snapshot: Some(snapshot),
            updates: stored_after,
        })
        .expect("loads");
        assert_eq!(
            (reloaded.snapshot_bytes, reloaded.logged_bytes),
            (doc.snapshot_bytes, doc.logged_bytes)
        );
        assert!(reloaded.compaction_due(typed));
    }

    /// The size limit refuses what passes it and nothing else, whatever its value: a limit
    /// past `i64::MAX` once wrapped to a negative one and refused every edit.
    #[test]
    fn the_size_limit_holds_at_both_ends() {
        let mut doc = Document::new(DocName::parse("main").expect("name"));
        let refused = doc
            .edit(0, vec![Component::Insert("abcd".into())], 3)
            .expect_err("4 units over a limit of 3");
        assert_eq!(refused.code, ErrorCode::TooLarge);
        for limit in [4, u64::MAX] {
            let mut doc = Document::new(DocName::parse("main").expect("name"));
            let edit = doc.edit(0, vec![Component::Insert("abcd".into())], limit);
            assert!(matches!(edit, Ok(Some(_))), "limit {limit}: {edit:?}");
        }
    }

    /// Readers see committed changes only, in order: with later edits applied but not yet
    /// committed, the summary is the text as of the last commit.
    #[test]
    fn the_summary_shows_only_committed_changes() {
        let mut doc = Document::new(DocName::parse("main").expect("name"));
        let mut applied = Vec::new();
        for (base, s) in ["a", "b", "c"].into_iter().enumerate() {
            let base = base as u64;
            let mut ops = vec![Component::Insert(s.to_owned())];
            if base > 0 {
                ops.insert(0, Component::Retain(base));
            }
            let edit = doc.edit(base, ops, 1 << 20).expect("an edit at the end");
            applied.push(edit.expect("a change"));
        }
        let read = |doc: &Document| {
            let summary = doc.summary();
            (summary.version, summary.text)
        };
        assert_eq!(read(&doc), (0, String::new()));
        let mut want = String::new();
        for edit in &applied {
            doc.committed(edit.version, Some(&edit.op));
            want.push_str(["a", "b", "c"][edit.version as usize - 1]);
            assert_eq!(read(&doc), (edit.version, want.clone()));
        }
        assert!(doc.is_settled());
    }

    /// A Yjs client `id` that has `seen` the given updates appends `s` at the end of its text.
    fn client_append(id: u64, seen: &[&Vec<u8>], s: &str) -> Vec<u8> {
        let client = Doc::with_options(Options {
            client_id: yrs::block::ClientID::new(id),
            offset_kind: OffsetKind::Utf16,
            ..Options::default()
        });
        let text = client.get_or_insert_text(CONTENT);
        for update in seen {
            let decoded = Update::decode_v1(update).unwrap();
            client.transact_mut().apply_update(decoded).unwrap();
        }
        let mut txn = client.transact_mut();
        text.push(&mut txn, s);
        txn.encode_update_v1()
    }

    /// Updates applied as one group make one version, one operation and one stored update, and
    /// read as the same text as the updates applied one by one. A refused update in the group
    /// leaves the others applied, and an update that builds on an earlier one of the group
    /// connects. The stored update is enough to rebuild the document.
    #[test]
    fn a_group_of_yjs_updates_is_one_version() {
        let a = client_append(1, &[], "a");
        let b = client_append(2, &[&a], "b");
        let c = client_append(3, &[&a, &b], "c");
        // Client 1 again, after b and c: its second update continues its first.
        let a2 = client_append(1, &[&a, &b, &c], "d");
        let updates = [&a, &b, &c, &a2];

        let mut one_by_one = Document::new(DocName::parse("main").expect("name"));
        for update in updates {
            commit_yjs(&mut one_by_one, update.clone(), "one update");
        }
        let read = |doc: &mut Document| {
            let summary = doc.summary();
            (summary.version, summary.text)
        };
        assert_eq!(read(&mut one_by_one), (4, "abcd".to_owned()));

        let mut grouped = Document::new(DocName::parse("main").expect("name"));
        let mut group: Vec<Vec<u8>> = updates.iter().map(|u| (*u).clone()).collect();
        group.insert(2, vec![0xff, 0x01]);
        let AppliedYjsGroup { results, applied } = grouped.apply_yjs_updates(group, 1 << 20);
        let oks: Vec<bool> = results.iter().map(Result::is_ok).collect();
        assert_eq!(
            oks,
            [true, true, false, true, true],
            "only the garbage is refused"
        );
        let applied = applied.expect("the group applied");
        assert_eq!((applied.version, applied.update.version), (1, 1));
        assert_eq!(applied.update.seq, 1);
        assert!(applied.op.is_some());
        // The one update brings a client that held none of it to the same text.
        assert_eq!(text_after(&[], &applied.update.data), "abcd");
        // Until it commits, readers see the text before it.
        assert_eq!(read(&mut grouped), (0, String::new()));
        grouped.committed(applied.version, applied.op.as_ref());
        assert!(grouped.is_settled());
        assert_eq!(read(&mut grouped), (1, "abcd".to_owned()));
        let reloaded = Document::load(StoredDoc {
            name: DocName::parse("main").expect("name"),
            snapshot: None,
            updates: vec![applied.update],
        })
        .expect("the stored update loads");
        assert_eq!(read(&mut { reloaded }).1, "abcd");
    }

    /// The text of a Yjs client that applied `seen`, then `update`.
    fn text_after(seen: &[&Vec<u8>], update: &[u8]) -> String {
        let client = Doc::new();
        let text = client.get_or_insert_text(CONTENT);
        for update in seen.iter().map(|u| u.as_slice()).chain([update]) {
            let decoded = Update::decode_v1(update).unwrap();
            client.transact_mut().apply_update(decoded).unwrap();
        }
        text.get_string(&client.transact())
    }

    /// A group's one update carries its deletions too, and nothing a refused update held: a
    /// client that had the text before the group reads what the document reads after it.
    #[test]
    fn a_groups_broadcast_is_what_the_document_took_in() {
        let hello = client_append(1, &[], "hello");
        let mut doc = Document::new(DocName::parse("main").expect("name"));
        commit_yjs(&mut doc, hello.clone(), "hello");
        let cut = {
            let client = Doc::with_client_id(2);
            let text = client.get_or_insert_text(CONTENT);
            let decoded = Update::decode_v1(&hello).unwrap();
            client.transact_mut().apply_update(decoded).unwrap();
            let mut txn = client.transact_mut();
            text.remove_range(&mut txn, 0, 1);
            txn.encode_update_v1()
        };
        let bang = client_append(3, &[&hello], "!");
        // Refused: it starts past anything the document holds of client 4.
        let gap = {
            let ahead = client_append(4, &[], "xx");
            client_append(4, &[&ahead], "yy")
        };
        let group = doc.apply_yjs_updates(vec![cut, gap, bang], 1 << 20);
        assert!(group.results[1].is_err(), "an update with a gap applied");
        let broadcast = group.applied.expect("two updates applied").update.data;
        let read = doc.doc.transact();
        assert_eq!(doc.text.get_string(&read), "ello!");
        assert_eq!(text_after(&[&hello], &broadcast), "ello!");
    }

    /// Applies a Yjs update that must be accepted, and marks it committed.
    fn commit_yjs(doc: &mut Document, update: Vec<u8>, what: &str) {
        let applied = doc.apply_yjs_update(update, 1 << 20).expect(what);
        doc.committed(applied.version, applied.op.as_ref());
    }

    /// Deletes must stay within what the document or the update holds; a real client's
    /// inserts and deletes, in one update or across two, are accepted.
    #[test]
    fn deletes_must_reach_only_known_clocks() {
        let mut doc = Document::new(DocName::parse("main").expect("name"));
        let client = Doc::with_options(Options {
            client_id: yrs::block::ClientID::new(42),
            offset_kind: OffsetKind::Utf16,
            ..Options::default()
        });
        let text = client.get_or_insert_text(CONTENT);
        let both = {
            let mut txn = client.transact_mut();
            text.insert(&mut txn, 0, "abcd");
            text.remove_range(&mut txn, 1, 2);
            txn.encode_update_v1()
        };
        commit_yjs(&mut doc, both, "insert and delete in one update");
        assert_eq!(doc.summary().text, "ad");
        let later = {
            let mut txn = client.transact_mut();
            text.remove_range(&mut txn, 0, 1);
            txn.encode_update_v1()
        };
        commit_yjs(&mut doc, later, "a delete of known text");
        assert_eq!(doc.summary().text, "d");

        // No blocks; a delete set for client 42: one range, clocks 10..15 (lib0 v1).
        let beyond = vec![0x00, 0x01, 0x2a, 0x01, 0x0a, 0x05];
        let refusal = doc
            .apply_yjs_update(beyond, 1 << 20)
            .map(|_| ())
            .expect_err("a delete past client 42's clock");
        assert!(refusal.message.contains("does not connect"), "{refusal:?}");
        assert_eq!(doc.summary().text, "d");
    }

    /// A snapshot replaces the log it covers, so one that does not load back to the same text
    /// must never be taken: the guard behind `begin_compaction`.
    #[test]
    fn only_a_snapshot_that_reloads_to_the_same_text_is_taken() {
        let name = DocName::parse("main").expect("name");
        let mut doc = Document::new(name.clone());
        let insert = vec![Component::Insert("hello".into())];
        let applied = doc
            .edit(0, insert, 1 << 20)
            .expect("edit")
            .expect("a change");
        doc.committed(applied.version, Some(&applied.op));
        let whole = doc.encode_whole();
        assert!(doc.reloads_as_is(&whole));
        assert!(
            !doc.reloads_as_is(&whole[..whole.len() / 2]),
            "a truncated snapshot"
        );
        assert!(!doc.reloads_as_is(&[0xff, 0xff, 0xff]), "garbage");
        let other = Document::new(name);
        assert!(
            !doc.reloads_as_is(&other.encode_whole()),
            "another document's snapshot"
        );
    }

    /// A client announcing a state at clock `u32::MAX` and then disconnecting made yrs add 1 to
    /// that clock, which panics with overflow checks (found by the `yjs` fuzz target).
    #[test]
    fn an_awareness_clock_near_its_end_is_refused_and_removal_stays_safe() {
        let mut doc = Document::new(DocName::parse("main").expect("name"));
        let client = yrs::block::ClientID::new(7);
        let update = |clock| AwarenessUpdate {
            clients: [(
                client,
                AwarenessUpdateEntry {
                    clock,
                    json: "{}".into(),
                },
            )]
            .into(),
        };
        let refused = doc.apply_awareness(update(u32::MAX));
        assert!(refused.is_err(), "{refused:?}");
        doc.apply_awareness(update(MAX_AWARENESS_CLOCK))
            .expect("the highest clock accepted");
        doc.remove_awareness(client);
        doc.remove_awareness(client);
    }

    /// y-websocket frames found by the `yjs` fuzz target (in `fuzz/corpus/yjs/`): their sync step
    /// 2 makes yrs's decoder overflow a `u32` (`overflow_in_update_decode`), or assert that a
    /// client id fits 53 bits (`client_id_past_53_bits`).
    const PANICKING: [&[u8]; 2] = [
        &[
            0x00, 0x01, 0x20, 0x01, 0x01, 0x01, 0x00, 0x04, 0x00, 0x02, 0x10, 0x01, 0x01, 0x6c,
            0x6f, 0x6e, 0x74, 0x65, 0x01, 0x06, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x02,
            0x10, 0x01, 0x01, 0x05, 0x01, 0x06, 0x00, 0x00, 0x01, 0xff, 0xff, 0xf0, 0xff, 0x20,
        ],
        &[
            0x00, 0x02, 0x1c, 0x01, 0x01, 0x01, 0x13, 0x01, 0x01, 0x00, 0xc5, 0x01, 0x0f, 0xff,
            0xef, 0xee, 0x84, 0xdd, 0x96, 0x92, 0xe5, 0x01, 0x01, 0x13, 0xc5, 0x01, 0x0f, 0x67,
            0x22, 0x7d, 0x00,
        ],
    ];

    /// Only builds with checks panic in yrs; release builds wrap instead.
    #[cfg(debug_assertions)]
    #[test]
    fn an_update_that_panics_the_decoder_is_refused() {
        for frame in PANICKING {
            let mut doc = Document::new(DocName::parse("main").expect("valid name"));
            let updates: Vec<Vec<u8>> = yjs::decode(frame)
                .into_iter()
                .filter_map(|m| match m {
                    Ok(Message::Sync(SyncMessage::SyncStep2(u) | SyncMessage::Update(u))) => {
                        Some(u)
                    }
                    _ => None,
                })
                .collect();
            assert!(!updates.is_empty(), "the frame holds no update");
            let refusals: Vec<Refusal> = updates
                .into_iter()
                .filter_map(|u| doc.apply_yjs_update(u, 1 << 20).err())
                .collect();
            assert!(
                refusals
                    .iter()
                    .any(|r| r.code == ErrorCode::BadRequest && r.message.contains("panic")),
                "{refusals:?}"
            );
            assert_eq!(doc.summary().text, "");
            assert_eq!(doc.version(), 0);
        }
    }

    /// A y-websocket frame found by the `yjs` fuzz target (`fuzz/corpus/yjs/
    /// unreadable_pending_update`): yrs accepted its update, held it pending, and then could
    /// not merge it back when the whole document was encoded. `encode_whole` still guards
    /// against that, but the update no longer gets in: it does not connect.
    const UNREADABLE_PENDING: &[u8] = &[
        0x00, 0x01, 0x20, 0x01, 0x01, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x00, 0x06, 0x01, 0x00,
        0x04, 0x00, 0x2b, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xab, 0x00, 0x00, 0xc5, 0x00,
        0x00, 0x00, 0xff, 0xff, 0xff, 0x10, 0x06, 0xff, 0xd5, 0x00, 0x06, 0xff, 0x20,
    ];

    #[test]
    fn an_update_yrs_would_hold_pending_is_refused_and_the_document_compacts() {
        let name = DocName::parse("main").expect("valid name");
        let mut doc = Document::new(name.clone());
        let seed = doc
            .edit(0, vec![Component::Insert("kept".into())], 1 << 20)
            .expect("a valid edit")
            .expect("a change");
        doc.committed(seed.version, Some(&seed.op));
        let mut accepted = 0;
        for message in yjs::decode(UNREADABLE_PENDING) {
            if let Ok(Message::Sync(SyncMessage::SyncStep2(u) | SyncMessage::Update(u))) = message
                && let Ok(applied) = doc.apply_yjs_update(u, 1 << 20)
            {
                doc.committed(applied.version, applied.op.as_ref());
                accepted += 1;
            }
        }
        // It used to be accepted and held pending; it does not connect, so it is refused now.
        assert_eq!(accepted, 0, "the fuzzer's update was accepted");
        let snapshot = doc.begin_compaction().expect("a settled document compacts");
        let reloaded = Document::load(StoredDoc {
            name,
            snapshot: Some(snapshot),
            updates: Vec::new(),
        })
        .expect("the snapshot loads");
        assert_eq!(reloaded.summary().text, "kept");
    }
}
