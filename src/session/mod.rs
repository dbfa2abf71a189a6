//! Live sessions: the [`SessionActor`] that owns each one, the messages it takes, its event log
//! records and the node's registry of live sessions.

mod actor;
pub mod document;
mod fanout;
pub mod log;
mod messages;
mod mirror;
pub mod ot;
mod registry;
mod relay;
mod remote;

pub use actor::SessionActor;
#[cfg(feature = "fault-injection")]
pub use messages::InjectPanic;
pub use messages::{
    AppendEvent, Archive, Committed, ConnId, Deliver, DeliverBinary, Disconnect, Drain, Edit,
    FrameClass, Inspect, Join, Leave, LiveView, PostChat, REPLAY_BUDGET_FACTOR, ReadDoc, Reply,
    SetPresence, YjsAttach, YjsAwareness, YjsAwarenessQuery, YjsSyncStep1, YjsUpdate,
};
pub use messages::{PendingGuard, Reattach, Unanswered};
pub use registry::{SessionDeps, SessionRegistry};
