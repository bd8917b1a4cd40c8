//! The keychain as a keyhole provider: every keychain call runs on a thread of its own under the
//! backend deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keyhole_providers::protocol::{
    Capabilities, Description, ErrorCode, HealthReport, HealthStatus, ProviderError, ProviderInfo,
    SecretBytes,
};
use keyhole_providers::{Page, Provider, Resolved, StoreRequest, page_token};

use crate::backend::Keychain;
use crate::ops;

/// The most keychain calls that run at once, counting those stuck past their deadline. Each has
/// a thread, and against a daemon that never answers none of them ends: without a bound, every
/// retry would leave one more thread behind.
pub const MAX_RUNNING_CALLS: usize = 32;

/// The provider.
pub struct KeychainProvider {
    kc: Arc<Keychain>,
    /// Keychain calls whose thread has not finished, stuck ones included.
    running: Arc<AtomicUsize>,
    keep: u32,
    timeout: Duration,
    max_value_size: u32,
    /// Writes of this process queue here, in order, without holding a thread while they wait;
    /// the lock file then orders them against other processes.
    writes: tokio::sync::Mutex<()>,
}

impl KeychainProvider {
    /// Serves `kc`, keeping `keep` versions, each keychain call bounded by `timeout`.
    pub fn new(kc: Keychain, keep: u32, timeout: Duration) -> KeychainProvider {
        let max_value_size = kc.max_value_size();
        KeychainProvider {
            kc: Arc::new(kc),
            running: Arc::new(AtomicUsize::new(0)),
            keep,
            timeout,
            max_value_size,
            writes: tokio::sync::Mutex::new(()),
        }
    }

    /// Runs `f` on a thread of its own; past the backend deadline a read answers `Unavailable`,
    /// a write `DeadlineExceeded`. `f` gets a deadline for the write lock, a little before the
    /// caller gives up.
    ///
    /// A detached thread rather than tokio's blocking pool: when the gateway goes away the SDK
    /// drops its runtime, and a runtime waits for its blocking tasks, so one call stuck in the
    /// keychain (a daemon that never answers, a prompt nobody sees) would keep the process
    /// alive. A detached thread dies with the process.
    async fn call<T: Send + 'static>(
        &self,
        what: &'static str,
        effect: Effect,
        f: impl FnOnce(&Keychain, Instant) -> Result<T, ProviderError> + Send + 'static,
    ) -> Result<T, ProviderError> {
        let slot = Slot::take(&self.running).ok_or_else(|| {
            ProviderError::new(
                ErrorCode::Unavailable,
                format!(
                    "{} keychain calls are running, the most this provider allows (a call stuck \
                     past its deadline keeps its place): {} is overloaded, or hangs or waits on \
                     a prompt; retry, or restart its daemon",
                    MAX_RUNNING_CALLS,
                    self.kc.kind().describe()
                ),
            )
        })?;
        let kc = Arc::clone(&self.kc);
        let margin = (self.timeout / 10).min(Duration::from_millis(100));
        let lock_deadline = Instant::now() + (self.timeout - margin);
        let (tx, rx) = tokio::sync::oneshot::channel();
        // If the request is cancelled or times out, the call still runs to its end; a write
        // then finishes under the lock file, which keeps later writes out until it does.
        std::thread::Builder::new()
            .name("keychain".into())
            .spawn(move || {
                let _ = tx.send(f(&kc, lock_deadline));
                drop(slot);
            })
            .map_err(|e| {
                ProviderError::new(
                    ErrorCode::Unavailable,
                    format!("cannot start a thread for the keychain call: {e}"),
                )
            })?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ProviderError::internal(format!(
                "the keychain call for {what} failed unexpectedly"
            ))),
            Err(_) => {
                self.kc.reset();
                // A write still runs on its thread and may yet commit: its effect is
                // undetermined, which the protocol spells DeadlineExceeded, not Unavailable.
                let (code, effect) = if effect == Effect::Write {
                    (
                        ErrorCode::DeadlineExceeded,
                        " (the write may still complete: Describe before retrying)",
                    )
                } else {
                    (ErrorCode::Unavailable, "")
                };
                Err(ProviderError::new(
                    code,
                    format!(
                        "{} did not answer {what} within {} ms{effect}: its daemon may hang or \
                         wait on a prompt; check Health, restart the keyring daemon, or raise \
                         --backend-timeout-ms",
                        self.kc.kind().describe(),
                        self.timeout.as_millis()
                    ),
                ))
            }
        }
    }
}

/// One of [`MAX_RUNNING_CALLS`], given back when dropped (by the call's thread, when it ends).
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(running: &Arc<AtomicUsize>) -> Option<Slot> {
        running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_RUNNING_CALLS).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(Arc::clone(running)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether a keychain call can change the keychain: a write cut off by its deadline may still
/// commit, so its answer must say the effect is undetermined.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Effect {
    Read,
    Write,
}

impl Provider for KeychainProvider {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            name: "keychain".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            store: true,
            rotate: true,
            revoke: true,
            list: true,
            watch: false,
            versions_kept: self.keep,
            max_value_size: self.max_value_size,
        }
    }

    async fn resolve(&self, name: &str, version: Option<&str>) -> Result<Resolved, ProviderError> {
        let (name, version) = (name.to_string(), version.map(str::to_string));
        self.call("resolve", Effect::Read, move |kc, _| {
            ops::resolve(kc, &name, version.as_deref())
        })
        .await
    }

    async fn store(&self, request: StoreRequest) -> Result<String, ProviderError> {
        // Pending stores are indexed together by the first that needs the index.
        let _pending = self.kc.index().register(&request.name);
        let _queue = self.writes.lock().await;
        let keep = self.keep;
        self.call("store", Effect::Write, move |kc, deadline| {
            ops::store(kc, keep, deadline, request)
        })
        .await
    }

    async fn rotate(
        &self,
        name: &str,
        value: SecretBytes,
        expected_version: Option<&str>,
    ) -> Result<String, ProviderError> {
        let _queue = self.writes.lock().await;
        let (name, expected) = (name.to_string(), expected_version.map(str::to_string));
        let keep = self.keep;
        self.call("rotate", Effect::Write, move |kc, deadline| {
            ops::rotate(kc, keep, deadline, &name, &value, expected.as_deref())
        })
        .await
    }

    async fn revoke(&self, name: &str) -> Result<(), ProviderError> {
        let _queue = self.writes.lock().await;
        let name = name.to_string();
        self.call("revoke", Effect::Write, move |kc, deadline| {
            ops::revoke(kc, deadline, &name)
        })
        .await
    }

    async fn describe(&self, name: &str) -> Result<Description, ProviderError> {
        let name = name.to_string();
        self.call("describe", Effect::Read, move |kc, _| {
            ops::describe(kc, &name)
        })
        .await
    }

    async fn list(
        &self,
        prefix: &str,
        page: Option<&str>,
        limit: u32,
    ) -> Result<Page, ProviderError> {
        let after = page.map(page_token::parse).transpose()?;
        let prefix = prefix.to_string();
        let names = self
            .call("list", Effect::Read, move |kc, _| {
                ops::list_names(kc, &prefix, after.as_deref())
            })
            .await?;
        let mut entries = Vec::new();
        let mut last = None;
        let mut names = names.into_iter();
        for name in names.by_ref() {
            let n = name.clone();
            // One call per pointer, each under the deadline: a long page is many short calls.
            match self
                .call("list", Effect::Read, move |kc, _| {
                    ops::describe_listed(kc, &n)
                })
                .await
            {
                Ok(Some(d)) => entries.push(d),
                Ok(None) => {}
                // One damaged entry must not hide every other name: leave it out, say so in
                // the log (Describe or Resolve of it still answers the error).
                Err(e) if e.code == ErrorCode::Internal => {
                    tracing::warn!(name = %name, "left out of List: {}", e.message);
                }
                Err(e) => return Err(e),
            }
            last = Some(name);
            if entries.len() >= limit as usize {
                break;
            }
        }
        let next_page = match (names.next(), last) {
            (Some(_), Some(last)) => Some(page_token::after(&last)),
            _ => None,
        };
        Ok(Page { entries, next_page })
    }

    async fn health(&self) -> HealthReport {
        match self
            .call("health", Effect::Read, |kc, _| Ok(kc.health()))
            .await
        {
            Ok(report) => report,
            Err(e) => HealthReport {
                status: if e.code == ErrorCode::Locked {
                    HealthStatus::Locked
                } else {
                    HealthStatus::Unavailable
                },
                detail: e.message,
            },
        }
    }
}
