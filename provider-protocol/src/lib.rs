//! keyhole provider protocol, major version 1.
//!
//! This crate is the wire contract between the keyhole gateway and its secret providers, and
//! nothing else: message types, the handshake, the closed error-code set, and pure framing
//! functions that turn bytes into messages and back. It explicitly does no I/O: there is no
//! socket, no tokio and no blocking here. Decoders answer "need more bytes" instead of waiting.
//!
//! A frame is a 12-byte [`FrameHeader`] followed by a payload in one [`Encoding`]. The first frame
//! in each direction is the JSON handshake ([`Hello`] and [`HelloReply`]); after it, the gateway
//! sends [`Request`]s and the provider sends [`ProviderMessage`]s in the negotiated encoding.
//!
//! PROTOCOL.md at the repository root is the normative description for authors in any language;
//! `schema/v1.json` is the JSON Schema generated from these types.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod codec;
mod error;
mod frame;
mod handshake;
mod message;
mod name;
mod schema;
mod secret;

pub use codec::{DecodeError, EncodeError, decode, encode, encode_frame};
pub use error::{ErrorCode, ProviderError};
pub use frame::{
    DEFAULT_MAX_FRAME, Encoding, FrameError, FrameHeader, HANDSHAKE_MAJOR, HANDSHAKE_MAX_FRAME,
    HEADER_LEN, MAGIC, MAX_MAX_FRAME, MIN_MAX_FRAME, Peek, peek,
};
pub use handshake::{
    Capabilities, Hello, HelloAck, HelloReject, HelloReply, Offer, ProviderInfo, RejectCode,
    negotiate, valid_max_frame,
};
pub use message::{
    Change, Description, HealthReport, HealthStatus, Op, OpKind, Outcome, ProviderMessage, Reply,
    Request, Response, SecretState, VersionInfo, WatchEvent,
};
pub use name::{MAX_NAME_LEN, NameError, validate_name, validate_prefix};
pub use schema::{schema, schema_string};
pub use secret::{SecretBytes, Token, extend_wiping};

/// The protocol major this crate implements. It is an integer of its own, independent of any
/// crate version: it changes only when an old peer could misread a new peer.
pub const PROTOCOL_MAJOR: u16 = 1;

/// Every protocol major this crate can speak, highest first.
pub const SUPPORTED_MAJORS: &[u16] = &[PROTOCOL_MAJOR];

/// The environment variable that carries the one-time token to a provider in spawn mode.
pub const TOKEN_ENV: &str = "KEYHOLE_PROVIDER_TOKEN";

/// Default page size of `List` when the request asks for 0 entries.
pub const DEFAULT_LIST_LIMIT: u32 = 100;

/// Largest page of `List` a provider must honour; larger requests are clamped to it.
pub const MAX_LIST_LIMIT: u32 = 1000;
