//! The redactor's costs as the values it holds grow: registering one value and the first
//! redaction after it (which builds the automaton), by the value's size and by how many values are
//! already held; and redacting a 4 KiB chunk of output with many values registered. The 64-byte
//! value, the one-value set and the values added together are the baselines to read the others
//! against.
//!
//! Full run: `cargo bench -p keyhole-gateway --bench redact`
//! Smoke run (each benchmark once): `cargo test -p keyhole-gateway --benches`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use keyhole_gateway::redact::Redactor;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

/// `len` pseudo-random bytes, the same for the same `seed`.
fn value(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    bytes
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

/// A gateway registers every value it resolves, and answers a Resolve only after redacting the
/// provider's version string, so the first resolve of each new value pays this: one more value
/// added to a redactor that already holds `count`, then the first redaction. Only that is timed.
/// Each iteration adds a value never seen before; the set is rebuilt from scratch (untimed) once
/// it has grown by 1% plus ten, so every figure is for `count` values within that.
fn add_to_many(c: &mut Criterion) {
    let mut group = c.benchmark_group("redactor: one more 64 B value, then the first redaction");
    group.sample_size(10);
    for count in [1usize, 100, 1000, 10_000] {
        let holding = |count: usize| {
            let redactor = Redactor::new();
            for seed in 0..count as u64 {
                redactor.add(&value(64, seed + 1000));
            }
            let _ = redactor.redact(b"build the automaton now");
            redactor
        };
        let mut redactor = holding(count);
        let mut seed = 1u64 << 32;
        group.bench_function(BenchmarkId::from_parameter(count), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    if redactor.len() > count + count / 100 + 10 {
                        redactor = holding(count);
                    }
                    seed += 1;
                    let fresh = value(64, seed);
                    let started = Instant::now();
                    redactor.add(&fresh);
                    black_box(redactor.redact_str("v1").len());
                    timed += started.elapsed();
                }
                timed
            })
        });
    }
    group.finish();
}

/// The slowest single step (one more 64 B value, then the first redaction) while a redactor
/// grows from empty to `count` values one at a time, as a gateway's does: what the unluckiest
/// request waits for. Each iteration grows a fresh redactor; the time reported is that growth's
/// slowest step.
fn slowest_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("redactor: the slowest step while growing one at a time");
    group.sample_size(10);
    for count in [1000usize, 10_000] {
        let values: Vec<Vec<u8>> = (0..count as u64).map(|s| value(64, s + 7)).collect();
        group.bench_function(BenchmarkId::from_parameter(count), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let redactor = Redactor::new();
                    let mut worst = Duration::ZERO;
                    for v in &values {
                        let started = Instant::now();
                        redactor.add(v);
                        black_box(redactor.redact_str("v1").len());
                        worst = worst.max(started.elapsed());
                    }
                    total += worst;
                }
                total
            })
        });
    }
    group.finish();
}

/// Redacting output with many values held: added together (one automaton, the baseline), and
/// added one at a time with a redaction after each, as a gateway resolves them (a few tiers).
fn redact_output(c: &mut Criterion) {
    let mut group =
        c.benchmark_group("redactor: redact 4 KiB of output holding none of the values");
    let text: Vec<u8> = value(4096, 99).into_iter().map(|b| b'a' + b % 26).collect();
    for count in [1usize, 100, 1000] {
        for one_at_a_time in [false, true] {
            let redactor = Redactor::new();
            for seed in 0..count as u64 {
                redactor.add(&value(64, seed + 1000));
                if one_at_a_time {
                    let _ = redactor.redact(b"a log line");
                }
            }
            let _ = redactor.redact(b"build the automaton now");
            let added = if one_at_a_time {
                "one at a time"
            } else {
                "together"
            };
            group.bench_with_input(
                BenchmarkId::new(format!("values added {added}"), count),
                &text,
                |b, text| b.iter(|| black_box(redactor.redact(text).len())),
            );
        }
    }
    group.finish();
}

criterion_group!(
    benches,
    register_and_build,
    add_to_many,
    slowest_step,
    redact_output
);
criterion_main!(benches);
