//! One watch's queue between a provider's changes and the connection, for providers that
//! implement [`Provider::watch`](crate::Provider::watch). It holds at most one change per name,
//! the latest, so a watcher that falls behind skips intermediate versions but never misses a
//! name's final state (PROTOCOL.md 7.11), and the provider never blocks on a slow connection. A
//! task hands the queue to the SDK's channel as fast as the connection takes it. A bounded
//! channel fed with `try_send` would have to drop a change when full, and a watcher could then
//! go on believing an old version was current.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, mpsc};

use crate::WatchChange;

/// The queue, even if a thread panicked holding it: each update is one replace or push.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Changes handed to the SDK ahead of the connection; the rest wait, merged, in the queue.
const CHANNEL: usize = 64;

/// A watch on the names under a prefix.
pub struct Watcher {
    prefix: String,
    /// Changes not yet handed over, oldest first, one per name.
    pending: Mutex<VecDeque<WatchChange>>,
    wake: Notify,
    /// Set when the SDK's receiver is gone (the watch was cancelled or its connection ended).
    gone: AtomicBool,
}

impl Watcher {
    /// A watcher for the names under `prefix`, and the receiver the SDK reads its changes from.
    /// Spawns the task that feeds the receiver, so it must run inside a tokio runtime.
    pub fn start(prefix: &str) -> (Arc<Watcher>, mpsc::Receiver<WatchChange>) {
        let (tx, rx) = mpsc::channel(CHANNEL);
        let watcher = Arc::new(Watcher {
            prefix: prefix.to_string(),
            pending: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            gone: AtomicBool::new(false),
        });
        tokio::spawn(feed(Arc::clone(&watcher), tx));
        (watcher, rx)
    }

    /// Queues the changes under this watcher's prefix. A name already queued takes the newer
    /// change in its place, so the queue never holds more entries than there are names.
    pub fn offer(&self, changes: &[WatchChange]) {
        let mut queued = false;
        {
            let mut pending = lock(&self.pending);
            for change in changes.iter().filter(|c| c.name.starts_with(&self.prefix)) {
                match pending.iter_mut().find(|q| q.name == change.name) {
                    Some(older) => *older = change.clone(),
                    None => pending.push_back(change.clone()),
                }
                queued = true;
            }
        }
        if queued {
            // Stores a permit if the feeder is not waiting yet: no wake-up is lost.
            self.wake.notify_one();
        }
    }

    /// Whether the watch has ended, so the watcher can be forgotten.
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }
}

/// Hands queued changes to `tx` in order until its receiver is dropped.
async fn feed(watcher: Arc<Watcher>, tx: mpsc::Sender<WatchChange>) {
    loop {
        let next = lock(&watcher.pending).pop_front();
        match next {
            Some(change) => {
                if tx.send(change).await.is_err() {
                    break;
                }
            }
            None => tokio::select! {
                () = watcher.wake.notified() => {}
                () = tx.closed() => break,
            },
        }
    }
    watcher.gone.store(true, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyhole_protocol::Change;

    fn updated(name: &str, version: usize) -> WatchChange {
        WatchChange {
            name: name.to_string(),
            change: Change::Updated,
            version: Some(version.to_string()),
        }
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_still_gets_every_names_last_change() {
        let (watcher, mut rx) = Watcher::start("db/");
        // Far more changes than the channel holds, to eight names, none read meanwhile.
        let names: Vec<String> = (0..8).map(|i| format!("db/{i}")).collect();
        for version in 0..2_000 {
            let name = &names[version % names.len()];
            watcher.offer(&[updated(name, version), updated("other/x", version)]);
            tokio::task::yield_now().await;
        }
        watcher.offer(&[WatchChange {
            name: "db/0".into(),
            change: Change::Revoked,
            version: None,
        }]);
        let mut last = std::collections::BTreeMap::new();
        let mut received = 0;
        while let Ok(Some(change)) =
            tokio::time::timeout(std::time::Duration::from_millis(200), rx.recv()).await
        {
            received += 1;
            last.insert(change.name.clone(), change);
        }
        assert!(!last.contains_key("other/x"), "outside the prefix");
        assert_eq!(last.len(), names.len(), "every name arrived");
        assert_eq!(last["db/0"].change, Change::Revoked);
        for (i, name) in names.iter().enumerate().skip(1) {
            let final_version = (0..2_000).rev().find(|v| v % names.len() == i);
            assert_eq!(
                last[name].version,
                final_version.map(|v| v.to_string()),
                "{name}"
            );
        }
        assert!(
            received <= CHANNEL + 2 * names.len(),
            "queued changes merge by name: {received} arrived"
        );
    }

    #[tokio::test]
    async fn the_watcher_is_gone_once_its_receiver_is() {
        let (watcher, rx) = Watcher::start("");
        assert!(!watcher.is_gone());
        drop(rx);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while !watcher.is_gone() {
            assert!(tokio::time::Instant::now() < deadline, "never noticed");
            tokio::task::yield_now().await;
        }
    }
}
