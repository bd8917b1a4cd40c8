//! The trait a provider implements.

use std::collections::BTreeMap;
use std::future::Future;

use keyhole_protocol::{
    Capabilities, Change, Description, HealthReport, OpKind, ProviderError, ProviderInfo,
    SecretBytes,
};
use tokio::sync::mpsc;

/// A resolved value and its version.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The value.
    pub value: SecretBytes,
    /// Its version.
    pub version: String,
}

/// The arguments of `Store`.
#[derive(Clone, Debug)]
pub struct StoreRequest {
    /// The name (already validated).
    pub name: String,
    /// The value (already checked against `max_value_size`).
    pub value: SecretBytes,
    /// Fail with `AlreadyExists` if the name exists.
    pub create_only: bool,
    /// Labels to keep with the secret.
    pub labels: BTreeMap<String, String>,
}

/// The page-token convention both keyhole providers use for `List`: the last name of a page,
/// hex-encoded, so paging resumes after it (tokens stay opaque to the gateway).
pub mod page_token {
    use keyhole_protocol::{ErrorCode, ProviderError};

    /// The token that resumes after `last_name`.
    pub fn after(last_name: &str) -> String {
        hex::encode(last_name.as_bytes())
    }

    /// The name a token resumes after; `InvalidRequest` if the provider did not issue it.
    pub fn parse(token: &str) -> Result<String, ProviderError> {
        hex::decode(token)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| ProviderError::new(ErrorCode::InvalidRequest, "invalid page token"))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn round_trips_and_refuses_junk() {
            for name in ["", "a/b", "ünï", "../x"] {
                assert_eq!(super::parse(&super::after(name)).unwrap(), name);
            }
            for junk in ["z", "abc", "zz", "ff"] {
                assert!(super::parse(junk).is_err(), "{junk}");
            }
        }
    }
}

/// One page of `List`.
#[derive(Clone, Debug, Default)]
pub struct Page {
    /// Entries in ascending byte order of name.
    pub entries: Vec<Description>,
    /// Token for the next page, if there is one.
    pub next_page: Option<String>,
}

/// A change reported by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchChange {
    /// The name that changed.
    pub name: String,
    /// What happened.
    pub change: Change,
    /// The version after the change, if any.
    pub version: Option<String>,
}

/// A secret provider. The serve loop calls these methods concurrently.
///
/// Before a method is called, the SDK has already checked that the name is valid, that the value
/// fits `max_value_size`, that the operation is declared in [`Provider::capabilities`], and that
/// the deadline has not passed. Methods run under the request's deadline and may be dropped
/// mid-way by `Cancel`, so keep each one cancel-safe: commit durably, then return. Blocking
/// backends should use `tokio::task::spawn_blocking`.
///
/// No error message may contain a secret value.
pub trait Provider: Send + Sync + 'static {
    /// Name and version for the handshake.
    fn info(&self) -> ProviderInfo;

    /// What this provider supports. Called once per connection.
    fn capabilities(&self) -> Capabilities;

    /// The current value, or the pinned `version`.
    fn resolve(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> impl Future<Output = Result<Resolved, ProviderError>> + Send;

    /// Writes a new secret or a new version; returns the new version.
    fn store(
        &self,
        request: StoreRequest,
    ) -> impl Future<Output = Result<String, ProviderError>> + Send {
        let _ = request;
        async { Err(ProviderError::unsupported(OpKind::Store)) }
    }

    /// Writes a new version of an existing secret; returns the new, distinct version.
    fn rotate(
        &self,
        name: &str,
        value: SecretBytes,
        expected_version: Option<&str>,
    ) -> impl Future<Output = Result<String, ProviderError>> + Send {
        let _ = (name, value, expected_version);
        async { Err(ProviderError::unsupported(OpKind::Rotate)) }
    }

    /// Revokes every version. Idempotent.
    fn revoke(&self, name: &str) -> impl Future<Output = Result<(), ProviderError>> + Send {
        let _ = name;
        async { Err(ProviderError::unsupported(OpKind::Revoke)) }
    }

    /// Metadata, never the value.
    fn describe(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Description, ProviderError>> + Send;

    /// A page of names under `prefix`. `limit` is already clamped to 1..=1000.
    fn list(
        &self,
        prefix: &str,
        page: Option<&str>,
        limit: u32,
    ) -> impl Future<Output = Result<Page, ProviderError>> + Send {
        let _ = (prefix, page, limit);
        async { Err(ProviderError::unsupported(OpKind::List)) }
    }

    /// The backend's health.
    fn health(&self) -> impl Future<Output = HealthReport> + Send;

    /// Changes under `prefix`, until the receiver is dropped.
    fn watch(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<mpsc::Receiver<WatchChange>, ProviderError>> + Send {
        let _ = prefix;
        async { Err(ProviderError::unsupported(OpKind::Watch)) }
    }
}
