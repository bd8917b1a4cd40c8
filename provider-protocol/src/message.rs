//! Requests, responses and events: every frame after the handshake.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::ProviderError;
use crate::secret::SecretBytes;

/// A gateway-to-provider frame after the handshake: one operation with an id and a deadline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Request {
    /// Chosen by the gateway, unique among its requests in flight on this connection. The
    /// provider answers with exactly one [`Response`] carrying the same id.
    pub id: u64,
    /// The deadline, as milliseconds from the moment the provider reads the frame. 0 means the
    /// deadline has already passed: the provider answers `DeadlineExceeded` without doing the work.
    pub timeout_ms: u32,
    /// What to do.
    pub op: Op,
}

/// An operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Read a secret's current value, or a pinned version. Answer: [`Reply::Resolved`].
    Resolve {
        /// The secret's name.
        name: String,
        /// A version to pin, as returned by an earlier operation; null means current.
        version: Option<String>,
    },
    /// Write a new secret, or a new version of an existing one. Answer: [`Reply::Stored`].
    Store {
        /// The secret's name.
        name: String,
        /// The value.
        value: SecretBytes,
        /// Fail with `AlreadyExists` if the name exists (revoked or not).
        create_only: bool,
        /// Free-form metadata kept with the secret and returned by `Describe` and `List`.
        labels: BTreeMap<String, String>,
    },
    /// Write a new version of an existing secret. Answer: [`Reply::Rotated`].
    Rotate {
        /// The secret's name.
        name: String,
        /// The new value.
        value: SecretBytes,
        /// If present, fail with `Conflict` unless this is the current version.
        expected_version: Option<String>,
    },
    /// Make every version unreadable (`Revoked`) until the next `Rotate` or `Store`. Idempotent.
    Revoke {
        /// The secret's name.
        name: String,
    },
    /// Metadata about a secret, never its value. Answer: [`Reply::Described`].
    Describe {
        /// The secret's name.
        name: String,
    },
    /// Names and metadata under a prefix, a page at a time. Answer: [`Reply::Listed`].
    List {
        /// Only names starting with this prefix (byte-wise).
        prefix: String,
        /// The `next_page` token of the previous page; null for the first page.
        page: Option<String>,
        /// Largest number of entries wanted; 0 means the provider's default.
        limit: u32,
    },
    /// The provider's view of its backend. Answer: [`Reply::Health`].
    Health {},
    /// Subscribe to changes of names under a prefix. Answer: [`Reply::Watching`], then
    /// [`ProviderMessage::Event`]s carrying this request's id until it is cancelled.
    Watch {
        /// Only names starting with this prefix.
        prefix: String,
    },
    /// Stop the request `id` early: it is answered `Cancelled` (if it was still running), and a
    /// watch stops sending events. Answer: [`Reply::CancelAck`].
    Cancel {
        /// The id of the request to cancel.
        id: u64,
    },
    /// The gateway is leaving: the provider answers every request in flight, answers this one
    /// with [`Reply::GoodbyeAck`], and closes the connection.
    Goodbye {},
}

impl Op {
    /// Which operation this is.
    pub fn kind(&self) -> OpKind {
        match self {
            Op::Resolve { .. } => OpKind::Resolve,
            Op::Store { .. } => OpKind::Store,
            Op::Rotate { .. } => OpKind::Rotate,
            Op::Revoke { .. } => OpKind::Revoke,
            Op::Describe { .. } => OpKind::Describe,
            Op::List { .. } => OpKind::List,
            Op::Health {} => OpKind::Health,
            Op::Watch { .. } => OpKind::Watch,
            Op::Cancel { .. } => OpKind::Cancel,
            Op::Goodbye {} => OpKind::Goodbye,
        }
    }
}

/// The name of an operation, for `Unsupported` errors and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// `Resolve`.
    Resolve,
    /// `Store`.
    Store,
    /// `Rotate`.
    Rotate,
    /// `Revoke`.
    Revoke,
    /// `Describe`.
    Describe,
    /// `List`.
    List,
    /// `Health`.
    Health,
    /// `Watch`.
    Watch,
    /// `Cancel`.
    Cancel,
    /// `Goodbye`.
    Goodbye,
}

impl OpKind {
    /// The wire name, such as `resolve`.
    pub const fn name(self) -> &'static str {
        match self {
            OpKind::Resolve => "resolve",
            OpKind::Store => "store",
            OpKind::Rotate => "rotate",
            OpKind::Revoke => "revoke",
            OpKind::Describe => "describe",
            OpKind::List => "list",
            OpKind::Health => "health",
            OpKind::Watch => "watch",
            OpKind::Cancel => "cancel",
            OpKind::Goodbye => "goodbye",
        }
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A provider-to-gateway frame after the handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProviderMessage {
    /// The one answer to a request.
    Response(Response),
    /// A change seen by a watch.
    Event(WatchEvent),
    /// The provider is closing the connection because of a connection-level fault (a bad frame
    /// from the gateway). Sent at most once, best effort, as the last frame.
    Abort(ProviderError),
}

/// The answer to request `id`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Response {
    /// The request's id.
    pub id: u64,
    /// What came of it.
    pub outcome: Outcome,
}

/// Success or a typed refusal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The operation succeeded.
    Ok(Reply),
    /// The provider said no.
    Err(ProviderError),
}

impl From<Result<Reply, ProviderError>> for Outcome {
    fn from(r: Result<Reply, ProviderError>) -> Outcome {
        match r {
            Ok(reply) => Outcome::Ok(reply),
            Err(e) => Outcome::Err(e),
        }
    }
}

impl From<Outcome> for Result<Reply, ProviderError> {
    fn from(o: Outcome) -> Result<Reply, ProviderError> {
        match o {
            Outcome::Ok(reply) => Ok(reply),
            Outcome::Err(e) => Err(e),
        }
    }
}

/// A successful answer, one variant per operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// To `Resolve`.
    Resolved {
        /// The value.
        value: SecretBytes,
        /// The version the value belongs to.
        version: String,
    },
    /// To `Store`.
    Stored {
        /// The new version.
        version: String,
    },
    /// To `Rotate`.
    Rotated {
        /// The new version, distinct from every earlier one.
        version: String,
    },
    /// To `Revoke`.
    Revoked {},
    /// To `Describe`.
    Described(Description),
    /// To `List`.
    Listed {
        /// The entries of this page, in ascending byte order of name.
        entries: Vec<Description>,
        /// The token for the next page; null on the last page.
        next_page: Option<String>,
    },
    /// To `Health`.
    Health(HealthReport),
    /// To `Watch`: the watch is running.
    Watching {},
    /// To `Cancel`.
    CancelAck {
        /// Whether a request with that id was still in flight.
        found: bool,
    },
    /// To `Goodbye`: every earlier request has been answered; the connection closes next.
    GoodbyeAck {},
}

/// Metadata about one secret. Never its value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Description {
    /// The secret's name.
    pub name: String,
    /// Whether it can be resolved.
    pub state: SecretState,
    /// The current version; null when revoked.
    pub current_version: Option<String>,
    /// The versions still kept, oldest first.
    pub versions: Vec<VersionInfo>,
    /// When the name was first stored, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// When it last changed, in milliseconds since the Unix epoch.
    pub updated_at_ms: u64,
    /// The labels given at `Store`.
    pub labels: BTreeMap<String, String>,
}

/// One kept version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VersionInfo {
    /// The version string.
    pub version: String,
    /// When it was written, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
}

/// Whether a secret can be resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SecretState {
    /// Resolvable.
    Active,
    /// Revoked: every version answers `Revoked`.
    Revoked,
}

/// A provider's health.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HealthReport {
    /// The summary.
    pub status: HealthStatus,
    /// What is wrong and what to do about it; empty when `Ok`.
    pub detail: String,
}

/// The health summary. `Locked` and `Unauthorized` are distinct from `Unavailable` because the
/// operator's fix differs: unlock, fix credentials, or bring the backend up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum HealthStatus {
    /// Fully working.
    Ok,
    /// Working, with a problem worth attention.
    Degraded,
    /// The backend is locked.
    Locked,
    /// The backend refuses the provider's credentials.
    Unauthorized,
    /// The backend cannot be reached.
    Unavailable,
}

/// A change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WatchEvent {
    /// The id of the `Watch` request.
    pub watch_id: u64,
    /// The name that changed.
    pub name: String,
    /// What happened to it.
    pub change: Change,
    /// The version after the change, when there is one.
    pub version: Option<String>,
}

/// What happened to a watched name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// A new version was written by `Store` or `Rotate`, or appeared in the backend.
    Updated,
    /// The secret was revoked, or disappeared from the backend.
    Revoked,
}
