//! What every handler and connection of one node shares: its id, store, session registry,
//! authenticator, limits, scheduler and open councils. Built once at start-up and passed around behind an `Arc`.

use std::sync::Arc;

pub use crate::conn::Stopping;
pub use crate::conn::socket::OpenSockets;

use crate::auth::Authenticator;
use crate::cluster::SharedBus;
use crate::config::Limits;
use crate::council::Councils;
use crate::session::SessionRegistry;
use crate::store::SharedStore;
use crate::tasks::SchedulerHandle;

pub struct Node {
    pub id: String,
    pub store: SharedStore,
    pub registry: Arc<SessionRegistry>,
    pub auth: Authenticator,
    pub limits: Limits,
    pub scheduler: Arc<SchedulerHandle>,
    pub councils: Arc<Councils>,
    /// The bus to the other nodes (in-process on a single node).
    pub bus: SharedBus,
    /// WebSockets open, against `limits.max_sockets`.
    pub sockets: OpenSockets,
    /// Set once when the node shuts down; every socket is then closed with 1001.
    pub stopping: Stopping,
}
