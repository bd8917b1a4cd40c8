//! The frame header and the pure "is there a whole frame in this buffer?" check.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The four bytes every frame starts with: ASCII `KHOL`.
pub const MAGIC: [u8; 4] = *b"KHOL";

/// Length of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 12;

/// The major carried in the header of the two handshake frames, before a major is agreed.
pub const HANDSHAKE_MAJOR: u16 = 0;

/// Cap on the payload of a handshake frame, in each direction.
pub const HANDSHAKE_MAX_FRAME: u32 = 64 * 1024;

/// Default cap on a frame's payload after the handshake: 1 MiB.
pub const DEFAULT_MAX_FRAME: u32 = 1 << 20;

/// Smallest frame cap a peer may announce. Caps are powers of two from this to [`MAX_MAX_FRAME`].
pub const MIN_MAX_FRAME: u32 = 1 << 20;

/// Largest frame cap a peer may announce: 16 MiB.
pub const MAX_MAX_FRAME: u32 = 16 << 20;

/// How a frame's payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// UTF-8 JSON, one value per frame. Id 1 in the header.
    Json,
    /// bincode 2, standard configuration (little-endian, varint), serde data model. Id 2.
    Bincode,
}

impl Encoding {
    /// Every encoding, in this implementation's order of preference.
    pub const ALL: [Encoding; 2] = [Encoding::Bincode, Encoding::Json];

    /// The id byte written in the frame header.
    pub const fn id(self) -> u8 {
        match self {
            Encoding::Json => 1,
            Encoding::Bincode => 2,
        }
    }

    /// The encoding with header id `id`, if there is one.
    pub const fn from_id(id: u8) -> Option<Encoding> {
        match id {
            1 => Some(Encoding::Json),
            2 => Some(Encoding::Bincode),
            _ => None,
        }
    }

    /// The name used in the handshake: `json` or `bincode`.
    pub const fn name(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Bincode => "bincode",
        }
    }

    /// The encoding called `name` in the handshake, if this implementation knows it.
    pub fn from_name(name: &str) -> Option<Encoding> {
        Encoding::ALL.into_iter().find(|e| e.name() == name)
    }
}

impl std::fmt::Display for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Protocol major of the payload; [`HANDSHAKE_MAJOR`] for the handshake frames.
    pub major: u16,
    /// Encoding of the payload.
    pub encoding: Encoding,
    /// Length of the payload in bytes, not counting the header.
    pub len: u32,
}

impl FrameHeader {
    /// The header's 12 bytes: magic, major (u16 big-endian), encoding id, flags (0), length
    /// (u32 big-endian).
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&self.major.to_be_bytes());
        out[6] = self.encoding.id();
        out[7] = 0;
        out[8..12].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// A header that cannot start a valid frame. Each one closes the connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The first four bytes are not `KHOL`.
    #[error("bad frame magic: this peer does not speak the keyhole provider protocol")]
    BadMagic,
    /// The flags byte is not zero.
    #[error("frame flags byte is {0:#04x}; v1 requires 0")]
    ReservedFlags(u8),
    /// The encoding id is not one this implementation knows.
    #[error("unknown frame encoding id {0}")]
    UnknownEncoding(u8),
    /// The declared payload length exceeds the receiver's cap. Nothing was allocated for it.
    #[error("frame of {len} bytes exceeds the cap of {cap} bytes")]
    TooLarge {
        /// The length the header declared.
        len: u32,
        /// The receiver's cap.
        cap: u32,
    },
}

/// What [`peek`] found at the front of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peek {
    /// The buffer holds no whole frame yet; at least this many more bytes are needed.
    NeedMore(usize),
    /// A whole frame is present: its header, and its total length (header plus payload).
    Frame {
        /// The parsed header.
        header: FrameHeader,
        /// Header plus payload length in bytes.
        total: usize,
    },
}

/// Checks whether `buf` starts with a whole, acceptable frame, without copying or allocating.
///
/// The header is validated as soon as its bytes are present, so a bad magic or an oversized length
/// is reported before the payload is waited for (and before anything is allocated for it).
pub fn peek(buf: &[u8], cap: u32) -> Result<Peek, FrameError> {
    let magic_seen = buf.len().min(MAGIC.len());
    if buf[..magic_seen] != MAGIC[..magic_seen] {
        return Err(FrameError::BadMagic);
    }
    if buf.len() < HEADER_LEN {
        return Ok(Peek::NeedMore(HEADER_LEN - buf.len()));
    }
    let major = u16::from_be_bytes([buf[4], buf[5]]);
    let encoding = Encoding::from_id(buf[6]).ok_or(FrameError::UnknownEncoding(buf[6]))?;
    if buf[7] != 0 {
        return Err(FrameError::ReservedFlags(buf[7]));
    }
    let len = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
    if len > cap {
        return Err(FrameError::TooLarge { len, cap });
    }
    let total = HEADER_LEN + len as usize;
    if buf.len() < total {
        return Ok(Peek::NeedMore(total - buf.len()));
    }
    Ok(Peek::Frame {
        header: FrameHeader {
            major,
            encoding,
            len,
        },
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = FrameHeader {
            major: 1,
            encoding: Encoding::Bincode,
            len: 5,
        };
        let mut buf = h.to_bytes().to_vec();
        assert_eq!(peek(&buf, 100), Ok(Peek::NeedMore(5)));
        buf.extend_from_slice(b"hello");
        assert_eq!(
            peek(&buf, 100),
            Ok(Peek::Frame {
                header: h,
                total: 17
            })
        );
    }

    #[test]
    fn bad_magic_is_reported_from_the_first_byte() {
        assert_eq!(peek(b"X", 100), Err(FrameError::BadMagic));
        assert_eq!(peek(b"KH", 100), Ok(Peek::NeedMore(10)));
    }

    #[test]
    fn oversized_length_is_refused_before_the_payload_arrives() {
        let h = FrameHeader {
            major: 1,
            encoding: Encoding::Json,
            len: u32::MAX,
        };
        assert_eq!(
            peek(&h.to_bytes(), 1024),
            Err(FrameError::TooLarge {
                len: u32::MAX,
                cap: 1024
            })
        );
    }

    #[test]
    fn flags_and_encoding_are_checked() {
        let mut b = FrameHeader {
            major: 1,
            encoding: Encoding::Json,
            len: 0,
        }
        .to_bytes();
        b[7] = 1;
        assert_eq!(peek(&b, 10), Err(FrameError::ReservedFlags(1)));
        b[7] = 0;
        b[6] = 9;
        assert_eq!(peek(&b, 10), Err(FrameError::UnknownEncoding(9)));
    }
}
