//! Group commit for the audit log: requests hand their records to one writer thread, which
//! commits everything queued while the previous commit was syncing in a single transaction (one
//! fsync), then tells each request its records are durable. No answer is sent before that.

use std::sync::Arc;
use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::audit::{AuditEntry, AuditLog};

type Job = (Vec<AuditEntry>, oneshot::Sender<Result<(), String>>);

/// The audit log's writer.
#[derive(Clone)]
pub struct Journal {
    tx: mpsc::Sender<Job>,
}

/// Most records committed in one transaction.
const MAX_BATCH: usize = 4096;

impl Journal {
    /// Starts the writer thread for `audit`. It stops when every `Journal` clone is dropped.
    pub fn start(audit: Arc<AuditLog>) -> std::io::Result<Journal> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("keyhole-audit".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut jobs = vec![first];
                    let mut count = jobs[0].0.len();
                    while count < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(job) => {
                                count += job.0.len();
                                jobs.push(job);
                            }
                            Err(_) => break,
                        }
                    }
                    let entries: Vec<AuditEntry> =
                        jobs.iter().flat_map(|(e, _)| e.iter().cloned()).collect();
                    let result = audit
                        .append_batch(&entries)
                        .map(|_| ())
                        .map_err(|e| e.to_string());
                    for (_, done) in jobs {
                        let _ = done.send(result.clone());
                    }
                }
            })?;
        Ok(Journal { tx })
    }

    /// Appends `entries` and returns once they are durable.
    pub async fn append(&self, entries: Vec<AuditEntry>) -> Result<(), String> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send((entries, done))
            .map_err(|_| "the audit writer has stopped".to_string())?;
        wait.await
            .map_err(|_| "the audit writer has stopped".to_string())?
    }
}
