//! Group commit for the audit log. No answer is sent before its records are durable, and only one
//! commit runs at a time.
//!
//! Each request takes a [`Ticket`] when it starts, so the journal knows how many are in flight.
//!
//! - **A lone request** (the only one in flight, with no commit under way) commits its records
//!   itself, on its own runtime worker (`block_in_place`, so the worker's other tasks move to
//!   another thread). It costs no hand-off to a writer thread and back: two wake-ups that cost
//!   30 µs each on these VMs, and as much as the commit itself when the host is busy.
//! - **Concurrent requests** queue their records. The writer thread commits everything queued in
//!   one transaction (one fsync), then tells each request; it goes on while the queue refills.
//!   A request with company does not commit alone, because the records of the others, due
//!   within microseconds, would then wait for a second fsync instead of sharing the first.
//!
//! On a current-thread runtime, where a worker cannot be lent, every request queues.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::oneshot;

use crate::audit::{AuditEntry, AuditLog};

type Job = (Vec<AuditEntry>, oneshot::Sender<Result<(), String>>);

/// Most records committed in one transaction.
const MAX_BATCH: usize = 4096;

const STOPPED: &str = "the audit writer has stopped";

/// The audit log's writer. Clones share it.
#[derive(Clone)]
pub struct Journal {
    shared: Arc<Shared>,
    /// Stops the writer thread when the last clone is dropped.
    _stop: Arc<StopOnDrop>,
}

/// How the records committed so far were committed, for tests and diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommitCounts {
    /// Transactions committed by the request itself, on an idle log.
    pub inline: u64,
    /// Transactions committed by the writer thread, for one or more queued requests.
    pub grouped: u64,
}

struct Shared {
    audit: Arc<AuditLog>,
    state: Mutex<State>,
    /// Wakes the writer thread when the queue has work for it, or when the journal stops.
    work: Condvar,
    /// Requests holding a [`Ticket`].
    in_flight: AtomicUsize,
    inline: AtomicU64,
    grouped: AtomicU64,
}

struct State {
    /// A commit is under way, or the writer thread has been told to take the queue. Whenever the
    /// queue is not empty, this is true: someone will commit it.
    busy: bool,
    queue: Vec<Job>,
    stopped: bool,
}

/// One request in flight, from its start until it appends its records (or is dropped).
pub struct Ticket {
    shared: Arc<Shared>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Ticket {
    /// Appends `entries` and returns once they are durable.
    pub async fn append(self, entries: Vec<AuditEntry>) -> Result<(), String> {
        let alone = Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread)
            && self.shared.in_flight.load(Ordering::Relaxed) == 1;
        match self.enter(entries, alone)? {
            Entered::Committer(entries) => {
                let _done = Committing(&self.shared);
                let result = tokio::task::block_in_place(|| self.shared.commit(&entries));
                self.shared.inline.fetch_add(1, Ordering::Relaxed);
                result
            }
            Entered::Queued(wait) => wait.await.map_err(|_| STOPPED.to_string())?,
        }
    }

    /// Makes the caller the committer if it is `alone` (the only request in flight, on a worker
    /// it may block) and no commit is under way, or queues its records for the writer.
    fn enter(&self, entries: Vec<AuditEntry>, alone: bool) -> Result<Entered, String> {
        let mut state = self.shared.lock();
        if state.stopped {
            return Err(STOPPED.into());
        }
        if alone && !state.busy {
            state.busy = true;
            return Ok(Entered::Committer(entries));
        }
        let (done, wait) = oneshot::channel();
        state.queue.push((entries, done));
        if !state.busy {
            state.busy = true;
            self.shared.work.notify_one();
        }
        Ok(Entered::Queued(wait))
    }
}

/// What [`Ticket::enter`] made of a request.
enum Entered {
    /// The log was idle: the request commits these itself.
    Committer(Vec<AuditEntry>),
    /// The records are queued; the writer answers here.
    Queued(oneshot::Receiver<Result<(), String>>),
}

/// Ends a request's own commit, even one cut short by a panic: the log is idle again, or, if
/// requests queued behind the commit, the writer takes them (still busy).
struct Committing<'a>(&'a Shared);

impl Drop for Committing<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        if state.queue.is_empty() {
            state.busy = false;
        } else {
            self.0.work.notify_one();
        }
    }
}

/// Stops the journal when the writer thread ends, even by a panic: the requests it held or had
/// queued hear that it stopped (their answer channels close), and later ones are refused at once
/// instead of waiting for a writer that is gone.
struct WriterGone<'a>(&'a Shared);

impl Drop for WriterGone<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.stopped = true;
        state.queue.clear();
    }
}

struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.lock().stopped = true;
        self.0.work.notify_all();
    }
}

impl Shared {
    /// The state, even if a thread panicked holding it: every update to it is a single
    /// assignment or push, so it is never left half-changed.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn commit(&self, entries: &[AuditEntry]) -> Result<(), String> {
        self.audit
            .append_batch(entries)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The writer thread: commits what is queued, in batches, until the journal stops and the
    /// queue is empty.
    fn write(&self) {
        let _gone = WriterGone(self);
        loop {
            let jobs: Vec<Job> = {
                let mut state = self.lock();
                while state.queue.is_empty() {
                    if state.stopped {
                        return;
                    }
                    state = self
                        .work
                        .wait(state)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                let mut count = 0;
                let take = state
                    .queue
                    .iter()
                    .take_while(|(entries, _)| {
                        let first = count == 0;
                        count += entries.len();
                        first || count <= MAX_BATCH
                    })
                    .count();
                state.queue.drain(..take).collect()
            };
            let entries: Vec<AuditEntry> =
                jobs.iter().flat_map(|(e, _)| e.iter().cloned()).collect();
            let result = self.commit(&entries);
            self.grouped.fetch_add(1, Ordering::Relaxed);
            {
                // Idle again before anyone hears back, so a request that follows finds it so.
                let mut state = self.lock();
                if state.queue.is_empty() {
                    state.busy = false;
                }
            }
            for (_, done) in jobs {
                let _ = done.send(result.clone());
            }
        }
    }
}

impl Journal {
    /// Starts the writer thread for `audit`. It stops when every `Journal` clone is dropped,
    /// after committing what is queued.
    pub fn start(audit: Arc<AuditLog>) -> std::io::Result<Journal> {
        let shared = Arc::new(Shared {
            audit,
            state: Mutex::new(State {
                busy: false,
                queue: Vec::new(),
                stopped: false,
            }),
            work: Condvar::new(),
            in_flight: AtomicUsize::new(0),
            inline: AtomicU64::new(0),
            grouped: AtomicU64::new(0),
        });
        let writer = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("keyhole-audit".into())
            .spawn(move || writer.write())?;
        Ok(Journal {
            _stop: Arc::new(StopOnDrop(Arc::clone(&shared))),
            shared,
        })
    }

    /// Counts a request as in flight until the ticket is used or dropped. Take it when the
    /// request starts, before the work whose records it will append.
    pub fn ticket(&self) -> Ticket {
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        Ticket {
            shared: Arc::clone(&self.shared),
        }
    }

    /// How the records so far were committed.
    pub fn commit_counts(&self) -> CommitCounts {
        CommitCounts {
            inline: self.shared.inline.load(Ordering::Relaxed),
            grouped: self.shared.grouped.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: usize) -> AuditEntry {
        AuditEntry {
            who: "uid:1000".into(),
            purpose: Some("test".into()),
            operation: "resolve".into(),
            handle: Some(format!("kh_{i:04}")),
            scope: None,
            outcome: "ok".into(),
            time_ms: 1_700_000_000_000,
        }
    }

    /// An in-memory log and a journal writing it.
    fn started() -> (Arc<AuditLog>, Journal) {
        let audit = Arc::new(AuditLog::open_in_memory().expect("an in-memory log opens"));
        let journal = Journal::start(Arc::clone(&audit)).expect("the writer starts");
        (audit, journal)
    }

    fn counts(inline: u64, grouped: u64) -> CommitCounts {
        CommitCounts { inline, grouped }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_log_is_committed_by_the_request_itself() {
        let (audit, journal) = started();
        for i in 0..3 {
            journal
                .ticket()
                .append(vec![entry(i)])
                .await
                .expect("appended");
            // Durable, and so readable, as soon as the append returns.
            assert_eq!(audit.tail(10).expect("tail").len(), i + 1);
        }
        assert_eq!(journal.commit_counts(), counts(3, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_with_company_queues_even_on_an_idle_log() {
        let (audit, journal) = started();
        let other = journal.ticket();
        journal
            .ticket()
            .append(vec![entry(0)])
            .await
            .expect("appended");
        other.append(vec![entry(1)]).await.expect("appended");
        assert_eq!(audit.tail(10).expect("tail").len(), 2);
        assert_eq!(
            journal.commit_counts(),
            counts(1, 1),
            "the first had company and queued; the second was alone"
        );
        drop(journal.ticket()); // a ticket dropped unused leaves the count as it was
        journal
            .ticket()
            .append(vec![entry(2)])
            .await
            .expect("appended");
        assert_eq!(journal.commit_counts().inline, 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_current_thread_runtime_queues_for_the_writer() {
        let (audit, journal) = started();
        journal
            .ticket()
            .append(vec![entry(0), entry(1)])
            .await
            .expect("appended");
        assert_eq!(audit.tail(10).expect("tail").len(), 2);
        assert_eq!(journal.commit_counts(), counts(0, 1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_share_commits_and_lose_nothing() {
        let (audit, journal) = started();
        let mut tasks = tokio::task::JoinSet::new();
        // Every round, all 32 hold their tickets before any appends, and one more ticket is held
        // throughout: nobody is ever alone, so every record goes through the writer.
        let _company = journal.ticket();
        let round = Arc::new(tokio::sync::Barrier::new(32));
        for t in 0..32 {
            let (journal, round) = (journal.clone(), Arc::clone(&round));
            tasks.spawn(async move {
                for i in 0..50 {
                    let ticket = journal.ticket();
                    round.wait().await;
                    ticket
                        .append(vec![entry(t * 100 + i)])
                        .await
                        .expect("appended");
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("a task finished");
        }
        let records = audit.tail(2000).expect("tail");
        assert_eq!(records.len(), 32 * 50);
        let mut handles: Vec<_> = records.iter().map(|r| r.entry.handle.clone()).collect();
        handles.sort();
        handles.dedup();
        assert_eq!(handles.len(), 32 * 50, "every record once");
        assert_eq!(
            audit.verify().expect("verify"),
            crate::audit::VerifyReport::Intact { records: 32 * 50 }
        );
        let made = journal.commit_counts();
        assert_eq!(made.inline, 0, "{made:?}: nobody was alone");
        assert!(
            made.grouped < 32 * 50,
            "{made:?}: queued requests shared commits"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_batch_fails_every_request_in_it() {
        let (audit, journal) = started();
        let mut bad = entry(0);
        bad.time_ms = u64::MAX; // past i64::MAX: the log refuses the whole batch
        let err = journal
            .ticket()
            .append(vec![bad])
            .await
            .expect_err("refused");
        assert!(err.contains("time"), "{err}");
        journal
            .ticket()
            .append(vec![entry(1)])
            .await
            .expect("the next one commits");
        assert_eq!(audit.tail(10).expect("tail").len(), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_writer_that_is_gone_refuses_records_at_once() {
        let (audit, journal) = started();
        // What the writer thread leaves behind when it ends, by a panic too.
        drop(WriterGone(&journal.shared));
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            journal.ticket().append(vec![entry(0)]),
        )
        .await
        .expect("refused at once, not left waiting");
        assert_eq!(answer, Err(STOPPED.to_string()));
        assert!(audit.tail(10).expect("tail").is_empty());
    }

    #[test]
    fn dropping_the_last_clone_stops_the_writer_after_the_queue() {
        let (audit, journal) = started();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let weak = Arc::downgrade(&journal.shared);
        runtime
            .block_on(journal.ticket().append(vec![entry(0)]))
            .expect("appended");
        drop(journal);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while weak.strong_count() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer thread outlived its journal"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(audit.tail(10).expect("tail").len(), 1);
    }
}
