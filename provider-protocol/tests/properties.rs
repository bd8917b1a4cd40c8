//! Property tests: every message round-trips in both encodings, and arbitrary bytes never make a
//! decoder panic.

#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

use std::collections::BTreeMap;

use keyhole_protocol::*;
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn name() -> impl Strategy<Value = String> {
    "\\PC{0,40}"
}

fn secret() -> impl Strategy<Value = SecretBytes> {
    vec(any::<u8>(), 0..300).prop_map(SecretBytes::new)
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    btree_map(name(), name(), 0..4)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (name(), option::of(name())).prop_map(|(name, version)| Op::Resolve { name, version }),
        (name(), secret(), any::<bool>(), labels()).prop_map(
            |(name, value, create_only, labels)| Op::Store {
                name,
                value,
                create_only,
                labels
            }
        ),
        (name(), secret(), option::of(name())).prop_map(|(name, value, expected_version)| {
            Op::Rotate {
                name,
                value,
                expected_version,
            }
        }),
        name().prop_map(|name| Op::Revoke { name }),
        name().prop_map(|name| Op::Describe { name }),
        (name(), option::of(name()), any::<u32>()).prop_map(|(prefix, page, limit)| Op::List {
            prefix,
            page,
            limit
        }),
        Just(Op::Health {}),
        name().prop_map(|prefix| Op::Watch { prefix }),
        any::<u64>().prop_map(|id| Op::Cancel { id }),
        Just(Op::Goodbye {}),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    (any::<u64>(), any::<u32>(), op()).prop_map(|(id, timeout_ms, op)| Request {
        id,
        timeout_ms,
        op,
    })
}

fn description() -> impl Strategy<Value = Description> {
    (
        name(),
        prop_oneof![Just(SecretState::Active), Just(SecretState::Revoked)],
        option::of(name()),
        vec(
            (name(), any::<u64>()).prop_map(|(version, created_at_ms)| VersionInfo {
                version,
                created_at_ms,
            }),
            0..4,
        ),
        any::<u64>(),
        any::<u64>(),
        labels(),
    )
        .prop_map(
            |(name, state, current_version, versions, created_at_ms, updated_at_ms, labels)| {
                Description {
                    name,
                    state,
                    current_version,
                    versions,
                    created_at_ms,
                    updated_at_ms,
                    labels,
                }
            },
        )
}

fn error() -> impl Strategy<Value = ProviderError> {
    (
        proptest::sample::select(ErrorCode::ALL.to_vec()),
        name(),
        any::<bool>(),
    )
        .prop_map(|(code, message, retryable)| ProviderError {
            retryable,
            ..ProviderError::new(code, message)
        })
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        (secret(), name()).prop_map(|(value, version)| Reply::Resolved { value, version }),
        name().prop_map(|version| Reply::Stored { version }),
        name().prop_map(|version| Reply::Rotated { version }),
        Just(Reply::Revoked {}),
        description().prop_map(Reply::Described),
        (vec(description(), 0..3), option::of(name()))
            .prop_map(|(entries, next_page)| Reply::Listed { entries, next_page }),
        (
            proptest::sample::select(vec![
                HealthStatus::Ok,
                HealthStatus::Degraded,
                HealthStatus::Locked,
                HealthStatus::Unauthorized,
                HealthStatus::Unavailable
            ]),
            name()
        )
            .prop_map(|(status, detail)| Reply::Health(HealthReport { status, detail })),
        Just(Reply::Watching {}),
        any::<bool>().prop_map(|found| Reply::CancelAck { found }),
        Just(Reply::GoodbyeAck {}),
    ]
}

fn provider_message() -> impl Strategy<Value = ProviderMessage> {
    prop_oneof![
        (any::<u64>(), reply()).prop_map(|(id, r)| ProviderMessage::Response(Response {
            id,
            outcome: Outcome::Ok(r)
        })),
        (any::<u64>(), error()).prop_map(|(id, e)| ProviderMessage::Response(Response {
            id,
            outcome: Outcome::Err(e)
        })),
        (
            any::<u64>(),
            name(),
            prop_oneof![Just(Change::Updated), Just(Change::Revoked)],
            option::of(name())
        )
            .prop_map(|(watch_id, name, change, version)| ProviderMessage::Event(
                WatchEvent {
                    watch_id,
                    name,
                    change,
                    version
                }
            )),
        error().prop_map(ProviderMessage::Abort),
    ]
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        vec(any::<u16>(), 0..4),
        vec(name(), 0..4),
        vec(name(), 0..4),
        name(),
        any::<u32>(),
    )
        .prop_map(|(majors, encodings, features, token, max_frame)| Hello {
            majors,
            encodings,
            features,
            token: Token::new(token),
            max_frame,
        })
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(msg: &T) {
    for enc in Encoding::ALL {
        let mut frame = Vec::new();
        encode_frame(1, enc, msg, MAX_MAX_FRAME, &mut frame).unwrap();
        let Ok(Peek::Frame { header, total }) = peek(&frame, MAX_MAX_FRAME) else {
            panic!("not one frame");
        };
        assert_eq!(total, frame.len());
        assert_eq!(header.encoding, enc);
        let back: T = decode(enc, &frame[HEADER_LEN..]).unwrap();
        assert_eq!(&back, msg, "over {enc}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn requests_round_trip(req in request()) {
        round_trip(&req);
    }

    #[test]
    fn provider_messages_round_trip(msg in provider_message()) {
        round_trip(&msg);
    }

    #[test]
    fn hellos_round_trip(h in hello()) {
        round_trip(&h);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..2048)) {
        let _ = peek(&bytes, DEFAULT_MAX_FRAME);
        for enc in Encoding::ALL {
            let _ = decode::<Request>(enc, &bytes);
            let _ = decode::<ProviderMessage>(enc, &bytes);
            let _ = decode::<Hello>(enc, &bytes);
            let _ = decode::<HelloReply>(enc, &bytes);
        }
    }

    #[test]
    fn mutated_valid_frames_never_panic(req in request(), flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        for enc in Encoding::ALL {
            let mut payload = Vec::new();
            encode(enc, &req, &mut payload).unwrap();
            if payload.is_empty() { continue; }
            for (i, b) in &flips {
                let i = i.index(payload.len());
                payload[i] ^= b;
            }
            let _ = decode::<Request>(enc, &payload);
        }
    }
}
