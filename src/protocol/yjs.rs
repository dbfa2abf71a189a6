//! The y-websocket binary protocol's frames, encoded with `yrs::sync`.
//!
//! Incoming frames are decoded at the edge (in `YjsConn`) into `yrs::sync::Message`s; the
//! session actor receives typed messages and answers with frames built here.

use bytes::Bytes;
use yrs::StateVector;
use yrs::sync::awareness::AwarenessUpdate;
use yrs::sync::{Message, MessageReader, SyncMessage};
use yrs::updates::decoder::DecoderV1;
use yrs::updates::encoder::Encode;

/// The message y-protocols' auth handler shows when an update is refused.
pub const PERMISSION_DENIED: &str = "permission denied";

fn encode(message: Message) -> Bytes {
    Bytes::from(message.encode_v1())
}

/// Sync step 1: "here is my state vector; send me what I miss".
pub fn sync_step1(sv: StateVector) -> Bytes {
    encode(Message::Sync(SyncMessage::SyncStep1(sv)))
}

/// Sync step 2: the updates the other side misses.
pub fn sync_step2(diff: Vec<u8>) -> Bytes {
    encode(Message::Sync(SyncMessage::SyncStep2(diff)))
}

/// An incremental document update.
pub fn update(data: Vec<u8>) -> Bytes {
    encode(Message::Sync(SyncMessage::Update(data)))
}

pub fn awareness(update: AwarenessUpdate) -> Bytes {
    encode(Message::Awareness(update))
}

/// The y-protocols auth message that refuses a client's writes.
pub fn permission_denied() -> Bytes {
    encode(Message::Auth(Some(PERMISSION_DENIED.to_owned())))
}

/// Decodes every message packed in one binary frame. A malformed frame yields an error for the
/// part that could not be read; the messages before it are kept.
pub fn decode(frame: &[u8]) -> Vec<Result<Message, yrs::encoding::read::Error>> {
    let mut decoder = DecoderV1::from(frame);
    MessageReader::new(&mut decoder).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_sync_messages_and_refuses_garbage() {
        let frame = sync_step2(vec![0, 0]);
        let decoded = decode(&frame);
        assert!(matches!(
            decoded.as_slice(),
            [Ok(Message::Sync(SyncMessage::SyncStep2(_)))]
        ));
        assert!(decode(&[0, 9, 1]).iter().any(Result::is_err));
        assert!(decode(&[]).is_empty());
    }
}
