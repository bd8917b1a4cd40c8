//! Secret names: opaque strings with a few rules so every backend can hold them.

/// Longest name, in bytes of UTF-8.
pub const MAX_NAME_LEN: usize = 1024;

/// Why a name or prefix was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is the empty string.
    #[error("name is empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("name is longer than {MAX_NAME_LEN} bytes")]
    TooLong,
    /// The name contains a control character (Unicode category Cc: U+0000 to U+001F, U+007F to U+009F).
    #[error("name contains a control character")]
    ControlCharacter,
}

/// Checks a secret name: 1 to [`MAX_NAME_LEN`] bytes of UTF-8 with no control characters.
///
/// Names are opaque: `../x`, `a/b` and `.` are all valid names, and a provider must never let a
/// name become a path.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    validate_prefix(name)
}

/// Checks a `List` or `Watch` prefix: like a name, but it may be empty.
pub fn validate_prefix(prefix: &str) -> Result<(), NameError> {
    if prefix.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    if prefix.chars().any(char::is_control) {
        return Err(NameError::ControlCharacter);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert_eq!(validate_name("a\0b"), Err(NameError::ControlCharacter));
        assert_eq!(validate_name(&"x".repeat(1025)), Err(NameError::TooLong));
        for ok in ["../../etc/passwd", "db/password", ".", "ünïcødé", "a b"] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_prefix(""), Ok(()));
    }
}
