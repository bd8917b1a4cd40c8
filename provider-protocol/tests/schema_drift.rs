//! The committed JSON Schema must equal the one generated from the types.
//!
//! After a deliberate change to the wire types: `KEYHOLE_BLESS=1 cargo test -p keyhole-protocol
//! --test schema_drift`, then review and commit `schema/v1.json`.

#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

use std::path::PathBuf;

#[test]
fn committed_schema_matches_the_types() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schema/v1.json");
    let generated = keyhole_protocol::schema_string();
    if std::env::var_os("KEYHOLE_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "provider-protocol/schema/v1.json has drifted from the Rust types; \
         regenerate it with KEYHOLE_BLESS=1 cargo test -p keyhole-protocol --test schema_drift"
    );
}

#[test]
fn schema_names_every_frame_payload() {
    let schema = keyhole_protocol::schema();
    let defs = schema["$defs"].as_object().unwrap();
    for name in [
        "Hello",
        "HelloReply",
        "Request",
        "ProviderMessage",
        "ErrorCode",
        "SecretBytes",
    ] {
        assert!(defs.contains_key(name), "schema lacks {name}");
    }
}
