//! The transport shared by the provider SDK, the gateway and the conformance suite.
//!
//! One type per direction touches the bytes: [`FrameReader`] reads whole frames into a zeroizing
//! buffer and checks the cap before it grows; [`FrameWriter`] batches encoded frames and flushes
//! them in one write. Around them: private local sockets ([`socket`]), the gateway side of the
//! handshake and a request multiplexer ([`client`]), and spawning a provider the way the gateway
//! does ([`spawn`]).
//!
//! Everything here is generic over tokio's `AsyncRead`/`AsyncWrite`, so tests can run the same
//! code over an in-memory duplex pipe.

#![deny(unsafe_code)] // one audited exception: uds::register
#![deny(missing_docs)]

pub mod awake;
pub mod client;
mod framed;
pub mod socket;
#[cfg(unix)]
pub mod spawn;
#[cfg(unix)]
mod uds;

pub use framed::{FrameReader, FrameWriter, RawFrame, ReadError};

use keyhole_protocol::Token;

/// A fresh one-time token: 32 random bytes as 64 lowercase hex digits.
pub fn generate_token() -> std::io::Result<Token> {
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(bytes.as_mut_slice()).map_err(std::io::Error::other)?;
    Ok(Token::new(hex::encode(bytes.as_slice())))
}

/// Reads a token file: its content with trailing whitespace removed. Refuses a file that group or
/// others can access (the provider side and the gateway side read the same files), and an empty
/// token. Errors name the file and what to do; they never contain the token.
pub fn read_token_file(path: &std::path::Path) -> std::io::Result<Token> {
    use std::io::{Error, ErrorKind};
    let unreadable = |e: std::io::Error| {
        Error::new(
            e.kind(),
            format!("cannot read token file {}: {e}", path.display()),
        )
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(unreadable)?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "token file {} has mode {mode:o}; it must not be readable by group or others \
                     (chmod 600 {})",
                    path.display(),
                    path.display()
                ),
            ));
        }
    }
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(unreadable)?);
    let token = text.trim_end();
    if token.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("token file {} is empty", path.display()),
        ));
    }
    Ok(Token::new(token.to_string()))
}

/// A boxed byte stream half, so connections over sockets and over in-memory pipes share one type.
pub type BoxRead = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
/// The writing counterpart of [`BoxRead`].
pub type BoxWrite = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;
