//! Tasks and workers: the durable queue's model, the node's [`Scheduler`], and the messages
//! between it and worker connections.

pub mod access;
mod handle;
mod messages;
mod model;
mod scheduler;

pub use handle::SchedulerHandle;
pub use messages::{
    CancelTask, DrainWorker, ListWorkers, PickWorkers, RegisterWorker, Report, SubmitTask,
    TaskFinished, TaskReport, ToWorker, WatchTask, WorkerGone, WorkerHeartbeat, WorkerView,
};
pub use model::*;
#[cfg(feature = "fault-injection")]
pub use scheduler::InjectSchedulerPanic;
pub use scheduler::{Scheduler, SchedulerConfig, raw_json};
