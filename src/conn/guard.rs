//! The checks every text frame passes before it is parsed, shared by the user and worker
//! sockets: its size, and the connection's rate.
//!
//! [`classify`] sorts what the socket delivers into what a JSON protocol does with it.
//!
//! A frame over either limit is refused with an error and the socket lives on; a client that
//! keeps at it is closed (1009 for size, 1008 for rate), as PROTOCOL.md promises.

use super::socket::{CloseCode, ProtocolError, Received};
use bytestring::ByteString;

use super::rate::TokenBucket;
use crate::protocol::frames::reference_of;
use crate::protocol::{ErrorCode, Refusal};

/// Oversized frames tolerated before the socket is closed with 1009.
const OVERSIZE_STRIKES: u32 = 3;

/// What to do with one frame.
#[derive(Debug)]
pub enum Verdict {
    /// Parse and serve it.
    Admit,
    /// Answer with this error (carrying the frame's `ref`, if it had one) and go on.
    Refuse(Refusal, Option<String>),
    /// Send this error and close the socket with the code.
    Close(CloseCode, Refusal),
}

/// A connection's frame limits and its strikes against them.
pub struct FrameGuard {
    max_frame_bytes: usize,
    bucket: TokenBucket,
    rate_per_s: u32,
    abuse_strikes: u32,
    /// Frames refused for rate in a row.
    rate_strikes: u32,
    oversize_strikes: u32,
}

impl FrameGuard {
    pub fn new(max_frame_bytes: usize, rate_per_s: u32, burst: u32, abuse_strikes: u32) -> Self {
        Self {
            max_frame_bytes,
            bucket: TokenBucket::new(rate_per_s, burst),
            rate_per_s,
            abuse_strikes,
            rate_strikes: 0,
            oversize_strikes: 0,
        }
    }

    pub fn check(&mut self, text: &str) -> Verdict {
        if text.len() > self.max_frame_bytes {
            self.oversize_strikes += 1;
            let refusal = Refusal::new(
                ErrorCode::TooLarge,
                format!("frame exceeds the limit of {} bytes", self.max_frame_bytes),
            );
            // Reading the `ref` of an oversized frame would mean parsing it: it gets none.
            return if self.oversize_strikes >= OVERSIZE_STRIKES {
                Verdict::Close(CloseCode::Size, refusal)
            } else {
                Verdict::Refuse(refusal, None)
            };
        }
        if !self.bucket.take() {
            self.rate_strikes += 1;
            let refusal = Refusal::new(
                ErrorCode::RateLimited,
                format!("more than {} frames a second; slow down", self.rate_per_s),
            );
            return if self.rate_strikes >= self.abuse_strikes {
                Verdict::Close(CloseCode::Policy, refusal)
            } else {
                Verdict::Refuse(refusal, reference_of(text))
            };
        }
        self.rate_strikes = 0;
        Verdict::Admit
    }
}

/// What a JSON socket does with one WebSocket message.
#[derive(Debug)]
pub enum Inbound {
    /// A text frame: check it, parse it, serve it.
    Text(ByteString),
    /// Answer with this error and go on.
    Refuse(Refusal),
    /// Control frames the codec already answered.
    Ignore,
    /// The client closed the socket.
    Closed,
    /// Send this error and close with the code.
    Fatal(CloseCode, Refusal),
}

pub fn classify(item: Result<Received, ProtocolError>) -> Inbound {
    match item {
        Ok(Received::Text(text)) => Inbound::Text(text),
        Ok(Received::Binary(_)) => {
            Inbound::Refuse(Refusal::bad_request("this protocol is JSON text frames"))
        }
        Ok(Received::Ping(_) | Received::Pong(_)) => Inbound::Ignore,
        Ok(Received::Close(_)) => Inbound::Closed,
        // The codec cannot skip a frame it refused to buffer, so this one ends the socket.
        Err(ProtocolError::Overflow) => Inbound::Fatal(
            CloseCode::Size,
            Refusal::new(ErrorCode::TooLarge, "frame exceeds the hard size limit"),
        ),
        Err(err) => Inbound::Fatal(
            CloseCode::Protocol,
            Refusal::bad_request(format!("websocket protocol error: {err}")),
        ),
    }
}
