//! Secret volumes as the kubelet writes them: atomic `..data` swaps seen by watch and never read
//! half-and-half, a `..data` that runs ahead of its files, missing and unreadable keys, pins.

#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keyhole_protocol::{Change, ErrorCode, HealthStatus, Op, Outcome, Reply};

use common::{Kubelet, assert_error, dir_args, expected_version, start};

/// The keys of every generation in the swap tests.
const KEYS: [&str; 6] = ["password", "username", "tls.crt", "tls.key", "token", "url"];

/// Generation `g`'s value of `key`: it names both, so any value read tells where it came from.
/// Padded so that reading a whole generation takes a little while.
fn value(g: u64, key: &str) -> Vec<u8> {
    let mut v = format!("gen-{g:06}:{key}:").into_bytes();
    v.resize(4096, b'.');
    v
}

fn generation_of(value: &[u8], key: &str) -> u64 {
    let text = std::str::from_utf8(value).unwrap();
    let rest = text.strip_prefix("gen-").unwrap();
    let (g, rest) = rest.split_once(':').unwrap();
    assert!(
        rest.starts_with(&format!("{key}:")),
        "value of {key} names another key"
    );
    g.parse().unwrap()
}

fn files(g: u64) -> Vec<(String, Vec<u8>)> {
    KEYS.iter().map(|k| (k.to_string(), value(g, k))).collect()
}

fn publish(kubelet: &mut Kubelet, g: u64) {
    let files = files(g);
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    kubelet.publish(&refs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubelet_swap_is_watched_and_reads_never_mix_generations() {
    let mut kubelet = Kubelet::new();
    publish(&mut kubelet, 1);
    let mut p = start(&dir_args(kubelet.path()), &[]).await;

    let (v, version) = p.resolve("password", None).await.unwrap();
    assert_eq!(v.expose(), value(1, "password"));
    assert_eq!(version, expected_version("password", &value(1, "password")));
    let d = p.describe("password").await.unwrap();
    assert_eq!(d.current_version.as_deref(), Some(version.as_str()));
    assert_eq!(d.labels["source"], "dir");
    assert_eq!(d.labels["key"], "password");
    let names: Vec<String> = p.list("").await.into_iter().map(|d| d.name).collect();
    let mut want: Vec<&str> = KEYS.to_vec();
    want.sort();
    assert_eq!(names, want);

    // The swap is reported within 2 s, with the new versions, and resolves see the new value.
    let id = p.watch("").await;
    let swapped = Instant::now();
    publish(&mut kubelet, 2);
    let mut seen = BTreeMap::new();
    while seen.len() < KEYS.len() {
        let ev = p
            .next_event(id, Duration::from_secs(2).saturating_sub(swapped.elapsed()))
            .await
            .unwrap_or_else(|| panic!("only {seen:?} reported within 2 s of the swap"));
        assert_eq!(ev.change, Change::Updated, "{ev:?}");
        assert_eq!(
            ev.version.as_deref(),
            Some(expected_version(&ev.name, &value(2, &ev.name)).as_str()),
            "{ev:?}"
        );
        seen.insert(ev.name.clone(), swapped.elapsed());
    }
    eprintln!("swap reported after {:?}", seen.values().max().unwrap());
    let (v, _) = p.resolve("password", None).await.unwrap();
    assert_eq!(v.expose(), value(2, "password"));
    // The old version is gone: only the current one can be pinned.
    let e = p.resolve("password", Some(&version)).await.unwrap_err();
    assert_error(&e, ErrorCode::VersionUnavailable, &["password"]);

    // Hammer: swap generations as fast as possible (deleting each old one, as the kubelet
    // does) while resolves and lists run concurrently.
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicU64::new(2));
    let writer = {
        let (stop, last) = (Arc::clone(&stop), Arc::clone(&last));
        std::thread::spawn(move || {
            let mut g = 2;
            while !stop.load(Ordering::Relaxed) {
                g += 1;
                publish(&mut kubelet, g);
                last.store(g, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
            kubelet
        })
    };
    let mut lists = Vec::new();
    let mut resolves = Vec::new();
    let hammer = Instant::now();
    while hammer.elapsed() < Duration::from_secs(3) {
        let round: Vec<_> = (0..8)
            .map(|i| {
                let p = &p;
                async move {
                    match i % 4 {
                        0 => Err(p.list("").await),
                        1 => Ok(("password", p.resolve("password", None).await)),
                        2 => Ok(("username", p.resolve("username", None).await)),
                        _ => Ok(("url", p.resolve("url", None).await)),
                    }
                }
            })
            .collect();
        for r in futures_util::future::join_all(round).await {
            match r {
                Err(list) => lists.push(list),
                Ok((key, Ok((v, version)))) => resolves.push((key, v, version)),
                Ok((key, Err(e))) => panic!("resolve of {key} during swaps: {e}"),
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let kubelet = writer.join().unwrap();
    let generations = last.load(Ordering::Relaxed);

    // Every resolve's value and version belong together.
    let mut resolved_generations = BTreeSet::new();
    for (key, v, version) in &resolves {
        let g = generation_of(v.expose(), key);
        assert_eq!(
            *version,
            expected_version(key, &value(g, key)),
            "{key}: version of another value"
        );
        resolved_generations.insert(g);
    }
    // Every list shows all keys, all from one generation.
    let mut by_version = HashMap::new();
    for g in 1..=generations {
        for key in KEYS {
            by_version.insert(expected_version(key, &value(g, key)), g);
        }
    }
    let mut listed_generations = BTreeSet::new();
    for list in &lists {
        assert_eq!(list.len(), KEYS.len(), "a list missed keys during a swap");
        let gens: BTreeSet<u64> = list
            .iter()
            .map(|d| {
                let v = d.current_version.as_deref().unwrap();
                *by_version
                    .get(v)
                    .unwrap_or_else(|| panic!("{}: unknown version {v}", d.name))
            })
            .collect();
        assert_eq!(gens.len(), 1, "one List mixed generations {gens:?}");
        listed_generations.extend(gens);
    }
    eprintln!(
        "{} swaps; {} lists saw {} generations, {} resolves saw {}",
        generations - 2,
        lists.len(),
        listed_generations.len(),
        resolves.len(),
        resolved_generations.len()
    );
    // The check had something to check: the reads really raced the swaps.
    assert!(generations > 100, "only {generations} generations written");
    assert!(listed_generations.len() > 10, "{listed_generations:?}");
    assert!(resolved_generations.len() > 10, "{resolved_generations:?}");
    drop(kubelet);
    let stderr = p.stop().await;
    let stderr = String::from_utf8_lossy(&stderr);
    assert!(!stderr.contains("gen-0"), "a value in stderr: {stderr}");
}

#[tokio::test]
async fn a_data_link_ahead_of_its_files_is_not_reported_until_they_exist() {
    let mut kubelet = Kubelet::new();
    publish(&mut kubelet, 1);
    let mut p = start(&dir_args(kubelet.path()), &[]).await;
    let id = p.watch("").await;

    // `..data` points at a generation whose directory does not exist yet.
    let next = kubelet.reserve();
    kubelet.swap_to(&next);
    assert!(
        p.next_event(id, Duration::from_millis(800)).await.is_none(),
        "a change reported while ..data pointed at nothing"
    );
    let e = p.resolve("password", None).await.unwrap_err();
    assert_error(&e, ErrorCode::Unavailable, &["..data", &next]);
    assert!(e.retryable);
    match p.call(Op::Health {}).await {
        Outcome::Ok(Reply::Health(h)) => {
            assert_eq!(h.status, HealthStatus::Unavailable, "{h:?}");
            assert!(h.detail.contains(&next), "{h:?}");
        }
        other => panic!("health answered {other:?}"),
    }

    // The directory appears, then its files one by one, quickly (as a careless writer would).
    let dir = kubelet.path().join(&next);
    std::fs::create_dir(&dir).unwrap();
    for (k, v) in files(2) {
        std::fs::write(dir.join(k), v).unwrap();
    }
    let started = Instant::now();
    let mut seen = BTreeSet::new();
    while seen.len() < KEYS.len() {
        let ev = p
            .next_event(id, Duration::from_secs(2))
            .await
            .unwrap_or_else(|| panic!("only {seen:?} reported"));
        assert_eq!(
            ev.change,
            Change::Updated,
            "half-written state reported: {ev:?}"
        );
        assert_eq!(
            ev.version.unwrap(),
            expected_version(&ev.name, &value(2, &ev.name))
        );
        seen.insert(ev.name);
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        p.next_event(id, Duration::from_millis(600)).await.is_none(),
        "more events than changes"
    );
    let (v, _) = p.resolve("token", None).await.unwrap();
    assert_eq!(v.expose(), value(2, "token"));

    // A key that disappears is reported revoked.
    kubelet.set_current(next);
    kubelet.publish(&[("password", b"only-this-one")]);
    let mut gone = BTreeSet::new();
    while gone.len() < KEYS.len() - 1 {
        let ev = p.next_event(id, Duration::from_secs(2)).await.unwrap();
        match ev.change {
            Change::Revoked => {
                assert_eq!(ev.version, None);
                gone.insert(ev.name);
            }
            Change::Updated => assert_eq!(ev.name, "password"),
        }
    }
    assert!(!gone.contains("password"));
    let e = p.resolve("token", None).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound, "{e}");
    p.stop().await;
}

#[tokio::test]
async fn a_missing_key_is_not_found_and_names_never_become_paths() {
    let mut kubelet = Kubelet::new();
    kubelet.publish(&[("password", b"pw")]);
    let flat = tempfile::tempdir().unwrap();
    std::fs::write(flat.path().join("present"), b"x").unwrap();
    std::fs::write(kubelet.path().join("stray"), b"outside ..data").unwrap();
    let mut args = dir_args(kubelet.path());
    args.extend([
        "--dir".into(),
        OsString::from(format!("flat/={}", flat.path().display())),
    ]);
    let p = start(&args, &[]).await;
    let outside = flat.path().join("present");
    for name in [
        "missing",
        "..data",
        "..data/password",
        "../password",
        "./password",
        "stray",
        "flat/missing",
        "flat/../present",
        "flat/",
        "present",
        outside.to_str().unwrap(),
        "..2026_11_22_06_00_00.000000001",
    ] {
        let e = p.resolve(name, None).await.unwrap_err();
        assert_error(&e, ErrorCode::NotFound, &[]);
        let e = p.describe(name).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound, "describe {name}: {e}");
    }
    assert_eq!(p.resolve("password", None).await.unwrap().0.expose(), b"pw");
    assert_eq!(
        p.resolve("flat/present", None).await.unwrap().0.expose(),
        b"x"
    );
    p.stop().await;
}

#[tokio::test]
async fn unreadable_keys_give_a_typed_error_naming_the_key() {
    // Kubelet layout: a key that is a directory.
    let mut kubelet = Kubelet::new();
    let generation = kubelet.publish(&[("good", b"fine")]);
    std::fs::create_dir(generation.join("nested")).unwrap();
    std::fs::write(generation.join("nested").join("inner"), b"x").unwrap();
    // Plain files: a dangling symlink, a FIFO (which must not hang the provider), a directory.
    let flat = tempfile::tempdir().unwrap();
    symlink(flat.path().join("nowhere"), flat.path().join("dangling")).unwrap();
    nix::unistd::mkfifo(&flat.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    std::fs::create_dir(flat.path().join("subdir")).unwrap();
    std::fs::write(flat.path().join("ok"), b"fine").unwrap();

    let mut args = dir_args(kubelet.path());
    args.extend([
        "--dir".into(),
        OsString::from(format!("f/={}", flat.path().display())),
    ]);
    let p = start(&args, &[]).await;
    let kdir = kubelet.path().display().to_string();
    let fdir = flat.path().display().to_string();
    for (name, key, dir, what) in [
        ("nested", "\"nested\"", &kdir, "is a directory"),
        ("f/subdir", "\"subdir\"", &fdir, "is a directory"),
        (
            "f/dangling",
            "\"dangling\"",
            &fdir,
            "symbolic link to a file that does not exist",
        ),
        ("f/fifo", "\"fifo\"", &fdir, "not a regular file"),
    ] {
        let e = p.resolve(name, None).await.unwrap_err();
        assert_error(&e, ErrorCode::Internal, &[key, dir, what]);
        let e = p.describe(name).await.unwrap_err();
        assert_error(&e, ErrorCode::Internal, &[key, what]);
    }
    // The rest is still served; List leaves the broken keys out; Health names them.
    let names: Vec<String> = p.list("").await.into_iter().map(|d| d.name).collect();
    assert_eq!(names, ["f/ok", "good"]);
    match p.call(Op::Health {}).await {
        Outcome::Ok(Reply::Health(h)) => {
            assert_eq!(h.status, HealthStatus::Degraded, "{h:?}");
            for key in ["nested", "subdir", "dangling", "fifo"] {
                assert!(h.detail.contains(key), "{key} not in {h:?}");
            }
        }
        other => panic!("health answered {other:?}"),
    }
    let stderr = p.stop().await;
    let stderr = String::from_utf8_lossy(&stderr);
    assert!(stderr.contains("dangling"), "{stderr}");
}

/// A file the provider's user may not read. Root reads anything, so as root the provider runs
/// as `nobody` through `setpriv`; otherwise mode 000 is enough.
#[tokio::test]
async fn a_key_the_provider_may_not_read_is_permission_denied() {
    let mut kubelet = Kubelet::new();
    let generation = kubelet.publish(&[("open", b"fine"), ("closed", b"no-access-canary")]);
    for (path, mode) in [
        (kubelet.path(), 0o755),
        (generation.as_path(), 0o755),
        (&generation.join("open"), 0o644),
        (&generation.join("closed"), 0o000),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let check = |e: keyhole_protocol::ProviderError| {
        assert_error(
            &e,
            ErrorCode::PermissionDenied,
            &["\"closed\"", "Permission denied (os error 13)"],
        );
        assert!(!e.message.contains("no-access-canary"), "{e}");
    };
    if !nix::unistd::Uid::effective().is_root() {
        let p = start(&dir_args(kubelet.path()), &[]).await;
        check(p.resolve("closed", None).await.unwrap_err());
        assert_eq!(p.resolve("open", None).await.unwrap().0.expose(), b"fine");
        p.stop().await;
        return;
    }
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("running as root without setpriv: cannot make a file unreadable to the provider");
    // `nobody` could not dial the test's private socket, so the provider runs as a sidecar
    // (`--listen`) in a directory `nobody` owns, and the test dials it.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = tmp.path().join("run");
    std::fs::create_dir(&home).unwrap();
    let token = keyhole_transport::generate_token().unwrap();
    let token_file = home.join("token");
    std::fs::write(&token_file, token.expose()).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    for path in [&home, &token_file] {
        std::os::unix::fs::chown(path, Some(65534), Some(65534)).unwrap();
    }
    let socket = home.join("sock").join("s");
    let _child = tokio::process::Command::new(setpriv)
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            common::BIN,
        ])
        .args(["--no-env", "--dir"])
        .arg(kubelet.path())
        .arg("--listen")
        .arg(&socket)
        .arg("--token-file")
        .arg(&token_file)
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (client, _events) =
        common::connect_listening(&socket, token, keyhole_protocol::Encoding::Bincode).await;
    match client
        .call(resolve_op("closed"), common::CALL)
        .await
        .unwrap()
    {
        Outcome::Err(e) => check(e),
        other => panic!("resolve of an unreadable key answered {other:?}"),
    }
    match client.call(resolve_op("open"), common::CALL).await.unwrap() {
        Outcome::Ok(Reply::Resolved { value, .. }) => assert_eq!(value.expose(), b"fine"),
        other => panic!("resolve answered {other:?}"),
    }
}

fn resolve_op(name: &str) -> Op {
    Op::Resolve {
        name: name.into(),
        version: None,
    }
}

#[tokio::test]
async fn plain_files_are_served_and_watched_under_a_name_prefix() {
    let flat = tempfile::tempdir().unwrap();
    std::fs::write(flat.path().join("password"), b"first").unwrap();
    std::fs::write(flat.path().join(".dockerconfigjson"), b"{}").unwrap();
    let spec = OsString::from(format!("app/={}", flat.path().display()));
    let mut p = start(&["--no-env".into(), "--dir".into(), spec], &[]).await;
    let names: Vec<String> = p.list("app/").await.into_iter().map(|d| d.name).collect();
    assert_eq!(names, ["app/.dockerconfigjson", "app/password"]);
    let (v, version) = p.resolve("app/password", None).await.unwrap();
    assert_eq!(v.expose(), b"first");
    assert_eq!(version, expected_version("app/password", b"first"));
    assert_eq!(
        p.resolve("app/password", Some(&version)).await.unwrap().1,
        version
    );

    let id = p.watch("app/pass").await;
    let changed = Instant::now();
    std::fs::write(flat.path().join("password"), b"second").unwrap();
    std::fs::write(flat.path().join("new"), b"unwatched prefix").unwrap();
    let ev = p.next_event(id, Duration::from_secs(2)).await.unwrap();
    eprintln!("plain-file change reported after {:?}", changed.elapsed());
    assert_eq!(ev.name, "app/password");
    assert_eq!(ev.change, Change::Updated);
    assert_eq!(
        ev.version.as_deref(),
        Some(expected_version("app/password", b"second").as_str())
    );
    let e = p.resolve("app/password", Some(&version)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::VersionUnavailable, "{e}");
    std::fs::remove_file(flat.path().join("password")).unwrap();
    let ev = p.next_event(id, Duration::from_secs(2)).await.unwrap();
    assert_eq!(
        (ev.name.as_str(), ev.change, ev.version),
        ("app/password", Change::Revoked, None)
    );
    p.stop().await;
}

#[tokio::test]
async fn the_environment_wins_a_name_clash_and_the_clash_is_logged() {
    let mut kubelet = Kubelet::new();
    kubelet.publish(&[("db", b"from-the-dir"), ("only-dir", b"d")]);
    let prefix = common::unique_prefix();
    let env = [(
        OsString::from(format!("{prefix}DB")),
        OsString::from("from-env"),
    )];
    let args: Vec<OsString> = vec![
        "--env-prefix".into(),
        prefix.clone().into(),
        "--dir".into(),
        kubelet.path().into(),
    ];
    let p = start(&args, &env).await;
    assert_eq!(p.resolve("db", None).await.unwrap().0.expose(), b"from-env");
    assert_eq!(p.resolve("only-dir", None).await.unwrap().0.expose(), b"d");
    let list = p.list("").await;
    let db = list.iter().find(|d| d.name == "db").unwrap();
    assert_eq!(db.labels["source"], "env");
    assert_eq!(db.labels["variable"], format!("{prefix}DB"));
    let stderr = p.stop().await;
    let stderr = String::from_utf8_lossy(&stderr);
    assert!(stderr.contains("is hidden by"), "{stderr}");
    assert!(!stderr.contains("from-the-dir") && !stderr.contains("from-env"));
}

#[test]
fn a_missing_directory_is_refused_at_start() {
    let out = std::process::Command::new(common::BIN)
        .args([
            "--no-env",
            "--dir",
            "/nonexistent/keyhole-test",
            "--connect",
            "/x",
        ])
        .env(keyhole_protocol::TOKEN_ENV, "t")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/keyhole-test") && stderr.contains("No such file"),
        "{stderr}"
    );
}

#[tokio::test]
async fn links_out_of_the_directory_are_not_followed() {
    // Outside the served directories: a file that must never be served through them.
    let outside = tempfile::tempdir().unwrap();
    let secret = b"kh-outside-the-volume-0c4e";
    std::fs::write(outside.path().join("shadow"), secret).unwrap();
    std::fs::create_dir(outside.path().join("gen")).unwrap();
    std::fs::write(outside.path().join("gen").join("password"), secret).unwrap();

    // Plain files: a link inside the directory is served, a link out of it is not.
    let flat = tempfile::tempdir().unwrap();
    std::fs::write(flat.path().join("real"), b"inside").unwrap();
    symlink(flat.path().join("real"), flat.path().join("alias")).unwrap();
    symlink(outside.path().join("shadow"), flat.path().join("escape")).unwrap();
    // Kubelet layout whose `..data` points out of the directory.
    let hijacked = tempfile::tempdir().unwrap();
    symlink(outside.path().join("gen"), hijacked.path().join("..data")).unwrap();
    symlink("..data/password", hijacked.path().join("password")).unwrap();
    // ... or at a sibling that is itself a link out.
    let relayed = tempfile::tempdir().unwrap();
    symlink(outside.path().join("gen"), relayed.path().join("..gen")).unwrap();
    symlink("..gen", relayed.path().join("..data")).unwrap();

    let p = start(
        &[
            "--no-env".into(),
            "--dir".into(),
            OsString::from(format!("f/={}", flat.path().display())),
            "--dir".into(),
            OsString::from(format!("k/={}", hijacked.path().display())),
            "--dir".into(),
            OsString::from(format!("s/={}", relayed.path().display())),
        ],
        &[],
    )
    .await;
    assert_eq!(
        p.resolve("f/alias", None).await.unwrap().0.expose(),
        b"inside"
    );
    let fdir = flat.path().display().to_string();
    let e = p.resolve("f/escape", None).await.unwrap_err();
    assert_error(
        &e,
        ErrorCode::PermissionDenied,
        &["\"escape\"", &fdir, "outside the directory"],
    );
    for name in ["k/password", "s/password"] {
        let e = p.resolve(name, None).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
        assert!(e.message.contains("..data points to"), "{e}");
    }
    let names: Vec<String> = p.list("").await.into_iter().map(|d| d.name).collect();
    assert_eq!(names, ["f/alias", "f/real"]);
    let stderr = p.stop().await;
    assert!(
        !String::from_utf8_lossy(&stderr).contains(std::str::from_utf8(secret).unwrap()),
        "the outside file's content reached the log"
    );
}

#[test]
fn a_directory_swapped_for_a_link_out_while_reading_never_serves_the_outside() {
    // A writer of the served directory swaps the generation directory for a link out of it, and
    // back, as fast as it can (an atomic exchange of two names). Each read resolves the key's
    // path once; a resolution that checks the path and then opens it would follow the link out
    // when the swap falls between the two.
    use keyhole_provider_env::dir::DirSource;
    use nix::fcntl::{RenameFlags, renameat2};

    let outside = tempfile::tempdir().unwrap();
    let secret = b"kh-outside-the-volume-5a1d";
    std::fs::write(outside.path().join("password"), secret).unwrap();
    let served = tempfile::tempdir().unwrap();
    let generation = served.path().join("..gen");
    std::fs::create_dir(&generation).unwrap();
    std::fs::write(generation.join("password"), b"inside").unwrap();
    symlink("..gen", served.path().join("..data")).unwrap();
    symlink("..data/password", served.path().join("password")).unwrap();
    let decoy = served.path().join("..decoy");
    symlink(outside.path(), &decoy).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let swapper = std::thread::spawn({
        let (stop, swaps, generation, decoy) = (
            Arc::clone(&stop),
            Arc::clone(&swaps),
            generation.clone(),
            decoy.clone(),
        );
        move || {
            while !stop.load(Ordering::Relaxed) {
                renameat2(
                    None,
                    &generation,
                    None,
                    &decoy,
                    RenameFlags::RENAME_EXCHANGE,
                )
                .unwrap();
                swaps.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let source = DirSource {
        path: served.path().to_path_buf(),
        name_prefix: String::new(),
    };
    let (mut inside, mut refused) = (0u64, 0u64);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        match source.read_key("password", 1024) {
            Ok(Some(v)) => {
                assert_ne!(
                    v.bytes.expose(),
                    secret,
                    "served the file outside the directory"
                );
                inside += 1;
            }
            Ok(None) | Err(_) => refused += 1,
        }
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(
        swaps.load(Ordering::Relaxed) > 1000,
        "the swap raced the reads"
    );
    assert!(
        inside > 0 && refused > 0,
        "{inside} served, {refused} refused"
    );
}
