//! Merges the Yjs updates of one committed batch into one frame per document.
//!
//! Under load a batch holds many updates to the same document, often from several clients.
//! Sending each one to each Yjs client costs a message, a WebSocket frame and a write per update
//! per client; one merged update costs one of each per client. Most of the merging is done
//! before this: the updates the session applied in one transaction come here as one update,
//! the transaction's (`Document::apply_yjs_updates`). What is left, the few updates of a batch
//! that several transactions or JSON edits made, is merged with `yrs::merge_updates_v1`. The
//! merged update goes to every client of the document, its authors too, as the y-websocket
//! server sends every update: Yjs ignores what a document already holds. Only when every update
//! came from one client is that client skipped, so a lone typist never gets its own keys back.

use std::panic::{AssertUnwindSafe, catch_unwind};

use bytes::Bytes;

use super::messages::ConnId;
use crate::protocol::DocName;
use crate::protocol::yjs;

/// One update of a batch, and the connection that sent it (`None`: a JSON edit or REST).
struct Authored {
    origin: Option<ConnId>,
    update: Vec<u8>,
}

/// A y-websocket update frame for the clients of `doc`, except `skip`.
pub struct DocFrame {
    pub doc: DocName,
    pub frame: Bytes,
    pub skip: Option<ConnId>,
}

/// The Yjs updates one commit made, per document, in commit order.
#[derive(Default)]
pub struct YjsFanout {
    docs: Vec<(DocName, Vec<Authored>)>,
}

impl YjsFanout {
    /// Adds `update` to `doc`'s frame; `origin` is the one connection that wrote all of it,
    /// if one did.
    pub fn push(&mut self, doc: &DocName, origin: Option<ConnId>, update: Vec<u8>) {
        let authored = Authored { origin, update };
        match self.docs.iter_mut().find(|(name, _)| name == doc) {
            Some((_, updates)) => updates.push(authored),
            None => self.docs.push((doc.clone(), vec![authored])),
        }
    }

    /// The frames to send: one per document, or one per update where merging failed.
    pub fn frames(self) -> Vec<DocFrame> {
        let mut frames = Vec::with_capacity(self.docs.len());
        for (doc, mut updates) in self.docs {
            if updates.len() == 1 {
                let only = updates.remove(0);
                frames.push(DocFrame {
                    doc,
                    frame: yjs::update(only.update),
                    skip: only.origin,
                });
                continue;
            }
            let origin = updates[0].origin.clone();
            let one_author = updates.iter().all(|u| u.origin == origin);
            // The updates were applied to the document already, so they decode; the catch is for
            // a yrs panic on some corner of them, after which each goes out on its own.
            let merged = catch_unwind(AssertUnwindSafe(|| {
                yrs::merge_updates_v1(updates.iter().map(|u| u.update.as_slice()))
            }));
            match merged {
                Ok(Ok(update)) => frames.push(DocFrame {
                    doc,
                    frame: yjs::update(update),
                    skip: if one_author { origin } else { None },
                }),
                _ => {
                    tracing::warn!(%doc, count = updates.len(), "Yjs updates did not merge; sending them one by one");
                    frames.extend(updates.into_iter().map(|u| DocFrame {
                        doc: doc.clone(),
                        frame: yjs::update(u.update),
                        skip: u.origin,
                    }));
                }
            }
        }
        frames
    }
}

#[cfg(test)]
mod tests {
    use yrs::updates::decoder::Decode;
    use yrs::{Doc, GetString, ReadTxn, Text, Transact, Update};

    use super::*;

    fn typed(client: u64, text: &str) -> Vec<u8> {
        let doc = Doc::with_client_id(client);
        let content = doc.get_or_insert_text("content");
        content.insert(&mut doc.transact_mut(), 0, text);
        doc.transact()
            .encode_state_as_update_v1(&yrs::StateVector::default())
    }

    /// The update inside a y-websocket update frame.
    fn payload(frame: &Bytes) -> Vec<u8> {
        match yjs::decode(frame).as_slice() {
            [Ok(yrs::sync::Message::Sync(yrs::sync::SyncMessage::Update(update)))] => {
                update.clone()
            }
            other => panic!("not one update frame: {other:?}"),
        }
    }

    fn text_of(updates: &[Vec<u8>]) -> String {
        let doc = Doc::new();
        let content = doc.get_or_insert_text("content");
        for update in updates {
            let update = Update::decode_v1(update).expect("decodes");
            doc.transact_mut().apply_update(update).expect("applies");
        }
        content.get_string(&doc.transact())
    }

    #[test]
    fn updates_of_one_document_go_out_as_one_frame_that_holds_them_all() {
        let doc = DocName::parse("notes").expect("name");
        let other = DocName::parse("other").expect("name");
        let (a, b): (ConnId, ConnId) = ("a".into(), "b".into());
        let mut fanout = YjsFanout::default();
        fanout.push(&doc, Some(a.clone()), typed(1, "one"));
        fanout.push(&other, Some(a.clone()), typed(3, "elsewhere"));
        fanout.push(&doc, Some(b), typed(2, "two"));
        let frames = fanout.frames();
        assert_eq!(frames.len(), 2);
        // Two authors: nobody is skipped, and the one frame carries both updates.
        assert_eq!(frames[0].doc, doc);
        assert_eq!(frames[0].skip, None);
        let merged = text_of(&[payload(&frames[0].frame)]);
        assert!(merged.contains("one") && merged.contains("two"), "{merged}");
        // One update: its author is skipped.
        assert_eq!(frames[1].doc, other);
        assert_eq!(frames[1].skip, Some(a));
        assert_eq!(text_of(&[payload(&frames[1].frame)]), "elsewhere");
    }

    #[test]
    fn a_lone_author_is_skipped_even_when_its_updates_merge() {
        let doc = DocName::parse("notes").expect("name");
        let a: ConnId = "a".into();
        let mut fanout = YjsFanout::default();
        fanout.push(&doc, Some(a.clone()), typed(1, "x"));
        fanout.push(&doc, Some(a.clone()), typed(2, "y"));
        let frames = fanout.frames();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].skip, Some(a));
    }

    #[test]
    fn updates_that_do_not_merge_go_out_one_by_one() {
        let doc = DocName::parse("notes").expect("name");
        let (a, b): (ConnId, ConnId) = ("a".into(), "b".into());
        let mut fanout = YjsFanout::default();
        fanout.push(&doc, Some(a.clone()), vec![0xff, 0xff, 0xff]);
        fanout.push(&doc, Some(b.clone()), typed(2, "fine"));
        let frames = fanout.frames();
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].skip, Some(a));
        assert_eq!(frames[1].skip, Some(b));
    }
}
