//! Golden bytes: representative frames in both encodings, byte for byte.
//!
//! Any change to these files is a wire change. Regenerate with `KEYHOLE_BLESS=1 cargo test -p
//! keyhole-protocol --test golden` only when the change is deliberate (and then think about the
//! major).

#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

mod common;

use std::path::PathBuf;

use keyhole_protocol::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn check<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    name: &str,
    major: u16,
    encoding: Encoding,
    msg: &T,
) {
    let mut frame = Vec::new();
    encode_frame(major, encoding, msg, DEFAULT_MAX_FRAME, &mut frame).unwrap();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.{encoding}.hex"));
    let mut text = hex::encode(&frame);
    text.push('\n');
    if std::env::var_os("KEYHOLE_BLESS").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let golden = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run with KEYHOLE_BLESS=1", path.display()));
    assert_eq!(text, golden, "{name} over {encoding} changed on the wire");
    // And the golden bytes decode back to the same message.
    let bytes = hex::decode(golden.trim()).unwrap();
    let Ok(Peek::Frame { header, total }) = peek(&bytes, DEFAULT_MAX_FRAME) else {
        panic!("golden {name} is not one whole frame");
    };
    assert_eq!(total, bytes.len());
    assert_eq!((header.major, header.encoding), (major, encoding));
    let back: T = decode(encoding, &bytes[HEADER_LEN..]).unwrap();
    assert_eq!(&back, msg);
}

#[test]
fn handshake_frames_are_json_with_major_zero() {
    check("hello", HANDSHAKE_MAJOR, Encoding::Json, &common::hello());
    check(
        "hello_ack",
        HANDSHAKE_MAJOR,
        Encoding::Json,
        &common::hello_ack(),
    );
}

#[test]
fn requests_in_both_encodings() {
    for enc in Encoding::ALL {
        check("resolve_request", 1, enc, &common::resolve_request());
        check("store_request", 1, enc, &common::store_request());
    }
}

#[test]
fn responses_in_both_encodings() {
    for enc in Encoding::ALL {
        check("resolved_response", 1, enc, &common::resolved_response());
        check("error_response", 1, enc, &common::error_response());
    }
}

#[test]
fn the_protocol_md_worked_example_is_exact() {
    // PROTOCOL.md walks through this frame byte by byte; keep the two in step.
    let req = Request {
        id: 1,
        timeout_ms: 5000,
        op: Op::Health {},
    };
    let mut frame = Vec::new();
    encode_frame(1, Encoding::Json, &req, DEFAULT_MAX_FRAME, &mut frame).unwrap();
    let payload = br#"{"id":1,"timeout_ms":5000,"op":{"health":{}}}"#;
    let mut expected = vec![
        0x4b, 0x48, 0x4f, 0x4c, 0x00, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00,
    ];
    expected.push(payload.len() as u8);
    expected.extend_from_slice(payload);
    assert_eq!(frame, expected);
    assert_eq!(payload.len(), 45);
}
