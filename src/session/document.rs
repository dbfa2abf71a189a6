//! One co-edited document of a session: a `yrs::Doc` whose `Y.Text` named `content` is the text,
//! with the OT history JSON edits are rebased on, and a mirror of the committed text.
//!
//! The yrs document runs ahead of the store: an edit is applied to it as soon as it is accepted,
//! so the next edit is checked and rebased against it. What readers see (`joined`, REST) is the
//! committed mirror, advanced only when a batch commits, so no one is shown a change a crash
//! could take back.

use std::collections::VecDeque;

use yrs::updates::decoder::Decode;
use yrs::{
    Doc, GetString, OffsetKind, Options, ReadTxn, StateVector, Text, TextRef, Transact, Update,
};

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
    /// The version including edits not yet committed.
    version: u64,
    next_seq: u64,
    /// `(version, operation)` for the newest versions, oldest first.
    history: VecDeque<(u64, Operation)>,
    committed_text: Vec<u16>,
    committed_version: u64,
    /// The seq the stored snapshot covers; updates after it are replayed on load.
    snapshot_seq: u64,
    compacting: bool,
}

fn new_doc() -> (Doc, TextRef) {
    let doc = Doc::with_options(Options {
        offset_kind: OffsetKind::Utf16,
        ..Options::default()
    });
    let text = doc.get_or_insert_text(CONTENT);
    (doc, text)
}

impl Document {
    /// A document that does not exist yet: version 0, empty.
    pub fn new(name: DocName) -> Self {
        let (doc, text) = new_doc();
        Self {
            name,
            doc,
            text,
            version: 0,
            next_seq: 1,
            history: VecDeque::new(),
            committed_text: Vec::new(),
            committed_version: 0,
            snapshot_seq: 0,
            compacting: false,
        }
    }

    /// Rebuilds a document from its snapshot and the updates after it.
    pub fn load(stored: StoredDoc) -> Result<Self, LoadError> {
        let fail = |reason: String| LoadError {
            doc: stored.name.to_string(),
            reason,
        };
        let (doc, text) = new_doc();
        {
            let mut txn = doc.transact_mut();
            let snapshot = stored.snapshot.iter().map(|s| &s.data);
            for data in snapshot.chain(stored.updates.iter().map(|u| &u.data)) {
                let update = Update::decode_v1(data).map_err(|e| fail(e.to_string()))?;
                txn.apply_update(update).map_err(|e| fail(e.to_string()))?;
            }
        }
        let committed_text = text.get_string(&doc.transact()).encode_utf16().collect();
        let version = stored.version();
        Ok(Self {
            name: stored.name.clone(),
            doc,
            text,
            version,
            next_seq: stored.last_seq() + 1,
            history: VecDeque::new(),
            committed_text,
            committed_version: version,
            snapshot_seq: stored.snapshot.as_ref().map_or(0, |s| s.upto_seq),
            compacting: false,
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
        for (_, earlier) in self.history.iter().filter(|(v, _)| *v > base) {
            op = transform(earlier, &op).1;
        }
        let current: Vec<u16> = self
            .text
            .get_string(&self.doc.transact())
            .encode_utf16()
            .collect();
        op.check(&current)
            .map_err(|e| Refusal::bad_request(e.to_string()))?;
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
        self.version += 1;
        self.history.push_back((self.version, op.clone()));
        if self.history.len() > HISTORY {
            self.history.pop_front();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
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

    /// The version the next edit would be based on, committed or not.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Advances the committed mirror by one committed edit.
    pub fn committed(&mut self, version: u64, op: &Operation) {
        match op.apply(&self.committed_text) {
            Ok(text) => {
                self.committed_text = text;
                self.committed_version = version;
            }
            // Cannot happen: the op was checked against a text that includes this one.
            Err(err) => {
                tracing::error!(doc = %self.name, %err, "committed op did not apply to the mirror")
            }
        }
    }

    /// The committed state, as `joined` and REST show it.
    pub fn summary(&self) -> DocSummary {
        DocSummary {
            name: self.name.to_string(),
            version: self.committed_version,
            text: String::from_utf16_lossy(&self.committed_text),
        }
    }

    /// Updates stored since the snapshot.
    pub fn updates_since_snapshot(&self) -> u64 {
        (self.next_seq - 1).saturating_sub(self.snapshot_seq)
    }

    /// A snapshot of the whole document, if everything in memory is committed and no other
    /// compaction is running. Marks the document as compacting.
    pub fn begin_compaction(&mut self) -> Option<DocSnapshot> {
        if self.compacting
            || self.version != self.committed_version
            || self.updates_since_snapshot() == 0
        {
            return None;
        }
        self.compacting = true;
        let data = self
            .doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        Some(DocSnapshot {
            upto_seq: self.next_seq - 1,
            version: self.committed_version,
            data,
        })
    }

    pub fn end_compaction(&mut self, stored: Option<u64>) {
        self.compacting = false;
        if let Some(upto_seq) = stored {
            self.snapshot_seq = upto_seq;
        }
    }
}
