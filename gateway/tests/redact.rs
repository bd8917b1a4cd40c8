//! Property tests of the public redaction API: streaming equals one-shot, whatever the chunking,
//! and no registered value survives.

#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

use std::borrow::Cow;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use keyhole_gateway::redact::{MAX_HEAD, MIN_REDACT_LEN, REPLACEMENT, RedactingWriter, Redactor};
use proptest::prelude::*;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A naive reference: every byte inside any occurrence of any needle is covered, and each
/// maximal covered run becomes one replacement.
fn reference(input: &[u8], needles: &[Vec<u8>]) -> Vec<u8> {
    let mut covered = vec![false; input.len()];
    for needle in needles {
        for start in 0..input.len() {
            if input[start..].starts_with(needle) {
                covered[start..start + needle.len()].fill(true);
            }
        }
    }
    let mut out = Vec::new();
    for (i, &byte) in input.iter().enumerate() {
        if !covered[i] {
            out.push(byte);
        } else if i == 0 || !covered[i - 1] {
            out.extend_from_slice(REPLACEMENT);
        }
    }
    out
}

/// Streams `input` cut at the (unsorted, possibly out of range) positions `cuts`.
fn stream_cut(redactor: &Redactor, input: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
    cuts.sort_unstable();
    cuts.push(input.len());
    let mut stream = redactor.stream();
    let mut out = Vec::new();
    let mut last = 0;
    for cut in cuts {
        out.extend(stream.push(&input[last..cut]));
        last = cut;
    }
    out.extend(stream.finish());
    out
}

/// A secret value that shares no byte with `REPLACEMENT`, so that the replacement next to some
/// text can never spell the value again (which would make "never contains" unsound).
fn value() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), MIN_REDACT_LEN..40).prop_map(|bytes| {
        bytes
            .into_iter()
            .map(|b| {
                if REPLACEMENT.contains(&b) {
                    b ^ 0x80
                } else {
                    b
                }
            })
            .collect()
    })
}

/// Text bytes: arbitrary, or drawn from the value itself so that near misses are frequent.
fn text(value: &[u8], picks: &[(bool, u8)]) -> Vec<u8> {
    picks
        .iter()
        .map(|&(from_value, b)| {
            if from_value {
                value[usize::from(b) % value.len()]
            } else {
                b
            }
        })
        .collect()
}

/// Text, then `copies` times the value followed by more text.
fn with_copies(
    value: &[u8],
    before: &[(bool, u8)],
    after: &[(bool, u8)],
    copies: usize,
) -> Vec<u8> {
    let mut input = text(value, before);
    for _ in 0..copies {
        input.extend_from_slice(value);
        input.extend(text(value, after));
    }
    input
}

// In a module whose name contains `redact`, so `cargo test -p keyhole-gateway redact` runs them.
mod redact_properties {
    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn streamed_equals_one_shot_and_hides_the_value(
            value in value(),
            before in proptest::collection::vec((any::<bool>(), any::<u8>()), 0..64),
            after in proptest::collection::vec((any::<bool>(), any::<u8>()), 0..64),
            copies in 1usize..4,
            cuts in proptest::collection::vec(0usize..300, 0..40),
        ) {
            let redactor = Redactor::new();
            prop_assert!(redactor.add(&value));
            let input = with_copies(&value, &before, &after, copies);
            let one_shot = redactor.redact(&input).into_owned();
            let streamed = stream_cut(&redactor, &input, &cuts);
            prop_assert_eq!(&streamed, &one_shot);
            prop_assert!(!contains(&streamed, &value));
            prop_assert!(contains(&streamed, REPLACEMENT));
        }

        #[test]
        fn values_longer_than_a_head_streamed_equal_one_shot_and_exactly_the_occurrences(
            value in proptest::collection::vec(any::<u8>(), MAX_HEAD - 20..3 * MAX_HEAD),
            before in proptest::collection::vec((any::<bool>(), any::<u8>()), 0..64),
            after in proptest::collection::vec((any::<bool>(), any::<u8>()), 0..64),
            copies in 1usize..4,
            cuts in proptest::collection::vec(0usize..1500, 0..40),
        ) {
            // Forms longer than MAX_HEAD are matched by their heads. Random text does not spell
            // a head, so what is covered is exactly the union of the value's occurrences.
            let redactor = Redactor::new();
            prop_assert!(redactor.add(&value));
            let input = with_copies(&value, &before, &after, copies);
            let one_shot = redactor.redact(&input).into_owned();
            prop_assert_eq!(&one_shot, &reference(&input, std::slice::from_ref(&value)));
            prop_assert_eq!(stream_cut(&redactor, &input, &cuts), one_shot);
        }

        #[test]
        fn encoded_forms_hidden_under_any_chunking(
            value in value(),
            before in proptest::collection::vec(any::<u8>(), 0..32),
            cuts in proptest::collection::vec(0usize..200, 0..20),
        ) {
            let redactor = Redactor::new();
            prop_assert!(redactor.add(&value));
            for form in [
                STANDARD.encode(&value).into_bytes(),
                URL_SAFE_NO_PAD.encode(&value).into_bytes(),
                hex::encode_upper(&value).into_bytes(),
            ] {
                let input = [before.as_slice(), b" ", &form, b" "].concat();
                let streamed = stream_cut(&redactor, &input, &cuts);
                prop_assert_eq!(&streamed, &redactor.redact(&input).into_owned());
                prop_assert!(!contains(&streamed, &form));
            }
        }

        #[test]
        fn many_values_streamed_equals_one_shot(
            values in proptest::collection::vec(proptest::collection::vec(b'a'..b'e', 4..10), 1..9),
            used_between in proptest::collection::vec(any::<bool>(), 9),
            input in proptest::collection::vec(b'a'..b'f', 0..300),
            cuts in proptest::collection::vec(0usize..300, 0..60),
        ) {
            // A tiny alphabet: values overlap, nest and touch each other all the time. Over it,
            // no encoded form can occur (hex has digits, base64 an upper-case letter every 4th
            // character), so the naive union of raw occurrences is the exact expectation.
            // Redacting between two adds builds the values so far, so the later ones go into
            // automata (tiers) of their own, whose occurrences must combine exactly.
            let redactor = Redactor::new();
            for (value, used) in values.iter().zip(&used_between) {
                prop_assert!(redactor.add(value));
                if *used {
                    let _ = redactor.redact(b"between");
                }
            }
            let one_shot = redactor.redact(&input).into_owned();
            prop_assert_eq!(&one_shot, &reference(&input, &values));
            prop_assert_eq!(stream_cut(&redactor, &input, &cuts), one_shot.clone());
            for value in &values {
                prop_assert!(!contains(&one_shot, value));
            }
        }

        #[test]
        fn text_without_secrets_passes_unchanged(
            values in proptest::collection::vec(proptest::collection::vec(b'n'..=b'z', 4..20), 0..4),
            input in proptest::collection::vec(0x80u8..=0xff, 0..300),
            cuts in proptest::collection::vec(0usize..300, 0..30),
        ) {
            // Every form of an ASCII value is ASCII, and the text has none.
            let redactor = Redactor::new();
            for value in &values {
                redactor.add(value);
            }
            prop_assert!(matches!(redactor.redact(&input), Cow::Borrowed(_)));
            prop_assert_eq!(stream_cut(&redactor, &input, &cuts), input);
        }
    }
}

#[tokio::test]
async fn redacting_writer_through_a_duplex() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let redactor = Redactor::new();
    assert!(redactor.add(b"s3cr3t-t0ken"));
    let (client, mut server) = tokio::io::duplex(5);
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        got
    });
    let mut writer = RedactingWriter::new(client, &redactor);
    let b64 = STANDARD.encode(b"s3cr3t-t0ken");
    let input = format!("token: s3cr3t-t0ken\nbase64: {b64}\nlast: s3cr3t-t0");
    for piece in input.as_bytes().chunks(3) {
        writer.write_all(piece).await.unwrap();
    }
    writer.write_all(b"ken").await.unwrap();
    writer.shutdown().await.unwrap();
    drop(writer);
    assert_eq!(
        reader.await.unwrap(),
        b"token: [REDACTED]\nbase64: [REDACTED]\nlast: [REDACTED]"
    );
}
