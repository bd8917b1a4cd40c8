//! Group commit for the audit log. No answer is sent before its records are durable, and only one
//! commit runs at a time.
//!
//! Each request takes a [`Ticket`] when it starts, so the journal knows how many are in flight. A
//! request counts from its start, through its provider call, until its records are durable: while
//! one waits on a slow provider, the others have company and queue.
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
    /// Who may commit now. Whenever the queue is not empty, someone is: nobody waits on an idle
    /// log.
    owner: Owner,
    queue: Vec<Job>,
    stopped: bool,
}

/// Who holds the log: at most one commit runs at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// Nobody; the queue is empty.
    Idle,
    /// A request committing its own records. The writer leaves the queue alone until the
    /// request hands it over.
    Inline,
    /// The writer thread, which commits the queue until it is empty.
    Writer,
}

/// One request in flight, from its start until its `append` returns (or it is dropped).
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
    ///
    /// Call it from a task running on the runtime (as the gateway does): on a multi-thread
    /// runtime a lone request commits on its worker with `block_in_place`, which tokio refuses
    /// from a thread that has only entered that runtime's context inside another runtime.
    pub async fn append(self, entries: Vec<AuditEntry>) -> Result<(), String> {
        if entries.is_empty() {
            return Ok(());
        }
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
        if alone && state.owner == Owner::Idle {
            state.owner = Owner::Inline;
            return Ok(Entered::Committer(entries));
        }
        let (done, wait) = oneshot::channel();
        state.queue.push((entries, done));
        if state.owner == Owner::Idle {
            state.owner = Owner::Writer;
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
/// requests queued behind the commit, it is the writer's.
struct Committing<'a>(&'a Shared);

impl Drop for Committing<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        if state.queue.is_empty() {
            state.owner = Owner::Idle;
        } else {
            state.owner = Owner::Writer;
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

    /// The writer thread: commits the queue whenever the log is handed to it, in batches, until
    /// the journal stops and nothing is queued.
    fn write(&self) {
        let _gone = WriterGone(self);
        loop {
            let (entries, answers) = {
                let mut state = self.lock();
                while state.owner != Owner::Writer || state.queue.is_empty() {
                    // After the stop nothing more is queued; records queued behind a request's
                    // own commit are handed over when it ends, so wait for those.
                    if state.stopped && state.queue.is_empty() {
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
                    .enumerate()
                    .take_while(|(i, (entries, _))| {
                        count += entries.len();
                        *i == 0 || count <= MAX_BATCH
                    })
                    .count();
                let (entries, answers): (Vec<Vec<AuditEntry>>, Vec<_>) =
                    state.queue.drain(..take).unzip();
                (entries.into_iter().flatten().collect::<Vec<_>>(), answers)
            };
            let result = self.commit(&entries);
            self.grouped.fetch_add(1, Ordering::Relaxed);
            {
                // Idle again before anyone hears back, so a request that follows finds it so.
                let mut state = self.lock();
                if state.queue.is_empty() {
                    state.owner = Owner::Idle;
                }
            }
            for done in answers {
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
                owner: Owner::Idle,
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

    /// Counts a request as in flight until its `append` returns or the ticket is dropped. Take it
    /// when the request starts, before the work whose records it will append.
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
    async fn a_refused_record_fails_its_request_on_either_path() {
        let (audit, journal) = started();
        let mut bad = entry(0);
        bad.time_ms = u64::MAX; // past i64::MAX: the log refuses the whole batch
        let alone = journal.ticket().append(vec![bad.clone()]).await;
        assert!(alone.expect_err("refused").contains("time"));
        assert_eq!(journal.commit_counts(), counts(1, 0), "committed in place");
        let company = journal.ticket();
        let queued = journal.ticket().append(vec![bad]).await;
        assert!(queued.expect_err("refused").contains("time"));
        assert_eq!(journal.commit_counts(), counts(1, 1), "the writer's answer");
        drop(company);
        journal
            .ticket()
            .append(vec![entry(1)])
            .await
            .expect("the next one commits");
        assert_eq!(audit.tail(10).expect("tail").len(), 1);
    }

    /// Holds the log as a lone request does during its own commit, then queues one record
    /// behind it.
    fn held_with_one_queued(journal: &Journal) -> (Vec<AuditEntry>, Queued) {
        let (lone, behind) = (journal.ticket(), journal.ticket());
        let Ok(Entered::Committer(mine)) = lone.enter(vec![entry(0)], true) else {
            panic!("an idle log is the lone request's to commit");
        };
        let Ok(Entered::Queued(wait)) = behind.enter(vec![entry(1)], false) else {
            panic!("a record behind a commit queues");
        };
        (mine, wait)
    }

    type Queued = oneshot::Receiver<Result<(), String>>;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_leaves_the_queue_until_a_lone_commit_hands_it_over() {
        let (audit, journal) = started();
        let (mine, wait) = held_with_one_queued(&journal);
        // A spurious wake-up (a Condvar allows them) finds the queue full but not the writer's.
        journal.shared.work.notify_all();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            audit.tail(10).expect("tail").is_empty(),
            "the writer committed while the log was the lone request's"
        );
        journal.shared.commit(&mine).expect("committed");
        drop(Committing(&journal.shared)); // the lone commit ends and hands the queue over
        wait.await
            .expect("answered")
            .expect("committed by the writer");
        let handles: Vec<_> = audit
            .tail(10)
            .expect("tail")
            .into_iter()
            .map(|r| r.entry.handle)
            .collect();
        assert_eq!(handles, [Some("kh_0000".into()), Some("kh_0001".into())]);
        assert_eq!(journal.commit_counts().grouped, 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_writer_that_is_gone_fails_what_it_held_and_refuses_the_rest() {
        let (audit, journal) = started();
        let (_mine, wait) = held_with_one_queued(&journal);
        // What the writer thread leaves behind when it ends, by a panic too.
        drop(WriterGone(&journal.shared));
        assert!(
            wait.await.is_err(),
            "the queued request hears that the writer is gone"
        );
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            journal.ticket().append(vec![entry(2)]),
        )
        .await
        .expect("refused at once, not left waiting");
        assert_eq!(answer, Err(STOPPED.to_string()));
        assert!(audit.tail(10).expect("tail").is_empty());
    }

    #[test]
    fn dropping_the_journal_stops_the_writer_after_the_queue() {
        let (audit, journal) = started();
        let shared = Arc::clone(&journal.shared);
        let (_mine, wait) = held_with_one_queued(&journal);
        drop(journal); // the stop comes while a record waits behind a lone commit
        drop(Committing(&shared)); // that commit ends (here without its record) and hands over
        wait.blocking_recv()
            .expect("answered")
            .expect("the queued record was committed before the writer stopped");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while Arc::strong_count(&shared) > 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer thread outlived its journal"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(audit.tail(10).expect("tail").len(), 1);
    }
}
