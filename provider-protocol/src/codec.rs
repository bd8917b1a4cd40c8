//! Pure encode and decode of payloads and frames, in either encoding.
//!
//! Decode errors are deliberately coarse: serde's own messages can quote the input
//! (`invalid type: string "..."`), and the input may be a secret. So an error names where and
//! what kind of fault, never the bytes.

use serde::Serialize;
use serde::de::DeserializeOwned;
use zeroize::Zeroize;

use crate::frame::{Encoding, FrameHeader, HEADER_LEN, MAX_MAX_FRAME};
use crate::secret::extend_wiping;

/// A message could not be encoded within the peer's frame cap.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The payload is larger than the cap the peer announced.
    #[error("encoded payload of {len} bytes exceeds the peer's frame cap of {cap} bytes")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// The cap.
        cap: u32,
    },
    /// The serializer failed (only possible for types outside this crate).
    #[error("message could not be serialized")]
    Serialize,
}

/// A payload could not be decoded into the expected message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Malformed JSON, or JSON of the wrong shape.
    #[error("malformed JSON payload ({kind} at line {line}, column {column})")]
    Json {
        /// `syntax`, `data` (wrong shape) or `eof`.
        kind: &'static str,
        /// 1-based line of the fault.
        line: usize,
        /// 1-based column of the fault.
        column: usize,
    },
    /// Malformed bincode.
    #[error("malformed bincode payload ({kind})")]
    Bincode {
        /// A short description of the fault, without any input bytes.
        kind: &'static str,
    },
    /// The message ended before the payload did.
    #[error("{extra} unexpected bytes after the message")]
    TrailingBytes {
        /// How many bytes were left over.
        extra: usize,
    },
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_MAX_FRAME as usize }>()
}

/// bincode allocates a string's or byte string's claimed length before reading it, bounded only
/// by the configured limit. The claims of a valid message add up to at most its payload length,
/// so the limit is the payload length rounded up to a power of two (at least 64 KiB). Frame caps
/// are powers of two and payloads never exceed them, so no claim can allocate past the cap.
fn bincode_decode<T: DeserializeOwned>(
    payload: &[u8],
) -> Result<(T, usize), bincode::error::DecodeError> {
    macro_rules! with_limit {
        ($n:literal) => {
            bincode::serde::decode_from_slice(
                payload,
                bincode::config::standard().with_limit::<{ 1usize << $n }>(),
            )
        };
    }
    match payload
        .len()
        .max(1 << 16)
        .next_power_of_two()
        .trailing_zeros()
    {
        16 => with_limit!(16),
        17 => with_limit!(17),
        18 => with_limit!(18),
        19 => with_limit!(19),
        20 => with_limit!(20),
        21 => with_limit!(21),
        22 => with_limit!(22),
        23 => with_limit!(23),
        _ => with_limit!(24),
    }
}

/// A `Write` over a `Vec` that grows it with [`extend_wiping`]: a plain `Vec` would free its old
/// block with a copy of the frame (a value, in a Resolve answer) still in it.
struct Wiping<'a>(&'a mut Vec<u8>);

impl std::io::Write for Wiping<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        extend_wiping(self.0, buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Appends `msg`, encoded in `encoding`, to `out`. When `out` must grow, its old allocation is
/// wiped before it is freed.
///
/// On error, whatever was appended is zeroized and removed.
pub fn encode<T: Serialize>(
    encoding: Encoding,
    msg: &T,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let start = out.len();
    let mut sink = Wiping(out);
    let result = match encoding {
        Encoding::Json => serde_json::to_writer(&mut sink, msg).map_err(|_| EncodeError::Serialize),
        Encoding::Bincode => {
            bincode::serde::encode_into_std_write(msg, &mut sink, bincode_config())
                .map(|_| ())
                .map_err(|_| EncodeError::Serialize)
        }
    };
    if result.is_err() {
        out[start..].zeroize();
        out.truncate(start);
    }
    result
}

/// Appends one whole frame (header and payload) carrying `msg` to `out`.
///
/// Fails with [`EncodeError::TooLarge`] if the payload exceeds `cap`; then `out` is left as it was,
/// with the partial payload zeroized.
pub fn encode_frame<T: Serialize>(
    major: u16,
    encoding: Encoding,
    msg: &T,
    cap: u32,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let start = out.len();
    std::io::Write::write_all(&mut Wiping(out), &[0u8; HEADER_LEN])
        .map_err(|_| EncodeError::Serialize)?;
    if let Err(e) = encode(encoding, msg, out) {
        out.truncate(start); // the header placeholder: zeros, nothing to wipe
        return Err(e);
    }
    let len = out.len() - start - HEADER_LEN;
    match u32::try_from(len) {
        Ok(len32) if len32 <= cap => {
            let header = FrameHeader {
                major,
                encoding,
                len: len32,
            };
            out[start..start + HEADER_LEN].copy_from_slice(&header.to_bytes());
            Ok(())
        }
        _ => {
            out[start..].zeroize();
            out.truncate(start);
            Err(EncodeError::TooLarge { len, cap })
        }
    }
}

/// Decodes one message from a whole payload. The payload must hold exactly one message.
///
/// Never panics, whatever the bytes. No allocation exceeds the payload length rounded up to a
/// power of two (at least 64 KiB, and serde's own 1 MiB cap on pre-allocating a sequence), so with
/// power-of-two frame caps of at least 1 MiB nothing allocates past the cap.
pub fn decode<T: DeserializeOwned>(encoding: Encoding, payload: &[u8]) -> Result<T, DecodeError> {
    match encoding {
        Encoding::Json => serde_json::from_slice(payload).map_err(|e| DecodeError::Json {
            kind: match e.classify() {
                serde_json::error::Category::Io => "io",
                serde_json::error::Category::Syntax => "syntax",
                serde_json::error::Category::Data => "data",
                serde_json::error::Category::Eof => "eof",
            },
            line: e.line(),
            column: e.column(),
        }),
        Encoding::Bincode => {
            let (msg, used) = bincode_decode(payload).map_err(|e| DecodeError::Bincode {
                kind: bincode_kind(&e),
            })?;
            if used != payload.len() {
                return Err(DecodeError::TrailingBytes {
                    extra: payload.len() - used,
                });
            }
            Ok(msg)
        }
    }
}

fn bincode_kind(e: &bincode::error::DecodeError) -> &'static str {
    use bincode::error::DecodeError as E;
    match e {
        E::UnexpectedEnd { .. } => "unexpected end of payload",
        E::LimitExceeded => "claimed length exceeds the limit",
        E::InvalidIntegerType { .. } => "invalid integer encoding",
        E::UnexpectedVariant { .. } => "unknown enum variant",
        E::Utf8 { .. } => "invalid UTF-8 in a string",
        E::InvalidBooleanValue(_) => "invalid boolean",
        E::InvalidCharEncoding(_) => "invalid char",
        E::OutsideUsizeRange(_) => "length outside usize range",
        _ => "wrong shape for the expected message",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Op, Request, SecretBytes};

    #[test]
    fn a_growing_buffer_keeps_every_byte_in_order() {
        use std::io::Write;
        let mut out = Vec::with_capacity(4);
        let mut expected = Vec::new();
        for chunk in 0u8..40 {
            let bytes = vec![chunk; usize::from(chunk) + 1];
            Wiping(&mut out).write_all(&bytes).expect("written");
            expected.extend_from_slice(&bytes);
        }
        assert_eq!(out, expected);
        assert!(out.capacity() >= out.len());
    }

    #[test]
    fn oversize_message_is_refused_and_scrubbed() {
        let req = Request {
            id: 1,
            timeout_ms: 10,
            op: Op::Rotate {
                name: "n".into(),
                value: SecretBytes::new(vec![7u8; 100]),
                expected_version: None,
            },
        };
        let mut out = b"keep".to_vec();
        let err = encode_frame(1, Encoding::Bincode, &req, 50, &mut out).unwrap_err();
        assert!(matches!(err, EncodeError::TooLarge { cap: 50, .. }));
        assert_eq!(out, b"keep");
    }

    #[test]
    fn json_decode_error_does_not_quote_the_input() {
        let payload = br#"{"id":1,"timeout_ms":"hunter2","op":{"health":{}}}"#;
        let err = decode::<Request>(Encoding::Json, payload).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn bincode_rejects_trailing_bytes() {
        let req = Request {
            id: 1,
            timeout_ms: 10,
            op: Op::Health {},
        };
        let mut out = Vec::new();
        encode(Encoding::Bincode, &req, &mut out).unwrap();
        out.push(0);
        assert_eq!(
            decode::<Request>(Encoding::Bincode, &out),
            Err(DecodeError::TrailingBytes { extra: 1 })
        );
    }
}
