//! The reference provider: every secret lives in this process's memory and dies with it.
//!
//! It supports every capability (store, rotate with kept versions, revoke, list, watch), so it is
//! the suite's known-good target and the example provider authors copy. Versions are decimal
//! counters per name, never reused, not even after a revoke.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use keyhole_providers::protocol::{
    Capabilities, Change, Description, ErrorCode, HealthReport, HealthStatus, ProviderError,
    ProviderInfo, SecretBytes, SecretState, VersionInfo,
};
use keyhole_providers::{Page, Provider, Resolved, StoreRequest, WatchChange, Watcher, page_token};
use tokio::sync::mpsc;

/// Settings of the memory provider.
#[derive(Clone, Debug, clap::Args)]
pub struct MemoryOptions {
    /// Versions kept per secret, the current one included (0 = unlimited).
    #[arg(long, default_value_t = 10)]
    pub versions_kept: u32,
    /// Largest value accepted, in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_value_size: u32,
}

impl Default for MemoryOptions {
    fn default() -> MemoryOptions {
        MemoryOptions {
            versions_kept: 10,
            max_value_size: 64 * 1024,
        }
    }
}

/// The memory provider.
pub struct MemoryProvider {
    options: MemoryOptions,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    secrets: BTreeMap<String, Secret>,
    watchers: Vec<Arc<Watcher>>,
}

struct Secret {
    /// Kept versions, oldest first; the last one is current unless revoked.
    versions: VecDeque<Version>,
    /// Versions written before a revoke: they answer `Revoked` forever.
    revoked_versions: BTreeSet<String>,
    revoked: bool,
    counter: u64,
    created_ms: u64,
    updated_ms: u64,
    labels: BTreeMap<String, String>,
}

struct Version {
    id: String,
    value: SecretBytes,
    created_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl MemoryProvider {
    /// An empty store.
    pub fn new(options: MemoryOptions) -> MemoryProvider {
        MemoryProvider {
            options,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the maps half-updated in a way that matters here.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Secret {
    fn new(now: u64, labels: BTreeMap<String, String>) -> Secret {
        Secret {
            versions: VecDeque::new(),
            revoked_versions: BTreeSet::new(),
            revoked: false,
            counter: 0,
            created_ms: now,
            updated_ms: now,
            labels,
        }
    }

    /// Appends a version, un-revokes, trims history; returns the new version.
    fn push(&mut self, value: SecretBytes, now: u64, kept: u32) -> String {
        self.counter += 1;
        let id = self.counter.to_string();
        self.versions.push_back(Version {
            id: id.clone(),
            value,
            created_ms: now,
        });
        self.revoked = false;
        self.updated_ms = now;
        while kept > 0 && self.versions.len() > kept as usize {
            self.versions.pop_front();
        }
        id
    }

    fn current(&self) -> Option<&Version> {
        if self.revoked {
            None
        } else {
            self.versions.back()
        }
    }

    fn describe(&self, name: &str) -> Description {
        Description {
            name: name.to_string(),
            state: if self.revoked {
                SecretState::Revoked
            } else {
                SecretState::Active
            },
            current_version: self.current().map(|v| v.id.clone()),
            versions: self
                .versions
                .iter()
                .map(|v| VersionInfo {
                    version: v.id.clone(),
                    created_at_ms: v.created_ms,
                })
                .collect(),
            created_at_ms: self.created_ms,
            updated_at_ms: self.updated_ms,
            labels: self.labels.clone(),
        }
    }
}

impl State {
    /// Queues the change for the watchers whose prefix it matches; forgets ended watches.
    fn notify(&mut self, name: &str, change: Change, version: Option<String>) {
        let change = [WatchChange {
            name: name.to_string(),
            change,
            version,
        }];
        self.watchers.retain(|w| {
            w.offer(&change);
            !w.is_gone()
        });
    }
}

impl Provider for MemoryProvider {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            name: "memory".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            store: true,
            rotate: true,
            revoke: true,
            list: true,
            watch: true,
            versions_kept: self.options.versions_kept,
            max_value_size: self.options.max_value_size,
        }
    }

    async fn resolve(&self, name: &str, version: Option<&str>) -> Result<Resolved, ProviderError> {
        let state = self.state();
        let secret = state
            .secrets
            .get(name)
            .ok_or_else(|| ProviderError::not_found(name))?;
        if secret.revoked {
            return Err(ProviderError::revoked(name));
        }
        let found = match version {
            None => secret.versions.back(),
            Some(v) => {
                if secret.revoked_versions.contains(v) {
                    return Err(ProviderError::new(
                        ErrorCode::Revoked,
                        format!("version {v:?} of {name:?} was revoked"),
                    ));
                }
                secret.versions.iter().find(|x| x.id == v)
            }
        };
        found
            .map(|v| Resolved {
                value: v.value.clone(),
                version: v.id.clone(),
            })
            .ok_or_else(|| {
                ProviderError::new(
                    ErrorCode::VersionUnavailable,
                    format!(
                        "version {:?} of {name:?} is not kept",
                        version.unwrap_or("")
                    ),
                )
            })
    }

    async fn store(&self, request: StoreRequest) -> Result<String, ProviderError> {
        let now = now_ms();
        let kept = self.options.versions_kept;
        let mut state = self.state();
        let StoreRequest {
            name,
            value,
            create_only,
            labels,
        } = request;
        let secret = match state.secrets.get_mut(&name) {
            Some(_) if create_only => {
                return Err(ProviderError::new(
                    ErrorCode::AlreadyExists,
                    format!("a secret named {name:?} already exists"),
                ));
            }
            Some(secret) => {
                secret.labels = labels;
                secret
            }
            None => state
                .secrets
                .entry(name.clone())
                .or_insert_with(|| Secret::new(now, labels)),
        };
        let version = secret.push(value, now, kept);
        state.notify(&name, Change::Updated, Some(version.clone()));
        Ok(version)
    }

    async fn rotate(
        &self,
        name: &str,
        value: SecretBytes,
        expected_version: Option<&str>,
    ) -> Result<String, ProviderError> {
        let now = now_ms();
        let kept = self.options.versions_kept;
        let mut state = self.state();
        let secret = state
            .secrets
            .get_mut(name)
            .ok_or_else(|| ProviderError::not_found(name))?;
        if let Some(expected) = expected_version {
            let current = secret.current().map(|v| v.id.as_str());
            if current != Some(expected) {
                return Err(ProviderError::new(
                    ErrorCode::Conflict,
                    format!(
                        "{name:?} is at version {}, not {expected:?}",
                        current.map_or("(revoked)".to_string(), |c| format!("{c:?}"))
                    ),
                ));
            }
        }
        let version = secret.push(value, now, kept);
        state.notify(name, Change::Updated, Some(version.clone()));
        Ok(version)
    }

    async fn revoke(&self, name: &str) -> Result<(), ProviderError> {
        let mut state = self.state();
        let secret = state
            .secrets
            .get_mut(name)
            .ok_or_else(|| ProviderError::not_found(name))?;
        if secret.revoked {
            return Ok(());
        }
        // Dropping the versions zeroizes their values.
        let dropped: Vec<String> = secret.versions.drain(..).map(|v| v.id).collect();
        secret.revoked_versions.extend(dropped);
        secret.revoked = true;
        secret.updated_ms = now_ms();
        state.notify(name, Change::Revoked, None);
        Ok(())
    }

    async fn describe(&self, name: &str) -> Result<Description, ProviderError> {
        let state = self.state();
        state
            .secrets
            .get(name)
            .map(|s| s.describe(name))
            .ok_or_else(|| ProviderError::not_found(name))
    }

    async fn list(
        &self,
        prefix: &str,
        page: Option<&str>,
        limit: u32,
    ) -> Result<Page, ProviderError> {
        let after = page.map(page_token::parse).transpose()?;
        let state = self.state();
        let mut matching = state
            .secrets
            .range(prefix.to_string()..)
            .take_while(|(name, _)| name.starts_with(prefix))
            .filter(|(name, _)| after.as_deref().is_none_or(|a| name.as_str() > a));
        let entries: Vec<Description> = matching
            .by_ref()
            .take(limit as usize)
            .map(|(name, s)| s.describe(name))
            .collect();
        let next_page = match (matching.next(), entries.last()) {
            (Some(_), Some(last)) => Some(page_token::after(&last.name)),
            _ => None,
        };
        Ok(Page { entries, next_page })
    }

    async fn health(&self) -> HealthReport {
        HealthReport {
            status: HealthStatus::Ok,
            detail: String::new(),
        }
    }

    async fn watch(&self, prefix: &str) -> Result<mpsc::Receiver<WatchChange>, ProviderError> {
        let (watcher, rx) = Watcher::start(prefix);
        self.state().watchers.push(watcher);
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_watcher_that_reads_late_still_gets_the_final_version() {
        let provider = MemoryProvider::new(MemoryOptions::default());
        let mut rx = provider.watch("db/").await.expect("watching");
        // Far more changes than any channel holds, none read meanwhile.
        let mut last = String::new();
        for i in 0..3_000 {
            last = provider
                .store(StoreRequest {
                    name: "db/password".into(),
                    value: SecretBytes::copy_from(format!("v{i}").as_bytes()),
                    create_only: false,
                    labels: BTreeMap::new(),
                })
                .await
                .expect("stored");
        }
        let mut seen = None;
        while let Ok(Some(change)) =
            tokio::time::timeout(std::time::Duration::from_millis(200), rx.recv()).await
        {
            seen = change.version;
        }
        assert_eq!(seen, Some(last), "the last change arrived");
    }
}
