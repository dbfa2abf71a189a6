//! The typed commands nodes send each other on the bus, as JSON. A message that does not
//! decode is dropped with a log line and `conclave_bus_corrupt_total`.

use serde::{Deserialize, Serialize};

use crate::session::log::NewEvent;
use crate::telemetry;

/// A command for the node that owns a session (`Channel::SessionIn`). Externally tagged
/// (`{"append_event": {…}}`), unlike the client protocol: an event's data is a `RawValue`, which
/// cannot pass through the buffering that serde's internally tagged enums do.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToOwner {
    /// Append an event another node produced for the session (a task or council transition,
    /// already durable in its own table).
    AppendEvent { event: NewEvent },
}

impl ToOwner {
    /// The command as JSON; an event whose data cannot be encoded goes as an empty payload,
    /// which the owner counts as corrupt.
    pub fn encode(&self) -> bytes::Bytes {
        serde_json::to_vec(self).unwrap_or_default().into()
    }
}

/// Decodes a command, or counts and logs it as corrupt.
pub fn decode_to_owner(payload: &[u8]) -> Option<ToOwner> {
    match serde_json::from_slice(payload) {
        Ok(command) => Some(command),
        Err(err) => {
            telemetry::bus_corrupt();
            tracing::warn!(%err, "dropping a corrupt bus command");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::log::{Actor, EventKind};

    #[test]
    fn an_event_round_trips_and_garbage_is_refused() {
        let event = NewEvent::new(
            EventKind::Chat,
            Actor {
                id: "u".into(),
                name: "U".into(),
            },
            &serde_json::json!({"text": "hi", "n": [1, 2]}),
        );
        let encoded = ToOwner::AppendEvent {
            event: event.clone(),
        }
        .encode();
        let Some(ToOwner::AppendEvent { event: decoded }) = decode_to_owner(&encoded) else {
            panic!(
                "the command did not decode: {}",
                String::from_utf8_lossy(&encoded)
            );
        };
        assert_eq!(decoded.kind, event.kind);
        assert_eq!(decoded.data.get(), event.data.get());
        assert_eq!(decoded.at, event.at);
        assert!(decode_to_owner(b"{not json").is_none());
        assert!(decode_to_owner(br#"{"launch_missiles": {}}"#).is_none());
    }
}
