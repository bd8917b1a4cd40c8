//! The JSON Schema of every message, generated from the types by schemars.

use schemars::SchemaGenerator;
use serde_json::{Value, json};

use crate::{Hello, HelloReply, ProviderMessage, Request};

/// The protocol's JSON Schema (draft 2020-12): one definition per type, and the four frame
/// payloads (`Hello`, `HelloReply`, `Request`, `ProviderMessage`) as the top-level alternatives.
pub fn schema() -> Value {
    let mut generator = SchemaGenerator::default();
    let roots = [
        generator.subschema_for::<Hello>(),
        generator.subschema_for::<HelloReply>(),
        generator.subschema_for::<Request>(),
        generator.subschema_for::<ProviderMessage>(),
    ];
    let defs = generator.take_definitions(true);
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:keyhole:provider-protocol:v1",
        "title": "keyhole provider protocol, major 1",
        "description": "The JSON payload of every frame. The gateway sends Hello, then Requests; the provider sends HelloReply, then ProviderMessages. See PROTOCOL.md for framing and semantics.",
        "anyOf": roots.iter().map(|s| s.as_value().clone()).collect::<Vec<_>>(),
        "$defs": defs,
    })
}

/// [`schema`] as pretty-printed JSON with a trailing newline: the content of `schema/v1.json`.
pub fn schema_string() -> String {
    let mut s = serde_json::to_string_pretty(&schema()).unwrap_or_default();
    s.push('\n');
    s
}
