//! The redactor's costs as the values it holds grow: registering one value and the first
//! redaction after it (which builds the automaton), by the value's size; and redacting a 4 KiB
//! chunk of output with many values registered. The 64-byte value and the one-value set are the
//! baselines to read the others against.
//!
//! Full run: `cargo bench -p keyhole-gateway --bench redact`
//! Smoke run (each benchmark once): `cargo test -p keyhole-gateway --benches`

use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use keyhole_gateway::redact::Redactor;

/// `len` pseudo-random bytes (xorshift), different for each `seed`.
fn value(len: usize, seed: u64) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

fn register_and_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("redactor: add one value, then the first redaction");
    group.sample_size(10);
    for len in [64usize, 4 << 10, 64 << 10, 1 << 20] {
        let v = value(len, 1);
        group.bench_with_input(BenchmarkId::from_parameter(len), &v, |b, v| {
            b.iter_batched(
                Redactor::new,
                |redactor| {
                    redactor.add(v);
                    black_box(redactor.redact_str("a log line").len())
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn redact_output(c: &mut Criterion) {
    let mut group =
        c.benchmark_group("redactor: redact 4 KiB of output holding none of the values");
    let text: Vec<u8> = value(4096, 99).into_iter().map(|b| b'a' + b % 26).collect();
    for count in [1usize, 100, 1000] {
        let redactor = Redactor::new();
        for seed in 0..count as u64 {
            redactor.add(&value(64, seed + 1000));
        }
        let _ = redactor.redact(b"build the automaton now");
        group.bench_with_input(BenchmarkId::from_parameter(count), &text, |b, text| {
            b.iter(|| black_box(redactor.redact(text).len()))
        });
    }
    group.finish();
}

criterion_group!(benches, register_and_build, redact_output);
criterion_main!(benches);
