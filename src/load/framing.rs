//! The envelopes the Yjs scenarios speak: y-websocket's, where a frame is bare y-protocols
//! messages, and Hocuspocus's, where every message is addressed to a document.
//!
//! Hocuspocus 4 (`@hocuspocus/server`, `@hocuspocus/provider`) multiplexes documents over one
//! socket, so each message starts with the document name as a lib0 varstring, then a varuint
//! message type of its own numbering (0 sync, 1 awareness, 2 auth, 3 query awareness, 4 sync
//! reply, 5 stateless, 7 close, 8 sync status, …). Sync payloads are y-protocols' unchanged.
//! The server queues everything for a document until its auth message, `[doc][2][0 token]
//! [varstring token][varstring provider version]`, which it answers with `[doc][2][2
//! authenticated][varstring scope]` or `[doc][2][1 permission denied][varstring reason]`. It
//! acknowledges every update with a sync status message, which the load client ignores.

use bytes::Bytes;
use clap::ValueEnum;
use yrs::encoding::read::Read as _;
use yrs::encoding::write::Write as _;
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::{Decode as _, DecoderV1};
use yrs::updates::encoder::{Encode as _, Encoder as _, EncoderV1};

use crate::protocol::yjs as frames;

/// Which envelope a Yjs server expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Framing {
    /// y-websocket: the room is the URL's last path segment; frames are bare messages.
    #[default]
    #[value(name = "y-websocket")]
    YWebsocket,
    /// Hocuspocus 4: every message is prefixed with the document name; auth comes first.
    Hocuspocus,
}

/// Hocuspocus's message types (`MessageType` in `@hocuspocus/server`).
mod kind {
    pub const SYNC: u32 = 0;
    pub const AUTH: u32 = 2;
    pub const SYNC_REPLY: u32 = 4;
    pub const CLOSE: u32 = 7;
}

/// Hocuspocus's auth sub-types (`AuthMessageType` in `@hocuspocus/common`).
mod auth {
    pub const TOKEN: u32 = 0;
    pub const PERMISSION_DENIED: u32 = 1;
    pub const AUTHENTICATED: u32 = 2;
}

/// What the provider-version field of our auth message says: who is speaking.
const PROVIDER_VERSION: &str = concat!("conclave-load/", env!("CARGO_PKG_VERSION"));

/// One message from the server, as far as a load client cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Sync(SyncMessage),
    /// Hocuspocus accepted the token for this document.
    Authenticated,
    /// The server refuses this client: y-protocols' or Hocuspocus's permission denied.
    Denied(String),
    /// Hocuspocus closed the document for this client.
    Closed(String),
    /// Hocuspocus asks for the token again.
    TokenRequest,
    /// Awareness, sync status, stateless: nothing the load client reads.
    Other,
}

/// A message the server sent that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadFrame(pub String);

impl From<yrs::encoding::read::Error> for BadFrame {
    fn from(err: yrs::encoding::read::Error) -> Self {
        Self(err.to_string())
    }
}

/// Encodes and decodes one client's frames for one document.
#[derive(Debug, Clone)]
pub struct Codec {
    framing: Framing,
    doc: String,
}

impl Codec {
    /// `doc` is the room: Hocuspocus's document name.
    pub fn new(framing: Framing, doc: impl Into<String>) -> Self {
        Self {
            framing,
            doc: doc.into(),
        }
    }

    /// What a client sends before anything else: Hocuspocus's auth message (an empty token
    /// when there is none, as the provider sends). y-websocket needs nothing.
    pub fn hello(&self, token: Option<&str>) -> Option<Bytes> {
        match self.framing {
            Framing::YWebsocket => None,
            Framing::Hocuspocus => {
                let mut out = self.addressed();
                out.write_var(kind::AUTH);
                out.write_var(auth::TOKEN);
                out.write_string(token.unwrap_or(""));
                out.write_string(PROVIDER_VERSION);
                Some(Bytes::from(out.to_vec()))
            }
        }
    }

    pub fn sync(&self, message: SyncMessage) -> Bytes {
        match self.framing {
            Framing::YWebsocket => match message {
                SyncMessage::SyncStep1(sv) => frames::sync_step1(sv),
                SyncMessage::SyncStep2(diff) => frames::sync_step2(diff),
                SyncMessage::Update(update) => frames::update(update),
            },
            Framing::Hocuspocus => {
                let mut out = self.addressed();
                Message::Sync(message).encode(&mut out);
                Bytes::from(out.to_vec())
            }
        }
    }

    /// Every message in one binary frame. A part that cannot be read is an error; the messages
    /// before it are kept.
    pub fn decode(&self, frame: &[u8]) -> Vec<Result<Incoming, BadFrame>> {
        match self.framing {
            Framing::YWebsocket => frames::decode(frame)
                .into_iter()
                .map(|message| {
                    Ok(match message? {
                        Message::Sync(sync) => Incoming::Sync(sync),
                        Message::Auth(Some(reason)) => Incoming::Denied(reason),
                        _ => Incoming::Other,
                    })
                })
                .collect(),
            Framing::Hocuspocus => vec![self.decode_hocuspocus(frame)],
        }
    }

    /// One Hocuspocus message: the server sends each in a frame of its own.
    fn decode_hocuspocus(&self, frame: &[u8]) -> Result<Incoming, BadFrame> {
        let mut decoder = DecoderV1::from(frame);
        let doc = decoder.read_string()?;
        // The server may address a session-aware provider as `doc\0session`.
        let name = doc.split('\0').next().unwrap_or(doc);
        if name != self.doc {
            return Err(BadFrame(format!(
                "a message for document {name:?} on the socket of {:?}",
                self.doc
            )));
        }
        Ok(match decoder.read_var::<u32>()? {
            kind::SYNC | kind::SYNC_REPLY => Incoming::Sync(SyncMessage::decode(&mut decoder)?),
            kind::AUTH => match decoder.read_var::<u32>()? {
                auth::TOKEN => Incoming::TokenRequest,
                auth::PERMISSION_DENIED => Incoming::Denied(decoder.read_string()?.to_owned()),
                auth::AUTHENTICATED => Incoming::Authenticated,
                other => return Err(BadFrame(format!("unknown auth message type {other}"))),
            },
            kind::CLOSE => Incoming::Closed(decoder.read_string()?.to_owned()),
            _ => Incoming::Other,
        })
    }

    /// A fresh buffer holding the document's address, for Hocuspocus.
    fn addressed(&self) -> EncoderV1 {
        let mut out = EncoderV1::new();
        out.write_string(&self.doc);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::StateVector;

    const DOC: &str = "load-1/doc";

    /// lib0's varstring: a varuint byte length, then UTF-8.
    fn varstring(s: &str) -> Vec<u8> {
        let mut out = vec![u8::try_from(s.len()).unwrap()];
        out.extend_from_slice(s.as_bytes());
        out
    }

    fn with_address(rest: &[u8]) -> Vec<u8> {
        let mut out = varstring(DOC);
        out.extend_from_slice(rest);
        out
    }

    #[test]
    fn y_websocket_frames_are_bare_messages() {
        let codec = Codec::new(Framing::YWebsocket, DOC);
        assert_eq!(codec.hello(Some("t")), None);
        let step1 = codec.sync(SyncMessage::SyncStep1(StateVector::default()));
        assert_eq!(&step1[..], &[0, 0, 1, 0]);
        assert_eq!(&codec.sync(SyncMessage::Update(vec![7]))[..], &[0, 2, 1, 7]);
        assert_eq!(
            codec.decode(&[0, 1, 2, 9, 8, 2, 0, 3, b'n', b'o', b'!']),
            vec![
                Ok(Incoming::Sync(SyncMessage::SyncStep2(vec![9, 8]))),
                Ok(Incoming::Denied("no!".into())),
            ]
        );
    }

    /// The bytes `@hocuspocus/provider` 4.8 writes: AuthenticationMessage, SyncStepOneMessage
    /// and UpdateMessage, each `[varstring doc][varuint type]…`.
    #[test]
    fn hocuspocus_frames_carry_the_document_name() {
        let codec = Codec::new(Framing::Hocuspocus, DOC);
        let mut auth = with_address(&[2, 0]);
        auth.extend(varstring("secret"));
        auth.extend(varstring(PROVIDER_VERSION));
        assert_eq!(codec.hello(Some("secret")).as_deref(), Some(&auth[..]));
        let mut anonymous = with_address(&[2, 0, 0]);
        anonymous.extend(varstring(PROVIDER_VERSION));
        assert_eq!(codec.hello(None).as_deref(), Some(&anonymous[..]));
        assert_eq!(
            &codec.sync(SyncMessage::SyncStep1(StateVector::default()))[..],
            &with_address(&[0, 0, 1, 0])[..]
        );
        let update = codec.sync(SyncMessage::Update(vec![5; 200]));
        assert_eq!(
            &update[..DOC.len() + 5],
            &with_address(&[0, 2, 0xC8, 0x01])[..]
        );
        assert_eq!(update.len(), DOC.len() + 1 + 4 + 200);
    }

    /// What `@hocuspocus/server` 4.7 sends: Authenticated, the sync reply, a sync status, an
    /// awareness update, a close, and a denial.
    #[test]
    fn hocuspocus_server_messages_decode() {
        let codec = Codec::new(Framing::Hocuspocus, DOC);
        let decode = |rest: &[u8]| codec.decode(&with_address(rest));
        let mut authenticated = vec![2, 2];
        authenticated.extend(varstring("read-write"));
        assert_eq!(decode(&authenticated), vec![Ok(Incoming::Authenticated)]);
        assert_eq!(
            decode(&[0, 1, 2, 0, 0]),
            vec![Ok(Incoming::Sync(SyncMessage::SyncStep2(vec![0, 0])))]
        );
        assert_eq!(
            decode(&[4, 0, 1, 0]),
            vec![Ok(Incoming::Sync(SyncMessage::SyncStep1(
                StateVector::default()
            )))]
        );
        assert_eq!(decode(&[8, 1]), vec![Ok(Incoming::Other)]);
        assert_eq!(decode(&[1, 1, 0]), vec![Ok(Incoming::Other)]);
        let mut close = vec![7];
        close.extend(varstring("bye"));
        assert_eq!(decode(&close), vec![Ok(Incoming::Closed("bye".into()))]);
        let mut denied = vec![2, 1];
        denied.extend(varstring("permission-denied"));
        assert_eq!(
            decode(&denied),
            vec![Ok(Incoming::Denied("permission-denied".into()))]
        );
        assert_eq!(decode(&[2, 0]), vec![Ok(Incoming::TokenRequest)]);
        // A session-aware address still names the document.
        let mut session = varstring(&format!("{DOC}\0abc"));
        session.extend([0, 2, 1, 7]);
        assert_eq!(
            codec.decode(&session),
            vec![Ok(Incoming::Sync(SyncMessage::Update(vec![7])))]
        );
    }

    #[test]
    fn hocuspocus_garbage_is_an_error() {
        let codec = Codec::new(Framing::Hocuspocus, DOC);
        let mut other = varstring("another/doc");
        other.extend([0, 2, 1, 7]);
        assert!(codec.decode(&other)[0].is_err());
        assert!(codec.decode(&with_address(&[0, 9, 1]))[0].is_err());
        assert!(codec.decode(&with_address(&[2, 7]))[0].is_err());
        assert!(codec.decode(&[40, b'x'])[0].is_err());
        assert!(codec.decode(&[])[0].is_err());
    }
}
