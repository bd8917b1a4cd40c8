//! What every case gets: the main connection, the declared capabilities, a per-run name prefix,
//! fresh canary values, and helpers that turn answers into pass, fail or skip.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use keyhole_protocol::{
    Capabilities, Encoding, ErrorCode, Op, Outcome, ProviderError, Reply, SecretBytes,
};
use keyhole_transport::client::{CallError, PendingCall};

use crate::Options;
use crate::target::{Conn, Target};

/// Why a case did not pass.
#[derive(Debug)]
pub(crate) enum Miss {
    Fail(String),
    Skip(String),
}

pub(crate) type Verdict = Result<(), Miss>;

/// Fails the case with a formatted message unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::ctx::Miss::Fail(format!($($fmt)+)));
        }
    };
}
pub(crate) use ensure;

pub(crate) fn fail<T>(msg: impl Into<String>) -> Result<T, Miss> {
    Err(Miss::Fail(msg.into()))
}

pub(crate) struct Ctx<'a> {
    pub target: &'a Target,
    pub options: &'a Options,
    pub encoding: Encoding,
    pub conn: Conn,
    pub caps: Capabilities,
    pub prefix: String,
    /// Set when the provider stopped answering; every later case fails at once with it.
    pub broken: Mutex<Option<String>>,
    pub case: Mutex<&'static str>,
    /// Every name this run created, for clean-up.
    pub created: Mutex<BTreeSet<String>>,
    /// Every value this run sent, to search for in errors, metadata and stderr.
    pub values: Mutex<Vec<SecretBytes>>,
    /// Every error answer seen, with the case it came from.
    pub errors: Mutex<Vec<(&'static str, ProviderError)>>,
    matcher: Mutex<Option<(usize, Arc<aho_corasick::AhoCorasick>)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // A failure here would make names collide between runs, not break secrecy.
    let _ = getrandom::fill(&mut buf);
    hex::encode(buf)
}

impl<'a> Ctx<'a> {
    pub fn new(
        target: &'a Target,
        options: &'a Options,
        encoding: Encoding,
        conn: Conn,
    ) -> Ctx<'a> {
        let caps = conn.client.ack().capabilities.clone();
        Ctx {
            target,
            options,
            encoding,
            conn,
            caps,
            prefix: format!("kh-conformance-{}/", random_hex(6)),
            broken: Mutex::new(None),
            case: Mutex::new(""),
            created: Mutex::new(BTreeSet::new()),
            values: Mutex::new(options.fixtures.iter().map(|(_, v)| v.clone()).collect()),
            errors: Mutex::new(Vec::new()),
            matcher: Mutex::new(None),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.options.request_timeout
    }

    pub fn broken(&self) -> Option<String> {
        lock(&self.broken).clone()
    }

    pub fn set_case(&self, name: &'static str) {
        *lock(&self.case) = name;
    }

    /// A fresh name under this run's prefix.
    pub fn name(&self, label: &str) -> String {
        let name = format!("{}{label}-{}", self.prefix, random_hex(3));
        lock(&self.created).insert(name.clone());
        name
    }

    /// A fresh canary value: distinctive, random, and remembered so it can be searched for.
    pub fn secret(&self, label: &str) -> SecretBytes {
        let v = SecretBytes::new(format!("kh-canary-{}-{label}", random_hex(12)).into_bytes());
        self.remember(&v);
        v
    }

    pub fn remember(&self, v: &SecretBytes) {
        lock(&self.values).push(v.clone());
    }

    /// The forms a value could leak in: raw, standard base64, and hex in both cases.
    pub fn leak_forms(&self) -> Vec<Vec<u8>> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut forms = Vec::new();
        for v in lock(&self.values).iter() {
            let raw = v.expose();
            if raw.len() < 12 {
                continue; // too short to search for without false alarms
            }
            forms.push(raw.to_vec());
            let enc = b64.encode(raw);
            forms.push(enc.trim_end_matches('=').as_bytes().to_vec());
            forms.push(b64url.encode(raw).into_bytes());
            forms.push(hex::encode(raw).into_bytes());
            forms.push(hex::encode_upper(raw).into_bytes());
        }
        forms
    }

    /// A matcher for every form of every value sent so far, rebuilt only when a value was added.
    pub fn leak_matcher(&self) -> Option<Arc<aho_corasick::AhoCorasick>> {
        let count = lock(&self.values).len();
        let mut cache = lock(&self.matcher);
        if let Some((n, m)) = &*cache
            && *n == count
        {
            return Some(Arc::clone(m));
        }
        let m = Arc::new(aho_corasick::AhoCorasick::new(self.leak_forms()).ok()?);
        *cache = Some((count, Arc::clone(&m)));
        Some(m)
    }

    /// Whether `haystack` contains any form of any value sent in this run.
    pub fn leaks(&self, haystack: &[u8]) -> bool {
        self.leak_matcher().is_some_and(|m| m.is_match(haystack))
    }

    /// Sends `op` on the main connection. A transport failure trips the breaker.
    pub async fn call(&self, op: Op) -> Result<Outcome, Miss> {
        let result = self.conn.client.call(op, self.timeout()).await;
        self.record(result)
    }

    /// Sends `op` without waiting for its answer. A send failure trips the breaker like any
    /// other transport failure.
    pub async fn start(&self, op: Op) -> Result<PendingCall, Miss> {
        match self.conn.client.start_call(op, self.timeout()).await {
            Ok(call) => Ok(call),
            Err(e) => Err(self
                .record(Err(e))
                .err()
                .unwrap_or_else(|| Miss::Fail("send failed".into()))),
        }
    }

    /// Waits for a call sent with [`Ctx::start`], recording its answer.
    pub async fn finish(&self, call: PendingCall) -> Result<Outcome, Miss> {
        self.record(self.conn.client.finish(call).await)
    }

    pub fn record(&self, result: Result<Outcome, CallError>) -> Result<Outcome, Miss> {
        match result {
            Ok(outcome) => {
                if let Outcome::Err(e) = &outcome {
                    let case = *lock(&self.case);
                    lock(&self.errors).push((case, e.clone()));
                }
                Ok(outcome)
            }
            Err(e) => {
                let case = *lock(&self.case);
                let why = match &e {
                    CallError::Timeout(d) => format!(
                        "the provider stopped answering: no answer within {d:?} in case {case}"
                    ),
                    other => format!("the connection failed in case {case}: {other}"),
                };
                let mut broken = lock(&self.broken);
                if broken.is_none() {
                    *broken = Some(why.clone());
                }
                Err(Miss::Fail(why))
            }
        }
    }

    /// Expects success.
    pub async fn ok(&self, op: Op, what: &str) -> Result<Reply, Miss> {
        match self.call(op).await? {
            Outcome::Ok(reply) => Ok(reply),
            Outcome::Err(e) => fail(format!("{what}: expected success, got {e}")),
        }
    }

    /// Expects the error `code`.
    pub async fn err(&self, op: Op, code: ErrorCode, what: &str) -> Result<ProviderError, Miss> {
        match self.call(op).await? {
            Outcome::Err(e) if e.code == code => Ok(e),
            Outcome::Err(e) => fail(format!("{what}: expected {code}, got {e}")),
            Outcome::Ok(reply) => fail(format!("{what}: expected {code}, got success {reply:?}")),
        }
    }

    /// Expects one of `codes`.
    pub async fn err_any(
        &self,
        op: Op,
        codes: &[ErrorCode],
        what: &str,
    ) -> Result<ProviderError, Miss> {
        match self.call(op).await? {
            Outcome::Err(e) if codes.contains(&e.code) => Ok(e),
            Outcome::Err(e) => fail(format!("{what}: expected one of {codes:?}, got {e}")),
            Outcome::Ok(reply) => fail(format!(
                "{what}: expected one of {codes:?}, got success {reply:?}"
            )),
        }
    }

    /// Skips unless `declared`.
    pub fn need(&self, declared: bool, capability: &str) -> Verdict {
        if declared {
            Ok(())
        } else {
            Err(Miss::Skip(format!(
                "the provider does not declare {capability}"
            )))
        }
    }

    pub async fn store(&self, name: &str, value: &SecretBytes) -> Result<String, Miss> {
        self.store_with(name, value, false, BTreeMap::new()).await
    }

    pub async fn store_with(
        &self,
        name: &str,
        value: &SecretBytes,
        create_only: bool,
        labels: BTreeMap<String, String>,
    ) -> Result<String, Miss> {
        let op = Op::Store {
            name: name.into(),
            value: value.clone(),
            create_only,
            labels,
        };
        match self.ok(op, &format!("store {name:?}")).await? {
            Reply::Stored { version } => Ok(version),
            other => fail(format!("store {name:?}: expected Stored, got {other:?}")),
        }
    }

    pub async fn rotate(
        &self,
        name: &str,
        value: &SecretBytes,
        expected: Option<&str>,
    ) -> Result<String, Miss> {
        let op = Op::Rotate {
            name: name.into(),
            value: value.clone(),
            expected_version: expected.map(Into::into),
        };
        match self.ok(op, &format!("rotate {name:?}")).await? {
            Reply::Rotated { version } => Ok(version),
            other => fail(format!("rotate {name:?}: expected Rotated, got {other:?}")),
        }
    }

    pub async fn revoke(&self, name: &str) -> Verdict {
        match self
            .ok(
                Op::Revoke { name: name.into() },
                &format!("revoke {name:?}"),
            )
            .await?
        {
            Reply::Revoked {} => Ok(()),
            other => fail(format!("revoke {name:?}: expected Revoked, got {other:?}")),
        }
    }

    pub async fn resolve(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<(SecretBytes, String), Miss> {
        let op = Op::Resolve {
            name: name.into(),
            version: version.map(Into::into),
        };
        let what = match version {
            Some(v) => format!("resolve {name:?} pinned to {v:?}"),
            None => format!("resolve {name:?}"),
        };
        match self.ok(op, &what).await? {
            Reply::Resolved { value, version } => Ok((value, version)),
            other => fail(format!("{what}: expected Resolved, got {other:?}")),
        }
    }

    /// Resolves and checks the value is exactly `expected`.
    pub async fn resolve_is(
        &self,
        name: &str,
        version: Option<&str>,
        expected: &SecretBytes,
    ) -> Result<String, Miss> {
        let (value, got_version) = self.resolve(name, version).await?;
        ensure!(
            value == *expected,
            "resolve {name:?} (version {version:?}) returned a different value ({} bytes, expected {} bytes)",
            value.len(),
            expected.len()
        );
        Ok(got_version)
    }

    pub fn resolve_op(&self, name: &str, version: Option<&str>) -> Op {
        Op::Resolve {
            name: name.into(),
            version: version.map(Into::into),
        }
    }
}
