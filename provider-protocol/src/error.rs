//! The closed set of error codes a provider may answer with.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::message::OpKind;

/// Why a provider refused or failed a request. The set is closed: adding a code is a new major.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ErrorCode {
    /// No secret has ever had this name.
    NotFound,
    /// The secret was revoked; only `Rotate` or `Store` bring it back.
    Revoked,
    /// The pinned version is unknown or no longer kept.
    VersionUnavailable,
    /// `Rotate`'s `expected_version` is not the current version.
    Conflict,
    /// `Store` with `create_only` on a name that exists.
    AlreadyExists,
    /// The provider's capabilities do not include this operation; `op` names it.
    Unsupported,
    /// The request is malformed: a bad name or prefix, a bad page token.
    InvalidRequest,
    /// The value exceeds the provider's declared `max_value_size`.
    TooLarge,
    /// The backend refused the provider's own credentials for this secret.
    PermissionDenied,
    /// The caller (or the provider towards its backend) is not authenticated.
    Unauthenticated,
    /// The backend is locked (a keychain waiting for unlock). Retryable.
    Locked,
    /// The backend cannot be reached right now. Retryable.
    Unavailable,
    /// The request's deadline passed before it completed. Retryable.
    DeadlineExceeded,
    /// The request was cancelled by `Cancel` or `Goodbye`.
    Cancelled,
    /// A bug or an unexpected backend failure.
    Internal,
}

impl ErrorCode {
    /// Every code, in declaration order.
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::NotFound,
        ErrorCode::Revoked,
        ErrorCode::VersionUnavailable,
        ErrorCode::Conflict,
        ErrorCode::AlreadyExists,
        ErrorCode::Unsupported,
        ErrorCode::InvalidRequest,
        ErrorCode::TooLarge,
        ErrorCode::PermissionDenied,
        ErrorCode::Unauthenticated,
        ErrorCode::Locked,
        ErrorCode::Unavailable,
        ErrorCode::DeadlineExceeded,
        ErrorCode::Cancelled,
        ErrorCode::Internal,
    ];

    /// The retryable class: the same request may succeed later without any change by the caller.
    pub const fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Locked | ErrorCode::Unavailable | ErrorCode::DeadlineExceeded
        )
    }

    /// The code's name as it appears on the wire, such as `NotFound`.
    pub const fn name(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "NotFound",
            ErrorCode::Revoked => "Revoked",
            ErrorCode::VersionUnavailable => "VersionUnavailable",
            ErrorCode::Conflict => "Conflict",
            ErrorCode::AlreadyExists => "AlreadyExists",
            ErrorCode::Unsupported => "Unsupported",
            ErrorCode::InvalidRequest => "InvalidRequest",
            ErrorCode::TooLarge => "TooLarge",
            ErrorCode::PermissionDenied => "PermissionDenied",
            ErrorCode::Unauthenticated => "Unauthenticated",
            ErrorCode::Locked => "Locked",
            ErrorCode::Unavailable => "Unavailable",
            ErrorCode::DeadlineExceeded => "DeadlineExceeded",
            ErrorCode::Cancelled => "Cancelled",
            ErrorCode::Internal => "Internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A provider's answer of "no": a code, whether retrying may help, and a message for humans.
///
/// The message must never contain a secret value; the conformance suite checks this.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ProviderError {
    /// What went wrong.
    pub code: ErrorCode,
    /// Human-readable detail. Never a secret value.
    pub message: String,
    /// Whether the same request may succeed later. Must equal `code`'s retryable class.
    pub retryable: bool,
    /// For `Unsupported`: the operation that is not supported. Otherwise null.
    pub op: Option<OpKind>,
}

impl ProviderError {
    /// An error with `code`'s retryable class.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ProviderError {
        ProviderError {
            code,
            message: message.into(),
            retryable: code.is_retryable(),
            op: None,
        }
    }

    /// `Unsupported` for `op`.
    pub fn unsupported(op: OpKind) -> ProviderError {
        ProviderError {
            op: Some(op),
            ..ProviderError::new(
                ErrorCode::Unsupported,
                format!("this provider does not support {op}"),
            )
        }
    }

    /// `NotFound` with a message naming `name`.
    pub fn not_found(name: &str) -> ProviderError {
        ProviderError::new(ErrorCode::NotFound, format!("no secret named {name:?}"))
    }

    /// `Revoked` with a message naming `name`.
    pub fn revoked(name: &str) -> ProviderError {
        ProviderError::new(
            ErrorCode::Revoked,
            format!("secret {name:?} is revoked; rotate or store it to restore it"),
        )
    }

    /// `Internal` with `message`.
    pub fn internal(message: impl Into<String>) -> ProviderError {
        ProviderError::new(ErrorCode::Internal, message)
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ProviderError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_serde() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.name()));
        }
    }

    #[test]
    fn retryable_class_is_exactly_the_transient_codes() {
        let retryable: Vec<_> = ErrorCode::ALL
            .into_iter()
            .filter(|c| c.is_retryable())
            .collect();
        assert_eq!(
            retryable,
            [
                ErrorCode::Locked,
                ErrorCode::Unavailable,
                ErrorCode::DeadlineExceeded
            ]
        );
    }
}
