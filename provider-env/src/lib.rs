//! The env provider: a read-only keyhole provider for the Kubernetes sidecar. It serves
//!
//! - environment variables under a prefix (`KEYHOLE_SECRET_` by default), read once at start
//!   and mapped to names as [`mapping`] describes (`KEYHOLE_SECRET_DB_PASSWORD` is `db/password`);
//! - directories of files (`--dir [NAME_PREFIX=]PATH`, repeatable): a mounted Kubernetes Secret,
//!   whose `..data` symlink swaps the kubelet makes are read consistently ([`dir`]), or plain
//!   files.
//!
//! Sources are consulted in order, the environment first, then each directory as given; the
//! first that has a name serves it. Every version is a content hash ([`version_of`]), so only the
//! current version of a secret can be resolved. Watch polls the directories (see [`EnvOptions`]).
//! Store, Rotate and Revoke are not declared, so the SDK answers them `Unsupported`.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod dir;
pub mod mapping;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyhole_providers::protocol::{
    Capabilities, Change, Description, ErrorCode, HealthReport, HealthStatus, ProviderError,
    ProviderInfo, SecretBytes, SecretState, VersionInfo, validate_prefix,
};
use keyhole_providers::{Page, Provider, Resolved, WatchChange, Watcher, page_token};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::dir::{DirSource, ReadError};
use crate::mapping::EnvSecret;

/// The largest value served, in bytes: a Resolve answer of this size fits a 1 MiB frame in JSON
/// (PROTOCOL.md section 4.4). Larger files and variables are refused with `TooLarge`.
pub const MAX_VALUE_SIZE: u32 = 737_280;

/// The default interval of the watch's poll, in milliseconds.
pub const DEFAULT_POLL_MS: u64 = 200;

/// The version of `value` under `name`: the first 16 bytes of
/// `SHA-256("keyhole-provider-env v1" || 0x00 || name || 0x00 || value)`, in lower-case hex.
///
/// The same content under the same name always has the same version, across restarts and
/// replicas, so a pinned handle keeps working until the value changes.
pub fn version_of(name: &str, value: &[u8]) -> String {
    let mut hash = Sha256::new();
    hash.update(b"keyhole-provider-env v1\0");
    hash.update(name.as_bytes());
    hash.update([0]);
    hash.update(value);
    hex::encode(&hash.finalize()[..16])
}

/// A directory to serve, and the prefix its keys get as names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirSpec {
    /// Prepended to every key (may be empty).
    pub name_prefix: String,
    /// The directory.
    pub path: PathBuf,
}

/// Parses `[NAME_PREFIX=]PATH`, split at the first `=`.
pub fn parse_dir_spec(s: &str) -> Result<DirSpec, String> {
    let (name_prefix, path) = s.split_once('=').unwrap_or(("", s));
    if path.is_empty() {
        return Err("the directory path is empty".into());
    }
    validate_prefix(name_prefix)
        .map_err(|e| format!("the name prefix {name_prefix:?} is invalid: {e}"))?;
    Ok(DirSpec {
        name_prefix: name_prefix.to_string(),
        path: PathBuf::from(path),
    })
}

/// Settings of the env provider.
#[derive(Clone, Debug, clap::Args)]
pub struct EnvOptions {
    /// Serve the environment variables whose names start with PREFIX, read once at start.
    /// KEYHOLE_SECRET_DB_PASSWORD is the secret db/password: the prefix is removed, letters are
    /// lowercased, `__` becomes `_` and a lone `_` becomes `/`.
    #[arg(long, value_name = "PREFIX", default_value = mapping::DEFAULT_PREFIX)]
    pub env_prefix: String,
    /// Serve no environment variables, only directories.
    #[arg(long)]
    pub no_env: bool,
    /// Serve the files of a directory: a mounted Kubernetes Secret (the kubelet's `..data`
    /// layout, read atomically) or plain files. Key K is the secret NAME_PREFIX + K. Repeatable;
    /// on a name clash the environment wins, then the directory given first. A PATH containing
    /// `=` needs a NAME_PREFIX, even an empty one: `--dir =/odd=path`.
    #[arg(long = "dir", value_name = "[NAME_PREFIX=]PATH", value_parser = parse_dir_spec)]
    pub dirs: Vec<DirSpec>,
    /// How often a watch polls the directories, in milliseconds (10 to 500). A change is
    /// reported once two polls in a row agree on it.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_POLL_MS,
          value_parser = clap::value_parser!(u64).range(10..=500))]
    pub poll_interval_ms: u64,
}

impl Default for EnvOptions {
    fn default() -> EnvOptions {
        EnvOptions {
            env_prefix: mapping::DEFAULT_PREFIX.into(),
            no_env: false,
            dirs: Vec::new(),
            poll_interval_ms: DEFAULT_POLL_MS,
        }
    }
}

/// The env provider.
pub struct EnvProvider {
    inner: Arc<Inner>,
}

struct Inner {
    env: BTreeMap<String, EnvSecret>,
    dirs: Vec<DirSource>,
    poll: Duration,
    watchers: Mutex<Vec<Arc<Watcher>>>,
    /// Whether the poller runs. Held across the baseline scan, so no watch starts between a
    /// baseline and its poller.
    poller: tokio::sync::Mutex<bool>,
    /// Problems last logged, so each is logged once when it appears.
    problems: Mutex<BTreeSet<String>>,
}

/// Where a name is served from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    Env { variable: String },
    Dir { index: usize, key: String },
}

/// A name as served now: its version and where it comes from, never its value.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    version: String,
    mtime_ms: u64,
    source: Source,
}

/// Every name served now, with what is wrong.
#[derive(Default)]
struct View {
    entries: BTreeMap<String, Entry>,
    problems: BTreeSet<String>,
    /// Directories that could not be read at all.
    failed_dirs: usize,
}

/// Per directory, the entries of its last scan, standing in for what cannot be read now.
type LastGood = Vec<BTreeMap<String, Entry>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ProviderError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ProviderError::internal("a file-system read failed unexpectedly"))
}

impl EnvProvider {
    /// A provider serving `vars` (under the options' prefix) and the options' directories.
    /// Fails, with a one-line reason, on a bad option or a directory that is not there.
    pub fn new(
        options: EnvOptions,
        vars: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<EnvProvider, String> {
        let env = if options.no_env {
            BTreeMap::new()
        } else {
            if options.env_prefix.is_empty() {
                return Err(
                    "--env-prefix must not be empty: it would serve every environment \
                            variable (use --no-env to serve none)"
                        .into(),
                );
            }
            let (env, skipped) =
                mapping::snapshot(vars, &options.env_prefix, MAX_VALUE_SIZE as usize);
            for s in skipped {
                tracing::warn!(
                    "environment variable {:?} is not served: {}",
                    s.variable,
                    s.reason
                );
            }
            tracing::info!(
                "serving {} environment variables under {}",
                env.len(),
                options.env_prefix
            );
            env
        };
        let mut dirs = Vec::new();
        for spec in options.dirs {
            match std::fs::metadata(&spec.path) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(format!("--dir {}: not a directory", spec.path.display())),
                Err(e) => return Err(format!("--dir {}: {e}", spec.path.display())),
            }
            let layout = if std::fs::symlink_metadata(spec.path.join(dir::DATA_LINK)).is_ok() {
                "a kubelet Secret volume"
            } else {
                "plain files"
            };
            tracing::info!(
                "serving {} ({layout}) as names {:?} + key",
                spec.path.display(),
                spec.name_prefix
            );
            dirs.push(DirSource {
                path: spec.path,
                name_prefix: spec.name_prefix,
            });
        }
        if env.is_empty() && dirs.is_empty() {
            tracing::warn!("nothing to serve: no environment variables and no --dir");
        }
        let inner = Inner {
            env,
            dirs,
            poll: Duration::from_millis(options.poll_interval_ms),
            watchers: Mutex::new(Vec::new()),
            poller: tokio::sync::Mutex::new(false),
            problems: Mutex::new(BTreeSet::new()),
        };
        // Say at once what is wrong in the directories.
        let view = inner.view(None);
        inner.report(view.problems);
        Ok(EnvProvider {
            inner: Arc::new(inner),
        })
    }

    /// A provider serving this process's environment.
    pub fn from_process_env(options: EnvOptions) -> Result<EnvProvider, String> {
        EnvProvider::new(options, std::env::vars_os())
    }
}

impl Inner {
    /// Finds `name` in the sources, in order, reading its value.
    fn lookup(&self, name: &str) -> Result<(SecretBytes, Entry), ProviderError> {
        if let Some(e) = self.env.get(name) {
            return Ok((e.value.clone(), env_entry(e)));
        }
        for (index, dir) in self.dirs.iter().enumerate() {
            let Some(key) = dir.key_for(name) else {
                continue;
            };
            match dir.read_key(key, MAX_VALUE_SIZE as usize) {
                Ok(Some(v)) => {
                    let entry = Entry {
                        version: version_of(name, v.bytes.expose()),
                        mtime_ms: v.mtime_ms,
                        source: Source::Dir {
                            index,
                            key: key.to_string(),
                        },
                    };
                    return Ok((v.bytes, entry));
                }
                Ok(None) => {}
                Err(ReadError::Key(e)) => return Err(e.to_provider_error(name, &dir.path, key)),
                Err(ReadError::Dir(e)) => return Err(e.to_provider_error(&dir.path)),
            }
        }
        Err(ProviderError::not_found(name))
    }

    /// Every name served now. With `last_good`, a key or directory that cannot be read keeps
    /// its entries from the last scan (and `last_good` is updated); without, it is left out.
    fn view(&self, mut last_good: Option<&mut LastGood>) -> View {
        let mut view = View::default();
        // `None`: the name exists in a source but cannot be read; it hides later sources.
        let mut names: BTreeMap<String, Option<Entry>> = self
            .env
            .iter()
            .map(|(name, e)| (name.clone(), Some(env_entry(e))))
            .collect();
        if let Some(lg) = last_good.as_deref_mut() {
            lg.resize(self.dirs.len(), BTreeMap::new());
        }
        for (index, dir) in self.dirs.iter().enumerate() {
            let previous = last_good.as_deref().and_then(|lg| lg.get(index));
            let mut entries: BTreeMap<String, Option<Entry>> = BTreeMap::new();
            match dir.scan(MAX_VALUE_SIZE as usize) {
                Ok(scan) => {
                    view.problems.extend(scan.problems);
                    for (name, meta) in scan.keys {
                        let entry = match meta {
                            Ok(m) => Some(Entry {
                                version: m.version,
                                mtime_ms: m.mtime_ms,
                                source: Source::Dir { index, key: m.key },
                            }),
                            Err(why) => {
                                view.problems.insert(why);
                                previous.and_then(|p| p.get(&name)).cloned()
                            }
                        };
                        entries.insert(name, entry);
                    }
                }
                Err(e) => {
                    view.problems.insert(e.describe(&dir.path));
                    view.failed_dirs += 1;
                    if let Some(p) = previous {
                        entries.extend(p.iter().map(|(n, e)| (n.clone(), Some(e.clone()))));
                    }
                }
            }
            if let Some(lg) = last_good.as_deref_mut() {
                lg[index] = entries
                    .iter()
                    .filter_map(|(n, e)| Some((n.clone(), e.clone()?)))
                    .collect();
            }
            for (name, entry) in entries {
                if let Some(winner) = names.get(&name) {
                    view.problems.insert(format!(
                        "secret {name:?} in {} is hidden by {}",
                        dir.path.display(),
                        match winner.as_ref().map(|w| &w.source) {
                            Some(Source::Env { variable }) => format!("${variable}"),
                            _ => "an earlier --dir".into(),
                        }
                    ));
                } else {
                    names.insert(name, entry);
                }
            }
        }
        view.entries = names
            .into_iter()
            .filter_map(|(n, e)| Some((n, e?)))
            .collect();
        view
    }

    /// Logs each problem once, when it appears, and notes when one is gone.
    fn report(&self, problems: BTreeSet<String>) {
        let mut logged = lock(&self.problems);
        for p in problems.difference(&logged) {
            tracing::warn!("{p}");
        }
        for p in logged.difference(&problems) {
            tracing::info!("resolved: {p}");
        }
        *logged = problems;
    }

    fn description(&self, name: &str, entry: &Entry) -> Description {
        let labels = match &entry.source {
            Source::Env { variable } => BTreeMap::from([
                ("source".to_string(), "env".to_string()),
                ("variable".to_string(), variable.clone()),
            ]),
            Source::Dir { index, key } => BTreeMap::from([
                ("source".to_string(), "dir".to_string()),
                (
                    "dir".to_string(),
                    self.dirs
                        .get(*index)
                        .map(|d| d.path.display().to_string())
                        .unwrap_or_default(),
                ),
                ("key".to_string(), key.clone()),
            ]),
        };
        Description {
            name: name.to_string(),
            state: SecretState::Active,
            current_version: Some(entry.version.clone()),
            versions: vec![VersionInfo {
                version: entry.version.clone(),
                created_at_ms: entry.mtime_ms,
            }],
            created_at_ms: entry.mtime_ms,
            updated_at_ms: entry.mtime_ms,
            labels,
        }
    }

    /// Queues `changes` for the watchers whose prefix they match; forgets ended watches.
    fn notify(&self, changes: &[WatchChange]) {
        lock(&self.watchers).retain(|w| {
            w.offer(changes);
            !w.is_gone()
        });
    }
}

fn env_entry(e: &EnvSecret) -> Entry {
    Entry {
        version: e.version.clone(),
        mtime_ms: 0,
        source: Source::Env {
            variable: e.variable.clone(),
        },
    }
}

fn versions(view: &View) -> BTreeMap<String, String> {
    view.entries
        .iter()
        .map(|(n, e)| (n.clone(), e.version.clone()))
        .collect()
}

/// The changes from `before` to `after`.
fn diff(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<WatchChange> {
    let updated = after
        .iter()
        .filter(|(name, v)| before.get(*name) != Some(*v))
        .map(|(name, v)| WatchChange {
            name: name.clone(),
            change: Change::Updated,
            version: Some(v.clone()),
        });
    let gone = before
        .keys()
        .filter(|name| !after.contains_key(*name))
        .map(|name| WatchChange {
            name: name.clone(),
            change: Change::Revoked,
            version: None,
        });
    updated.chain(gone).collect()
}

/// Scans the sources off the runtime's thread, carrying the last good entries along.
async fn scan(
    inner: &Arc<Inner>,
    last_good: LastGood,
) -> Result<(BTreeMap<String, String>, LastGood), ProviderError> {
    let inner = Arc::clone(inner);
    blocking(move || {
        let mut last_good = last_good;
        let view = inner.view(Some(&mut last_good));
        let versions = versions(&view);
        inner.report(view.problems);
        (versions, last_good)
    })
    .await
}

/// The watch's poller: scans every `poll`, and reports a change once two scans in a row agree
/// on it (so a generation still being written is never reported). Ends when no watcher is left.
async fn poll(inner: Arc<Inner>, mut reported: BTreeMap<String, String>, mut last_good: LastGood) {
    let mut pending: Option<BTreeMap<String, String>> = None;
    let mut tick = tokio::time::interval(inner.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        inner.notify(&[]);
        if lock(&inner.watchers).is_empty() {
            let mut running = inner.poller.lock().await;
            if lock(&inner.watchers).is_empty() {
                *running = false;
                return;
            }
        }
        let now = match scan(&inner, std::mem::take(&mut last_good)).await {
            Ok((now, lg)) => {
                last_good = lg;
                now
            }
            Err(e) => {
                tracing::warn!("watch: {e}");
                continue;
            }
        };
        if now == reported {
            pending = None;
        } else if pending.as_ref() == Some(&now) {
            inner.notify(&diff(&reported, &now));
            reported = now;
            pending = None;
        } else {
            pending = Some(now);
        }
    }
}

impl Provider for EnvProvider {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            name: "env".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            store: false,
            rotate: false,
            revoke: false,
            list: true,
            watch: true,
            versions_kept: 1,
            max_value_size: MAX_VALUE_SIZE,
        }
    }

    async fn resolve(&self, name: &str, version: Option<&str>) -> Result<Resolved, ProviderError> {
        let (value, entry) = match self.inner.env.get(name) {
            // The common case needs no file system.
            Some(e) => (e.value.clone(), env_entry(e)),
            None if self.inner.dirs.is_empty() => return Err(ProviderError::not_found(name)),
            None => {
                let inner = Arc::clone(&self.inner);
                let owned = name.to_string();
                blocking(move || inner.lookup(&owned)).await??
            }
        };
        if let Some(wanted) = version
            && wanted != entry.version
        {
            return Err(ProviderError::new(
                ErrorCode::VersionUnavailable,
                format!(
                    "version {wanted:?} of {name:?} is not the current one, and this provider \
                     keeps no history (the current version is {:?})",
                    entry.version
                ),
            ));
        }
        Ok(Resolved {
            value,
            version: entry.version,
        })
    }

    async fn describe(&self, name: &str) -> Result<Description, ProviderError> {
        let inner = Arc::clone(&self.inner);
        let owned = name.to_string();
        let (_value, entry) = blocking(move || inner.lookup(&owned)).await??;
        Ok(self.inner.description(name, &entry))
    }

    async fn list(
        &self,
        prefix: &str,
        page: Option<&str>,
        limit: u32,
    ) -> Result<Page, ProviderError> {
        let after = page.map(page_token::parse).transpose()?;
        let inner = Arc::clone(&self.inner);
        let view = blocking(move || {
            let view = inner.view(None);
            inner.report(view.problems.clone());
            view
        })
        .await?;
        let mut matching = view
            .entries
            .range(prefix.to_string()..)
            .take_while(|(name, _)| name.starts_with(prefix))
            .filter(|(name, _)| after.as_deref().is_none_or(|a| name.as_str() > a));
        let entries: Vec<Description> = matching
            .by_ref()
            .take(limit as usize)
            .map(|(name, e)| self.inner.description(name, e))
            .collect();
        let next_page = match (matching.next(), entries.last()) {
            (Some(_), Some(last)) => Some(page_token::after(&last.name)),
            _ => None,
        };
        Ok(Page { entries, next_page })
    }

    async fn health(&self) -> HealthReport {
        let inner = Arc::clone(&self.inner);
        let view = match blocking(move || {
            let view = inner.view(None);
            inner.report(view.problems.clone());
            view
        })
        .await
        {
            Ok(view) => view,
            Err(e) => {
                return HealthReport {
                    status: HealthStatus::Unavailable,
                    detail: e.message,
                };
            }
        };
        let dirs = self.inner.dirs.len();
        let status = if view.problems.is_empty() {
            HealthStatus::Ok
        } else if dirs > 0 && view.failed_dirs == dirs && self.inner.env.is_empty() {
            HealthStatus::Unavailable
        } else {
            HealthStatus::Degraded
        };
        const SHOWN: usize = 5;
        let mut detail: Vec<String> = view.problems.iter().take(SHOWN).cloned().collect();
        if view.problems.len() > SHOWN {
            detail.push(format!("and {} more", view.problems.len() - SHOWN));
        }
        HealthReport {
            status,
            detail: detail.join("; "),
        }
    }

    async fn watch(&self, prefix: &str) -> Result<mpsc::Receiver<WatchChange>, ProviderError> {
        let (watcher, rx) = Watcher::start(prefix);
        let mut running = self.inner.poller.lock().await;
        if !*running {
            // The baseline is taken before the watch is answered: a change made after the
            // `watching` reply is always reported.
            let (baseline, last_good) = scan(&self.inner, Vec::new()).await?;
            tokio::spawn(poll(Arc::clone(&self.inner), baseline, last_good));
            *running = true;
        }
        lock(&self.inner.watchers).push(watcher);
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_content_hashes_bound_to_the_name() {
        let v = version_of("db/password", b"hunter2");
        assert_eq!(v.len(), 32);
        assert!(
            v.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(v, version_of("db/password", b"hunter2"));
        assert_ne!(v, version_of("db/password", b"hunter3"));
        assert_ne!(v, version_of("db/passwor", b"dhunter2"));
        assert_ne!(v, version_of("other", b"hunter2"));
    }

    #[test]
    fn dir_specs() {
        assert_eq!(
            parse_dir_spec("/etc/secrets").unwrap_or_else(|e| panic!("{e}")),
            DirSpec {
                name_prefix: String::new(),
                path: "/etc/secrets".into()
            }
        );
        assert_eq!(
            parse_dir_spec("db/=/etc/db").unwrap_or_else(|e| panic!("{e}")),
            DirSpec {
                name_prefix: "db/".into(),
                path: "/etc/db".into()
            }
        );
        assert_eq!(
            parse_dir_spec("=/odd=path").unwrap_or_else(|e| panic!("{e}")),
            DirSpec {
                name_prefix: String::new(),
                path: "/odd=path".into()
            }
        );
        assert!(parse_dir_spec("db/=").is_err());
        assert!(parse_dir_spec("a\u{1}=/x").is_err());
    }

    #[test]
    fn diff_reports_updates_and_removals() {
        let m = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let changes = diff(
            &m(&[("a", "1"), ("b", "1"), ("c", "1")]),
            &m(&[("a", "1"), ("b", "2"), ("d", "1")]),
        );
        let got: Vec<(&str, Change, Option<&str>)> = changes
            .iter()
            .map(|c| (c.name.as_str(), c.change, c.version.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("b", Change::Updated, Some("2")),
                ("d", Change::Updated, Some("1")),
                ("c", Change::Revoked, None),
            ]
        );
    }
}
