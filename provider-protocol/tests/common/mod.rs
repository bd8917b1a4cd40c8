//! Shared fixtures for the protocol's integration tests.

#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect
#![allow(dead_code)]

use std::collections::BTreeMap;

use keyhole_protocol::*;

/// Representative messages, one per interesting shape, with stable names for golden files.
pub fn hello() -> Hello {
    Hello {
        majors: vec![1],
        encodings: vec!["bincode".into(), "json".into()],
        features: vec![],
        token: Token::new("0123abcd".into()),
        max_frame: DEFAULT_MAX_FRAME,
    }
}

pub fn hello_ack() -> HelloReply {
    HelloReply::Accept(HelloAck {
        major: 1,
        encoding: Encoding::Bincode,
        provider: ProviderInfo {
            name: "memory".into(),
            version: "0.1.0".into(),
        },
        capabilities: Capabilities {
            store: true,
            rotate: true,
            revoke: true,
            list: true,
            watch: true,
            versions_kept: 10,
            max_value_size: 65536,
        },
        features: vec![],
        max_frame: DEFAULT_MAX_FRAME,
    })
}

pub fn resolve_request() -> Request {
    Request {
        id: 7,
        timeout_ms: 5000,
        op: Op::Resolve {
            name: "db/password".into(),
            version: None,
        },
    }
}

pub fn store_request() -> Request {
    Request {
        id: 8,
        timeout_ms: 5000,
        op: Op::Store {
            name: "api-key".into(),
            value: SecretBytes::copy_from(&[0x00, 0xff, b'k', b'h']),
            create_only: true,
            labels: BTreeMap::from([("team".to_string(), "infra".to_string())]),
        },
    }
}

pub fn resolved_response() -> ProviderMessage {
    ProviderMessage::Response(Response {
        id: 7,
        outcome: Outcome::Ok(Reply::Resolved {
            value: SecretBytes::copy_from(b"s3cr\xe9t"),
            version: "3".into(),
        }),
    })
}

pub fn error_response() -> ProviderMessage {
    ProviderMessage::Response(Response {
        id: 9,
        outcome: Outcome::Err(ProviderError::unsupported(OpKind::Watch)),
    })
}
