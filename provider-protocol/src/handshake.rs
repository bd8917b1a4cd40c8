//! The JSON handshake: the gateway's `Hello`, the provider's `HelloReply`, and the pure
//! negotiation both sides agree on.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::frame::{Encoding, MAX_MAX_FRAME, MIN_MAX_FRAME};
use crate::secret::Token;

/// The gateway's first frame: what it speaks, and the token that proves it is the gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Hello {
    /// Protocol majors the gateway speaks, in any order.
    pub majors: Vec<u16>,
    /// Encoding names the gateway accepts, most preferred first. Unknown names are ignored.
    pub encodings: Vec<String>,
    /// Feature strings. A provider ignores the ones it does not know.
    pub features: Vec<String>,
    /// The one-time token: the environment variable `KEYHOLE_PROVIDER_TOKEN` in spawn mode, the
    /// token file in connect mode.
    pub token: Token,
    /// The largest payload the gateway accepts in one frame, in bytes: a power of two from 1 MiB
    /// to 16 MiB.
    pub max_frame: u32,
}

/// Who the provider is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ProviderInfo {
    /// A short name such as `memory` or `file`.
    pub name: String,
    /// The provider's own version string, free-form.
    pub version: String,
}

/// What a provider can do. `Resolve`, `Describe`, `Health`, `Cancel` and `Goodbye` are always
/// supported; everything else is declared here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Capabilities {
    /// `Store` is supported.
    pub store: bool,
    /// `Rotate` is supported.
    pub rotate: bool,
    /// `Revoke` is supported.
    pub revoke: bool,
    /// `List` is supported.
    pub list: bool,
    /// `Watch` is supported.
    pub watch: bool,
    /// How many versions of a secret, the current one included, stay readable by a pinned
    /// `Resolve`. 1 means no history; 0 means no limit.
    pub versions_kept: u32,
    /// The largest value `Store` and `Rotate` accept, in bytes.
    pub max_value_size: u32,
}

/// The provider's acceptance: the agreed major and encoding, and what it offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HelloAck {
    /// The protocol major chosen: the highest one both sides speak.
    pub major: u16,
    /// The encoding chosen for every later frame in both directions.
    pub encoding: Encoding,
    /// Who the provider is.
    pub provider: ProviderInfo,
    /// What it can do.
    pub capabilities: Capabilities,
    /// Feature strings the provider supports.
    pub features: Vec<String>,
    /// The largest payload the provider accepts in one frame, in bytes: a power of two from 1 MiB
    /// to 16 MiB.
    pub max_frame: u32,
}

/// Why a provider refused the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RejectCode {
    /// No protocol major in common.
    IncompatibleVersion,
    /// No encoding in common.
    NoCommonEncoding,
    /// The token is wrong.
    Unauthenticated,
    /// The Hello could not be understood.
    InvalidHello,
}

/// The provider's refusal. It names what the provider speaks, so the error can name both ranges.
/// The provider closes the connection after sending it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HelloReject {
    /// Why.
    pub code: RejectCode,
    /// Human-readable detail.
    pub message: String,
    /// The majors the provider speaks.
    pub majors: Vec<u16>,
    /// The encodings the provider speaks.
    pub encodings: Vec<Encoding>,
}

/// The provider's first frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HelloReply {
    /// The handshake succeeded.
    Accept(HelloAck),
    /// The handshake failed; the connection closes.
    Reject(HelloReject),
}

/// What one side offers in a negotiation.
#[derive(Clone, Debug)]
pub struct Offer<'a> {
    /// Majors this side speaks.
    pub majors: &'a [u16],
    /// Encodings this side speaks.
    pub encodings: &'a [Encoding],
}

/// Picks the highest common major, and the first of the gateway's encodings the provider speaks.
///
/// Pure: the provider side of the handshake calls it with the gateway's Hello and its own offer.
/// The token is checked separately, in constant time, before this runs.
pub fn negotiate(hello: &Hello, ours: &Offer<'_>) -> Result<(u16, Encoding), HelloReject> {
    let reject = |code, message: String| HelloReject {
        code,
        message,
        majors: ours.majors.to_vec(),
        encodings: ours.encodings.to_vec(),
    };
    let major = hello
        .majors
        .iter()
        .copied()
        .filter(|m| ours.majors.contains(m))
        .max()
        .ok_or_else(|| {
            reject(
                RejectCode::IncompatibleVersion,
                format!(
                    "no common protocol major: gateway speaks {:?}, provider speaks {:?}",
                    hello.majors, ours.majors
                ),
            )
        })?;
    let encoding = hello
        .encodings
        .iter()
        .filter_map(|name| Encoding::from_name(name))
        .find(|e| ours.encodings.contains(e))
        .ok_or_else(|| {
            reject(
                RejectCode::NoCommonEncoding,
                format!(
                    "no common encoding: gateway accepts {:?}, provider speaks {:?}",
                    hello.encodings,
                    ours.encodings.iter().map(|e| e.name()).collect::<Vec<_>>()
                ),
            )
        })?;
    if !valid_max_frame(hello.max_frame) {
        return Err(reject(
            RejectCode::InvalidHello,
            format!(
                "max_frame {} is not a power of two in {MIN_MAX_FRAME}..={MAX_MAX_FRAME}",
                hello.max_frame
            ),
        ));
    }
    Ok((major, encoding))
}

/// Whether `cap` is an acceptable frame cap: a power of two from [`MIN_MAX_FRAME`] to
/// [`MAX_MAX_FRAME`].
pub fn valid_max_frame(cap: u32) -> bool {
    cap.is_power_of_two() && (MIN_MAX_FRAME..=MAX_MAX_FRAME).contains(&cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(majors: &[u16], encodings: &[&str]) -> Hello {
        Hello {
            majors: majors.to_vec(),
            encodings: encodings.iter().map(|s| s.to_string()).collect(),
            features: vec!["grease.x".into()],
            token: Token::new("t".into()),
            max_frame: crate::DEFAULT_MAX_FRAME,
        }
    }

    const OURS: Offer<'static> = Offer {
        majors: &[1, 2],
        encodings: &[Encoding::Bincode, Encoding::Json],
    };

    #[test]
    fn picks_highest_common_major_and_gateways_preferred_encoding() {
        let got = negotiate(&hello(&[3, 2, 1], &["zstd-cbor", "json", "bincode"]), &OURS);
        assert_eq!(got, Ok((2, Encoding::Json)));
    }

    #[test]
    fn no_common_major_names_both_ranges() {
        let err = negotiate(&hello(&[7, 9], &["json"]), &OURS).unwrap_err();
        assert_eq!(err.code, RejectCode::IncompatibleVersion);
        assert!(err.message.contains("[7, 9]") && err.message.contains("[1, 2]"));
        assert_eq!(err.majors, [1, 2]);
    }

    #[test]
    fn no_common_encoding() {
        let err = negotiate(&hello(&[1], &["xml"]), &OURS).unwrap_err();
        assert_eq!(err.code, RejectCode::NoCommonEncoding);
    }
}
