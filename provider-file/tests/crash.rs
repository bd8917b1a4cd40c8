//! Crash safety: the provider is killed with SIGKILL at random moments while many writes are in
//! flight, and restarted. Every write it acknowledged before dying must survive. And `rewrap`,
//! killed at random moments, leaves the store opened by exactly one key, every value intact.

#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

mod common;

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyhole_protocol::{ErrorCode, Outcome, Reply, SecretState};
use keyhole_transport::client::Client;

use common::{Secret, Served, TestStore};

const NAMES: [&str; 4] = ["crash/a", "crash/b", "crash/c", "crash/d"];
/// Concurrent writers per name: at most this many writes of a name are unacknowledged at a kill.
const WRITERS_PER_NAME: usize = 3;
const VERSIONS_KEPT: u64 = 10;
const MIN_ACKED: usize = 400;
const MIN_ROUNDS: usize = 10;

/// Per name: every acknowledged version and its value.
type Acked = Vec<BTreeMap<u64, Vec<u8>>>;
/// Per name: every value ever sent, acknowledged or not.
type Sent = Arc<Mutex<Vec<HashSet<Vec<u8>>>>>;
/// Acknowledgements of one round: name index, version, value.
type Acks = Arc<Mutex<Vec<(usize, u64, Vec<u8>)>>>;

fn version_number(name: &str, v: &str) -> u64 {
    v.parse()
        .unwrap_or_else(|_| panic!("{name}: version {v:?} is not a decimal counter"))
}

/// Checks what survived: every acknowledged version within the history limit resolves pinned to
/// its value, the current version is at least the newest acknowledged one, and nothing resolves to
/// a value that was never sent.
///
/// Versions read back here are durable from then on: they join `acked` (not counted as
/// acknowledged writes), and the current version becomes the baseline of the next round.
async fn check(c: &Client, acked: &mut Acked, baseline: &mut [u64], sent: &Sent, round: usize) {
    for (i, name) in NAMES.iter().enumerate() {
        let Some((&newest, _)) = acked[i].last_key_value() else {
            continue;
        };
        let sent_values = sent.lock().unwrap()[i].clone();
        let d = common::describe(c, name).await;
        assert_eq!(d.state, SecretState::Active, "{name} after round {round}");
        let current = version_number(name, d.current_version.as_deref().unwrap());
        assert!(
            current >= newest,
            "{name} after round {round}: current version {current} but version {newest} was acknowledged"
        );
        let known = newest.max(baseline[i]);
        assert!(
            current >= known && current - known <= WRITERS_PER_NAME as u64,
            "{name} after round {round}: current version {current}, newest known {known}, \
             but at most {WRITERS_PER_NAME} writes were unacknowledged"
        );
        baseline[i] = current;
        for (&v, value) in &acked[i].clone() {
            let pinned = v.to_string();
            if v + VERSIONS_KEPT > current {
                let what = format!("{name}@{v} (acknowledged) after round {round}");
                match common::resolve(c, name, Some(&pinned)).await {
                    Outcome::Ok(Reply::Resolved {
                        value: got,
                        version,
                    }) => {
                        assert_eq!(version, pinned, "{what}");
                        assert!(got.expose() == value.as_slice(), "{what}: another value");
                    }
                    other => panic!("{what}: {other:?}"),
                }
            } else {
                common::expect_err(
                    common::resolve(c, name, Some(&pinned)).await,
                    ErrorCode::VersionUnavailable,
                    &format!("{name}@{v}, beyond versions_kept, after round {round}"),
                );
            }
        }
        // Versions that were written but whose acknowledgement was lost: any value they hold is
        // one that was sent for this name, never garbage.
        for info in &d.versions {
            let v = version_number(name, &info.version);
            if acked[i].contains_key(&v) {
                continue;
            }
            match common::resolve(c, name, Some(&info.version)).await {
                Outcome::Ok(Reply::Resolved { value, .. }) => {
                    assert!(
                        sent_values.contains(value.expose()),
                        "{name}@{v} after round {round} resolves to a value never sent"
                    );
                    acked[i].insert(v, value.expose().to_vec());
                }
                other => panic!("{name}@{v} is listed by Describe: {other:?}"),
            }
        }
        match common::resolve(c, name, None).await {
            Outcome::Ok(Reply::Resolved { value, version }) => {
                assert_eq!(version, current.to_string(), "{name} after round {round}");
                match acked[i].get(&current) {
                    Some(expected) => assert!(
                        value.expose() == expected.as_slice(),
                        "{name} after round {round}: the newest acknowledged value is lost"
                    ),
                    None => assert!(sent_values.contains(value.expose())),
                }
            }
            other => panic!("{name} after round {round}: {other:?}"),
        }
    }
}

/// One writer: stores and rotates `name` with fresh values until the connection dies.
async fn writer(
    client: Arc<Client>,
    index: usize,
    tag: String,
    sent: Sent,
    acks: Acks,
    count: Arc<AtomicUsize>,
) -> Result<(), String> {
    let name = NAMES[index];
    for seq in 0u64.. {
        let value = format!("{name}|{tag}|{seq}|").into_bytes();
        let mut value = value;
        value.extend(common::random_bytes(8));
        sent.lock().unwrap()[index].insert(value.clone());
        let op = if seq % 2 == 0 {
            common::rotate_op(name, &value)
        } else {
            common::store_op(name, &value)
        };
        match client.call(op, common::CALL).await {
            Ok(Outcome::Ok(Reply::Rotated { version } | Reply::Stored { version })) => {
                acks.lock()
                    .unwrap()
                    .push((index, version_number(name, &version), value));
                count.fetch_add(1, Ordering::SeqCst);
            }
            Ok(other) => return Err(format!("{name}: a write answered {other:?}")),
            // The provider was killed.
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_at_random_moments() {
    let store: TestStore = common::key_store().await;
    let sent: Sent = Arc::new(Mutex::new(vec![HashSet::new(); NAMES.len()]));
    let mut acked: Acked = vec![BTreeMap::new(); NAMES.len()];
    let mut baseline = vec![0u64; NAMES.len()];
    let mut total = 0usize;
    let mut rounds = 0usize;
    let started = Instant::now();

    while total < MIN_ACKED || rounds < MIN_ROUNDS {
        assert!(
            rounds < 40 && started.elapsed() < Duration::from_secs(60),
            "only {total} acknowledged writes in {rounds} rounds ({:?})",
            started.elapsed()
        );
        let Served {
            mut process,
            client,
            events,
        } = common::serve(&store, &[]).await;
        check(&client, &mut acked, &mut baseline, &sent, rounds).await;
        if rounds == 0 {
            for (i, name) in NAMES.iter().enumerate() {
                let value = format!("{name}|first").into_bytes();
                sent.lock().unwrap()[i].insert(value.clone());
                let v = common::store(&client, name, &value).await;
                acked[i].insert(version_number(name, &v), value);
                total += 1;
            }
        }

        let client = Arc::new(client);
        let acks: Acks = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for index in 0..NAMES.len() {
            for w in 0..WRITERS_PER_NAME {
                tasks.push(tokio::spawn(writer(
                    Arc::clone(&client),
                    index,
                    format!("r{rounds}w{w}"),
                    Arc::clone(&sent),
                    Arc::clone(&acks),
                    Arc::clone(&count),
                )));
            }
        }
        // The kill comes after a random number of acknowledgements, with writes in flight.
        let kill_after = 1 + common::random_below(80) as usize;
        let poll = Instant::now();
        while count.load(Ordering::SeqCst) < kill_after {
            assert!(
                poll.elapsed() < Duration::from_secs(20),
                "round {rounds}: only {} writes acknowledged in 20 s; stderr:\n{}",
                count.load(Ordering::SeqCst),
                process.output().tail(2000)
            );
            if let Some(t) = tasks.iter().find(|t| t.is_finished()) {
                panic!("round {rounds}: a writer stopped early ({t:?}) before the kill");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        process.kill().await;
        for t in tasks {
            let result = tokio::time::timeout(Duration::from_secs(15), t)
                .await
                .expect("a writer did not notice the kill within 15 s")
                .unwrap();
            if let Err(e) = result {
                panic!(
                    "round {rounds}: {e}\nstderr:\n{}",
                    process.output().tail(2000)
                );
            }
        }
        drop(events);
        for (index, version, value) in std::mem::take(&mut *acks.lock().unwrap()) {
            let previous = acked[index].insert(version, value);
            assert!(
                previous.is_none(),
                "{}: version {version} was acknowledged twice",
                NAMES[index]
            );
            total += 1;
        }
        rounds += 1;
    }

    // One last restart: everything acknowledged is there, and the store is intact.
    let served = common::serve(&store, &[]).await;
    check(&served.client, &mut acked, &mut baseline, &sent, rounds).await;
    served.stop().await;
    common::assert_clean_layout(&store);
    let mut args = vec!["verify".into(), store.dir.clone().into_os_string()];
    args.extend(store.secret.args());
    let run = common::cli(&args).await.ok();
    assert!(run.stdout.contains(", 0 damaged"), "{}", run.show());
    assert!(total >= MIN_ACKED, "{total}");
    eprintln!(
        "{total} acknowledged writes over {rounds} kills in {:?}",
        started.elapsed()
    );
}

/// Which of two key files opens the store, per `verify`; exactly one must.
async fn the_key_that_opens(store: &TestStore, keys: [&PathBuf; 2], records: usize) -> usize {
    let mut opens = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let run = common::cli([
            OsString::from("verify"),
            store.dir.clone().into(),
            "--key-file".into(),
            (*key).into(),
        ])
        .await;
        match run.code {
            Some(0) => {
                let summary = format!("verified {records} records, 0 damaged");
                assert!(run.stdout.contains(&summary), "{}", run.show());
                opens.push(i);
            }
            _ => assert!(
                run.stderr.contains("wrong key or passphrase"),
                "{}",
                run.show()
            ),
        }
    }
    assert_eq!(opens.len(), 1, "keys that open the store: {opens:?}");
    opens[0]
}

/// `rewrap` of `store` from key file `from` to `to`, quiet.
fn rewrap(store: &TestStore, from: &Path, to: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(common::BIN);
    command
        .arg("rewrap")
        .arg("--store")
        .arg(&store.dir)
        .arg("--key-file")
        .arg(from)
        .arg("--new-key-file")
        .arg(to)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_killed_at_a_random_moment_leaves_exactly_one_key_working() {
    const RECORDS: usize = 40;
    let store = common::key_store().await;
    let Secret::KeyFile(first) = &store.secret else {
        unreachable!()
    };
    let other = store.path("other.key");
    common::write_file(&other, &common::random_bytes(32), 0o600);
    let keys = [first, &other];

    let served = common::serve(&store, &[]).await;
    for i in 0..RECORDS {
        let name = format!("rewrap/{i}");
        common::store(&served.client, &name, format!("{name} v1").as_bytes()).await;
        common::rotate(&served.client, &name, format!("{name} v2").as_bytes()).await;
    }
    served.stop().await;

    let started = Instant::now();
    let mut current = 0;
    let mut completed = 0;
    let mut switched = 0;
    let mut full: Option<u64> = None;
    for round in 0..12 {
        let (from, to) = (keys[current], keys[1 - current]);
        let mut child = rewrap(&store, from, to).kill_on_drop(true).spawn().unwrap();
        // The first round runs to the end and is timed; the others are killed at a random
        // moment within about that time.
        let began = Instant::now();
        if let Some(full) = full {
            let delay = Duration::from_micros(common::random_below(full * 13 / 10));
            if tokio::time::timeout(delay, child.wait()).await.is_err() {
                child.start_kill().unwrap();
            }
        }
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("rewrap did not finish within 30 s")
            .unwrap();
        if status.success() {
            completed += 1;
        }
        if full.is_none() {
            assert!(status.success(), "rewrap failed");
            full = Some(
                u64::try_from(began.elapsed().as_micros())
                    .unwrap()
                    .max(1000),
            );
        }
        let opens = the_key_that_opens(&store, keys, RECORDS).await;
        if status.success() {
            assert_eq!(opens, 1 - current, "round {round}: rewrap succeeded");
        }
        if opens != current {
            switched += 1;
        }
        current = opens;

        let key = Secret::KeyFile(keys[current].clone());
        let mut args: Vec<OsString> = vec!["--store".into(), store.dir.clone().into()];
        args.extend(key.args());
        let served = common::try_serve_with(args, &[], keyhole_protocol::Encoding::Bincode)
            .await
            .unwrap();
        for i in 0..RECORDS {
            let name = format!("rewrap/{i}");
            common::assert_resolves(&served.client, &name, None, format!("{name} v2").as_bytes())
                .await;
            common::assert_resolves(
                &served.client,
                &name,
                Some("1"),
                format!("{name} v1").as_bytes(),
            )
            .await;
        }
        served.stop().await;
        // Opening the store cleared what the killed rewrap left: above all the other
        // generation, whose DEKs the other key unwraps.
        common::assert_clean_layout(&store);
    }
    eprintln!(
        "rewrap: {completed} of 12 exited by themselves, {switched} switched keys, {:?} each \
         unkilled; {:?} in all",
        full.map(Duration::from_micros),
        started.elapsed()
    );
}

#[tokio::test]
async fn a_running_provider_writes_into_the_generation_a_rewrap_made_live() {
    let store = common::key_store().await;
    let Secret::KeyFile(key) = &store.secret else {
        unreachable!()
    };
    let served = common::serve(&store, &[]).await;
    common::store(&served.client, "before", b"written before the rewrap").await;
    let [old] = &store.generation_dirs()[..] else {
        panic!("one generation before the rewrap")
    };
    // Another process rewraps under the same key while this provider runs: the store moves to
    // a new generation.
    let status = rewrap(&store, key, key).status().await.unwrap();
    assert!(status.success(), "rewrap failed");
    // The rewrap could not remove the old generation (here it is put back as it was, records
    // and all): the provider can still read there, and must not write there.
    let [new] = &store.generation_dirs()[..] else {
        panic!("one generation after the rewrap")
    };
    std::fs::create_dir(old).unwrap();
    for entry in std::fs::read_dir(new).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), old.join(entry.file_name())).unwrap();
    }
    // The running provider's next write lands in the live generation, not the dead one.
    // A rotation reads the record where it already is, so nothing else sends it to the header.
    common::rotate(&served.client, "before", b"rotated after the rewrap").await;
    common::store(&served.client, "after", b"written after the rewrap").await;
    served.stop().await;
    let reopened = common::serve(&store, &[]).await;
    for (name, value) in [
        ("before", &b"rotated after the rewrap"[..]),
        ("after", &b"written after the rewrap"[..]),
    ] {
        match common::resolve(&reopened.client, name, None).await {
            Outcome::Ok(Reply::Resolved { value: got, .. }) => assert_eq!(got.expose(), value),
            other => panic!("{name}: {other:?}"),
        }
    }
    reopened.stop().await;
}
