//! provider-file's resolve at 100 and at 100,000 records, in process, measured in alternating
//! blocks so that both sizes see the same machine (on a shared VM, two runs a minute apart can
//! differ by more than the effect measured).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keyhole_protocol::{Encoding, Op, Outcome, Reply, SecretBytes};
use keyhole_provider_file::{Argon2Params, KekSource, Store, StoreOptions, kek, store};
use keyhole_transport::client::Client;

use crate::stats::Samples;

/// Resolve times at each store size: per block (in process) or per call (over the socket).
pub struct Scaling {
    pub small_records: usize,
    pub large_records: usize,
    pub small: Samples,
    pub large: Samples,
}

/// How much to measure.
pub struct Plan {
    pub small_records: usize,
    pub large_records: usize,
    pub rounds: usize,
    pub block: usize,
}

pub const FULL: Plan = Plan {
    small_records: 100,
    large_records: 100_000,
    rounds: 30,
    block: 20_000,
};

pub const SMOKE: Plan = Plan {
    small_records: 100,
    large_records: 1_000,
    rounds: 3,
    block: 50,
};

/// A store of `records` 64-byte secrets under `dir`, opened with its key file.
struct Fixture {
    store: Store,
    path: PathBuf,
    key: PathBuf,
    records: usize,
}

fn fixture(dir: &Path, records: usize) -> Result<Fixture, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let key = dir.join("key");
    kek::generate_key_file(&key).map_err(|e| e.to_string())?;
    let source = KekSource::KeyFile(key.clone());
    let path = dir.join("store");
    store::init(&path, &source, Argon2Params::DEFAULT, false).map_err(|e| e.to_string())?;
    // Building the fixture without fsync is the one legitimate use of the danger option: this
    // measures reads, and a crash here loses only the fixture.
    let options = StoreOptions {
        danger_skip_fsync: true,
        ..StoreOptions::default()
    };
    let store = Store::open(&path, &source, false, options).map_err(|e| e.to_string())?;
    let value = SecretBytes::copy_from(&[0x5a; 64]);
    let mut name = String::new();
    for i in 0..records {
        name_of(&mut name, i);
        store
            .store(&name, &value, false, BTreeMap::new())
            .map_err(|e| e.to_string())?;
    }
    Ok(Fixture {
        store,
        path,
        key,
        records,
    })
}

/// Writes the `i`th secret's name into a reused buffer, as a request decoder would hand it over.
fn name_of(buf: &mut String, i: usize) {
    buf.clear();
    let _ = write!(buf, "bench/secret-{i:06}");
}

/// The next index of a prime stride through `records`: every resolve touches another record.
fn next(i: &mut usize, records: usize) -> usize {
    *i = (*i + 7919) % records;
    *i
}

/// `count` in-process resolves striding through the fixture. Returns the time per resolve.
fn block(f: &Fixture, at: &mut usize, count: usize) -> Result<Duration, String> {
    let mut name = String::with_capacity(32);
    let began = Instant::now();
    for _ in 0..count {
        name_of(&mut name, next(at, f.records));
        black_box(f.store.resolve(&name, None).map_err(|e| e.to_string())?);
    }
    Ok(began.elapsed() / u32::try_from(count.max(1)).unwrap_or(u32::MAX))
}

/// The two fixtures, built under `dir`.
pub struct Fixtures(Fixture, Fixture);

pub fn fixtures(plan: &Plan, dir: &Path) -> Result<Fixtures, String> {
    Ok(Fixtures(
        fixture(&dir.join("small"), plan.small_records)?,
        fixture(&dir.join("large"), plan.large_records)?,
    ))
}

/// In process: the store's own resolve, the time per resolve of each block.
pub fn in_process(plan: &Plan, f: &Fixtures) -> Result<Scaling, String> {
    let Fixtures(small, large) = f;
    let mut out = Scaling::new(small, large);
    let mut sides = [(small, 0usize, &mut out.small), (large, 0, &mut out.large)];
    // Fill both record caches before measuring.
    for (f, at, _) in sides.iter_mut() {
        block(f, at, f.records)?;
    }
    for _ in 0..plan.rounds {
        for (f, at, samples) in sides.iter_mut() {
            // Each block warms its own store first, as a steady stream of resolves would.
            block(f, at, plan.block / 10)?;
            samples.push(block(f, at, plan.block)?);
        }
    }
    Ok(out)
}

/// Over the protocol: a `keyhole-provider-file` process on each store, started the gateway's
/// way and pinned to the bench's core, resolved one call at a time; every call's latency.
pub async fn over_socket(plan: &Plan, f: &Fixtures, program: &Path) -> Result<Scaling, String> {
    let Fixtures(small, large) = f;
    let args = |f: &Fixture| -> Vec<OsString> {
        vec![
            "--store".into(),
            f.path.clone().into(),
            "--key-file".into(),
            f.key.clone().into(),
        ]
    };
    let small_provider = crate::start_provider(program, &args(small), Encoding::Bincode).await?;
    let large_provider = crate::start_provider(program, &args(large), Encoding::Bincode).await?;
    // The two providers on the bench's core, so that neither size gets a placement the other
    // does not (a cross-core wake-up alone costs more than the effect measured).
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let placement = if cpus >= 2 {
        crate::Placement::SameCore
    } else {
        crate::Placement::Scheduler
    };
    let _pinned = placement.apply(
        [&small_provider, &large_provider]
            .into_iter()
            .filter_map(|p| p.process.pid()),
    )?;
    let mut out = Scaling::new(small, large);
    let calls = (plan.block / 10).max(1);
    let mut sides = [
        (&small_provider.client, small, 0usize, &mut out.small),
        (&large_provider.client, large, 0, &mut out.large),
    ];
    // Fill both providers' record caches, then alternate blocks.
    for (client, f, at, _) in sides.iter_mut() {
        resolve_block(client, f, at, f.records, None).await?;
    }
    for _ in 0..plan.rounds {
        for (client, f, at, samples) in sides.iter_mut() {
            resolve_block(client, f, at, calls / 10, None).await?;
            resolve_block(client, f, at, calls, Some(samples)).await?;
        }
    }
    Ok(out)
}

async fn resolve_block(
    client: &Client,
    f: &Fixture,
    at: &mut usize,
    count: usize,
    mut samples: Option<&mut Samples>,
) -> Result<(), String> {
    let mut name = String::with_capacity(32);
    for _ in 0..count {
        name_of(&mut name, next(at, f.records));
        let op = Op::Resolve {
            name: name.clone(),
            version: None,
        };
        let began = Instant::now();
        match client.call(op, Duration::from_secs(10)).await {
            Ok(Outcome::Ok(Reply::Resolved { .. })) => {}
            other => return Err(format!("resolve failed: {other:?}")),
        }
        if let Some(s) = samples.as_deref_mut() {
            s.push(began.elapsed());
        }
    }
    Ok(())
}

impl Scaling {
    fn new(small: &Fixture, large: &Fixture) -> Scaling {
        Scaling {
            small_records: small.records,
            large_records: large.records,
            small: Samples::default(),
            large: Samples::default(),
        }
    }
}
