//! What every handler and connection of one node shares: its id, store, session registry, access
//! policy and limits. Built once at start-up and passed around behind an `Arc`.

use std::sync::Arc;

use crate::config::{AccessPolicy, Limits};
use crate::protocol::{Refusal, Role, UserInfo};
use crate::session::SessionRegistry;
use crate::store::SharedStore;

pub struct Node {
    pub id: String,
    pub store: SharedStore,
    pub registry: Arc<SessionRegistry>,
    pub access: AccessPolicy,
    pub limits: Limits,
}

/// The longest display name kept; longer names are cut, not refused.
const MAX_NAME_CHARS: usize = 64;

impl Node {
    /// Decides who a client is from what it presented. Without a token, only anonymous access
    /// can let it in, as an `editor` with a fresh id.
    pub fn authenticate(&self, name: Option<&str>) -> Result<UserInfo, Refusal> {
        if !self.access.anonymous {
            return Err(Refusal::new(
                crate::protocol::ErrorCode::Unauthorized,
                "this server does not admit anonymous users",
            ));
        }
        let name = name
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| n.chars().take(MAX_NAME_CHARS).collect())
            .unwrap_or_else(|| "anonymous".to_owned());
        Ok(UserInfo {
            id: uuid::Uuid::now_v7().to_string(),
            name,
            role: Role::Editor,
        })
    }
}
