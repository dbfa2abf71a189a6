//! The fixed error codes of PROTOCOL.md, and the error every layer above the store reports to a
//! client.

use serde::{Deserialize, Serialize};

/// An error code from PROTOCOL.md. The set is fixed; the wire spelling is snake_case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    RateLimited,
    TooLarge,
    Conflict,
    ResyncRequired,
    StorageUnavailable,
    Internal,
}

impl ErrorCode {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::RateLimited => "rate_limited",
            Self::TooLarge => "too_large",
            Self::Conflict => "conflict",
            Self::ResyncRequired => "resync_required",
            Self::StorageUnavailable => "storage_unavailable",
            Self::Internal => "internal",
        }
    }

    /// The HTTP status REST answers with for this code.
    pub const fn http_status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::RateLimited => 429,
            Self::TooLarge => 413,
            Self::Conflict => 409,
            Self::ResyncRequired => 409,
            Self::StorageUnavailable => 503,
            Self::Internal => 500,
        }
    }
}

/// A refusal with a code and a human message: what a request gets instead of its reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn storage_unavailable() -> Self {
        Self::new(
            ErrorCode::StorageUnavailable,
            "the store could not commit this change; it was not applied",
        )
    }

    /// The session actor went away between lookup and delivery (passivation, restart or
    /// shutdown). Nothing was applied, so the client may retry.
    pub fn session_unavailable() -> Self {
        Self::new(
            ErrorCode::StorageUnavailable,
            "the session is restarting or unavailable; nothing was applied, retry",
        )
    }
}
