//! Validated identifiers: session and document names, task kinds, and the ids the server makes
//! (tasks, leases, workers) when they come back from a client.
//!
//! PROTOCOL.md fixes their shape as `^[A-Za-z0-9._-]{1,128}$`. Parsing happens once, at the edge
//! (serde or a REST path), so that every other layer can take a [`SessionId`] as already valid.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid name {0:?}: names match ^[A-Za-z0-9._-]{{1,128}}$")]
pub struct InvalidName(pub String);

/// Checks the fixed name grammar shared by sessions and documents.
fn check_name(raw: &str) -> bool {
    (1..=128).contains(&raw.len())
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Declares a validated name type: cheap to clone, checked once at the edge.
macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn parse(raw: &str) -> Result<Self, InvalidName> {
                if check_name(raw) {
                    Ok(Self(Arc::from(raw)))
                } else {
                    Err(InvalidName(raw.chars().take(140).collect()))
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidName;
            fn try_from(raw: String) -> Result<Self, Self::Error> {
                Self::parse(&raw)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> Self {
                id.0.to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), &self.0)
            }
        }
    };
}

name_type!(
    /// The name of a session. The registry, actors and frames all hold one.
    SessionId
);

name_type!(
    /// The name of a document within a session.
    DocName
);

name_type!(
    /// A kind of task, matched against the capabilities workers declare (`code_review`,
    /// `council.propose`).
    TaskKind
);

name_type!(
    /// A task's id: a UUIDv7 made by the server, checked against the name grammar when it comes
    /// back from a client, so that an unknown id is simply not found.
    TaskId
);

name_type!(
    /// One assignment of a task to a worker: a fresh UUIDv7 per attempt, used as a fencing token.
    LeaseId
);

name_type!(
    /// A worker connection's id, made by the server at `hello`.
    WorkerId
);

name_type!(
    /// A council's id, made by the server when it opens.
    CouncilId
);

/// Declares `new()` for ids the server makes: a UUIDv7, which always fits the name grammar.
macro_rules! generated_id {
    ($($name:ident),*) => {$(
        impl $name {
            pub fn generate() -> Self {
                Self(Arc::from(uuid::Uuid::now_v7().to_string()))
            }
        }
    )*};
}

generated_id!(TaskId, LeaseId, WorkerId, CouncilId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_fixed_grammar_only() {
        assert!(SessionId::parse("design-review_1.2").is_ok());
        assert!(SessionId::parse(&"a".repeat(128)).is_ok());
        assert!(SessionId::parse("").is_err());
        assert!(SessionId::parse(&"a".repeat(129)).is_err());
        assert!(SessionId::parse("has space").is_err());
        assert!(SessionId::parse("slash/no").is_err());
        assert!(SessionId::parse("é").is_err());
    }
}
