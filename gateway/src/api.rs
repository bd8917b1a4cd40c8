//! The client API: what the `keyhole` CLI (or any client) and the gateway say over the gateway's
//! local socket. These are the gateway's only serialized types: a wire format, versioned by
//! [`API_MAJOR`], framed like the provider protocol (12-byte header, JSON payloads).
//!
//! A connection starts with [`ClientHello`] carrying the token from the gateway's token file; the
//! gateway answers [`ServerHello`], then each [`ApiRequest`] gets one [`ApiResponse`].

use std::collections::BTreeMap;

use keyhole_protocol::{Description, ErrorCode, SecretBytes, Token};
use serde::{Deserialize, Serialize};

/// The client API's major version, carried in every frame header after the hello.
pub const API_MAJOR: u16 = 1;

/// The gateway's socket, inside its runtime directory.
pub const SOCKET_FILE: &str = "keyhole.sock";

/// The file holding the client token, inside the runtime directory (mode 0600).
pub const TOKEN_FILE: &str = "client.token";

/// The client's first frame.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClientHello {
    /// The token from the gateway's token file (compared in constant time).
    pub token: Token,
    /// API majors the client speaks.
    pub majors: Vec<u16>,
}

/// The gateway's first frame.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerHello {
    /// Accepted.
    Welcome {
        /// The gateway's version.
        version: String,
    },
    /// Refused; the connection closes.
    Refused {
        /// Why, and what to do.
        message: String,
    },
}

/// One request.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiRequest {
    /// Echoed in the response.
    pub id: u64,
    /// What to do.
    pub op: ApiOp,
}

/// The operations clients may ask for.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiOp {
    /// Store a new secret in a provider and mint a handle for it.
    Put {
        /// The secret's name in the provider.
        name: String,
        /// The provider (default: the configured default).
        provider: Option<String>,
        /// The handle's scope (default `default`).
        scope: Option<String>,
        /// Labels for the handle and the secret.
        labels: BTreeMap<String, String>,
        /// The value.
        value: SecretBytes,
    },
    /// Mint a handle for a secret that already exists in a provider (a read-only one, such as
    /// the env provider, or one filled by other tools). Nothing is written; the provider must
    /// describe the name as active. Needs the `link` operation, and `resolve` in the scope of
    /// every handle the secret already has (a new handle reaches the value).
    Link {
        /// The secret's name in the provider.
        name: String,
        /// The provider (default: the configured default).
        provider: Option<String>,
        /// The handle's scope (default `default`).
        scope: Option<String>,
        /// Labels for the handle.
        labels: BTreeMap<String, String>,
    },
    /// Write a new version behind a handle.
    Rotate {
        /// The handle.
        handle: String,
        /// The new value.
        value: SecretBytes,
    },
    /// Revoke the secret behind a handle.
    Revoke {
        /// The handle.
        handle: String,
    },
    /// Metadata about a handle and its secret; never the value.
    Describe {
        /// The handle.
        handle: String,
    },
    /// Every handle the caller may see.
    List {},
    /// Resolve handles to values, under policy and audit, for injection.
    Resolve {
        /// The handles.
        handles: Vec<String>,
        /// Why: required, and recorded in the audit log.
        purpose: String,
    },
    /// Each provider's state and health.
    Providers {},
    /// Verify the audit chain.
    AuditVerify {},
}

impl ApiOp {
    /// The operation's name in policy rules and audit records.
    pub fn name(&self) -> &'static str {
        match self {
            ApiOp::Put { .. } => "put",
            ApiOp::Link { .. } => "link",
            ApiOp::Rotate { .. } => "rotate",
            ApiOp::Revoke { .. } => "revoke",
            ApiOp::Describe { .. } => "describe",
            ApiOp::List {} => "list",
            ApiOp::Resolve { .. } => "resolve",
            ApiOp::Providers {} => "providers",
            ApiOp::AuditVerify {} => "audit",
        }
    }
}

/// The answer to one request.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiResponse {
    /// The request's id.
    pub id: u64,
    /// What came of it.
    pub result: ApiResult,
}

/// Success or failure.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiResult {
    /// It worked.
    Ok(ApiReply),
    /// It did not.
    Err(ApiError),
}

/// A refusal: a code from the provider protocol's set, and a message that says what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What failed and what to do next. Never a secret value.
    pub message: String,
}

impl ApiError {
    /// An error with `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// A successful answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiReply {
    /// To Put and Link.
    Put {
        /// The new handle.
        handle: String,
        /// The version stored.
        version: String,
    },
    /// To Rotate.
    Rotated {
        /// The new version.
        version: String,
    },
    /// To Revoke.
    Revoked {},
    /// To Describe.
    Described(Box<HandleView>),
    /// To List.
    Listed {
        /// The handles.
        handles: Vec<HandleView>,
    },
    /// To Resolve, in request order.
    Resolved {
        /// One per handle.
        values: Vec<ResolvedValue>,
    },
    /// To Providers.
    Providers {
        /// One per provider.
        providers: Vec<ProviderView>,
    },
    /// To AuditVerify.
    Audit(AuditView),
}

/// A handle as clients see it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HandleView {
    /// The handle.
    pub handle: String,
    /// Its provider.
    pub provider: String,
    /// The secret's name there.
    pub name: String,
    /// A fixed version, or null for the current one.
    pub version_pin: Option<String>,
    /// Its scope.
    pub scope: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// `active` or `revoked`.
    pub state: String,
    /// Created, ms since the epoch.
    pub created_at_ms: u64,
    /// Last changed.
    pub updated_at_ms: u64,
    /// The provider's description of the secret, for Describe.
    pub secret: Option<Description>,
}

/// One resolved value.
#[derive(Debug, Serialize, Deserialize)]
pub struct ResolvedValue {
    /// The handle.
    pub handle: String,
    /// The value.
    pub value: SecretBytes,
    /// Its version.
    pub version: String,
}

/// A provider as clients see it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProviderView {
    /// Its configured name.
    pub name: String,
    /// Whether it is connected.
    pub up: bool,
    /// Its own name and version, when up.
    pub provider: Option<String>,
    /// Its health summary (`Ok`, `Locked`, ...), when it answered.
    pub health: Option<String>,
    /// What is wrong, if anything.
    pub detail: String,
    /// Restarts so far.
    pub restarts: u64,
}

/// The audit chain's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditView {
    /// Whether every record checks out.
    pub intact: bool,
    /// Records checked.
    pub records: u64,
    /// The first broken record's sequence number.
    pub broken_at: Option<u64>,
    /// What is wrong with it.
    pub reason: Option<String>,
}
