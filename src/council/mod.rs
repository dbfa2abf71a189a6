//! Council deliberation: a [`CouncilActor`] per open council, its model and strategies, the
//! node's registry of open councils, and the checks every door shares.

pub mod access;
mod actor;
pub mod model;
mod registry;
pub mod strategy;

#[cfg(feature = "fault-injection")]
pub use actor::InjectCouncilPanic;
pub use actor::{CastBallot, CouncilActor, CouncilDeps};
pub use model::{Council, CouncilRequest, CouncilView, Phase};
pub use registry::Councils;
