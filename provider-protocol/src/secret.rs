//! Secret-bearing wire types. They zeroize on drop, print `[REDACTED]`, and are read only through
//! an explicit `expose` call.

use std::borrow::Cow;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

/// Appends `data` to `buf`. When `buf` must grow, its bytes move to a new allocation (at least
/// twice the old one) and the old one is wiped before it is freed: a plain `Vec` would free its
/// old block with a copy of the secret still in it.
pub fn extend_wiping(buf: &mut Vec<u8>, data: &[u8]) {
    let need = buf.len().saturating_add(data.len());
    if need > buf.capacity() {
        let mut grown = Vec::with_capacity(need.max(buf.capacity().saturating_mul(2)));
        grown.extend_from_slice(buf);
        // Wipes the old block's whole capacity before it is freed.
        std::mem::replace(buf, grown).zeroize();
    }
    buf.extend_from_slice(data);
}

/// A secret value: arbitrary bytes, not necessarily UTF-8.
///
/// JSON carries it as a standard base64 string with padding; bincode as a byte string. The bytes
/// are zeroized when the value is dropped, `Debug` prints `[REDACTED]`, and equality is
/// constant-time.
#[derive(Clone, Default)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Takes ownership of `bytes` without copying them.
    pub fn new(bytes: Vec<u8>) -> SecretBytes {
        SecretBytes(Zeroizing::new(bytes))
    }

    /// Copies `bytes` into a new secret.
    pub fn copy_from(bytes: &[u8]) -> SecretBytes {
        SecretBytes::new(bytes.to_vec())
    }

    /// The raw bytes. Every call site is a place where the secret leaves its wrapper: keep them few.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the value is zero bytes long.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(bytes: Vec<u8>) -> SecretBytes {
        SecretBytes::new(bytes)
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl PartialEq for SecretBytes {
    fn eq(&self, other: &SecretBytes) -> bool {
        self.0.as_slice().ct_eq(other.0.as_slice()).into()
    }
}

impl Eq for SecretBytes {}

impl Serialize for SecretBytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            let encoded = Zeroizing::new(BASE64.encode(self.expose()));
            serializer.serialize_str(&encoded)
        } else {
            serializer.serialize_bytes(self.expose())
        }
    }
}

struct SecretVisitor;

impl SecretVisitor {
    fn from_base64<E: de::Error>(s: &str) -> Result<SecretBytes, E> {
        // The error names the problem, never the input: the input is the secret.
        BASE64
            .decode(s)
            .map(SecretBytes::new)
            .map_err(|_| E::custom("secret value is not valid standard base64"))
    }
}

impl<'de> Visitor<'de> for SecretVisitor {
    type Value = SecretBytes;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a secret value (base64 string in JSON, bytes in bincode)")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<SecretBytes, E> {
        SecretVisitor::from_base64(s)
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<SecretBytes, E> {
        let s = Zeroizing::new(s);
        SecretVisitor::from_base64(&s)
    }

    fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<SecretBytes, E> {
        Ok(SecretBytes::copy_from(b))
    }

    fn visit_byte_buf<E: de::Error>(self, b: Vec<u8>) -> Result<SecretBytes, E> {
        Ok(SecretBytes::new(b))
    }
}

impl<'de> Deserialize<'de> for SecretBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<SecretBytes, D::Error> {
        if deserializer.is_human_readable() {
            deserializer.deserialize_str(SecretVisitor)
        } else {
            deserializer.deserialize_byte_buf(SecretVisitor)
        }
    }
}

impl JsonSchema for SecretBytes {
    fn schema_name() -> Cow<'static, str> {
        "SecretBytes".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "contentEncoding": "base64",
            "description": "A secret value: arbitrary bytes, as standard base64 with padding (RFC 4648 section 4)."
        })
    }
}

/// The one-time token that authenticates the gateway to a provider in the handshake.
///
/// Compared only with [`Token::ct_eq`]; zeroized on drop; `Debug` prints `[REDACTED]`.
#[derive(Clone)]
pub struct Token(Zeroizing<String>);

impl Token {
    /// Wraps `token`.
    pub fn new(token: String) -> Token {
        Token(Zeroizing::new(token))
    }

    /// The token text, for writing it to a token file or an environment variable.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison (the length is not secret).
    pub fn ct_eq(&self, other: &Token) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl PartialEq for Token {
    fn eq(&self, other: &Token) -> bool {
        self.ct_eq(other)
    }
}

impl Eq for Token {}

impl Serialize for Token {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.expose())
    }
}

impl<'de> Deserialize<'de> for Token {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Token, D::Error> {
        let mut s = String::deserialize(deserializer)?;
        let token = Token::new(s.clone());
        s.zeroize();
        Ok(token)
    }
}

impl JsonSchema for Token {
    fn schema_name() -> Cow<'static, str> {
        "Token".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "The one-time token that authenticates the gateway. Compare it in constant time."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_value() {
        let s = SecretBytes::copy_from(b"hunter2");
        assert_eq!(format!("{s:?}"), "[REDACTED]");
        let t = Token::new("tok".into());
        assert_eq!(format!("{t:?}"), "[REDACTED]");
    }

    #[test]
    fn bad_base64_error_does_not_echo_the_input() {
        let err = serde_json::from_str::<SecretBytes>("\"hunter2!!\"").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn tokens_compare_by_content() {
        assert!(Token::new("abc".into()).ct_eq(&Token::new("abc".into())));
        assert!(!Token::new("abc".into()).ct_eq(&Token::new("abd".into())));
        assert!(!Token::new("abc".into()).ct_eq(&Token::new("ab".into())));
    }
}
