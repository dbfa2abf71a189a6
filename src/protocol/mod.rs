//! Wire types: identifiers, error codes and the native JSON frames.
//!
//! Everything that arrives from a socket or a REST body is parsed into these types at the edge;
//! the actors behind never see raw JSON except opaque user data (presence state, event data).

pub mod error;
pub mod frames;
pub mod ids;
pub mod worker;
pub mod yjs;

pub use error::{ErrorCode, Refusal};
pub use frames::{Command, Request, Role, ServerFrame, UserInfo, parse_request};
pub use ids::{CouncilId, DocName, InvalidName, LeaseId, SessionId, TaskId, TaskKind, WorkerId};
