//! The gateway service: every client request goes through policy, then the provider, then the
//! state store, and is recorded in the audit log, durably, before the answer is sent.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use interprocess::local_socket::traits::tokio::Listener as _;
use keyhole_protocol::{
    DEFAULT_MAX_FRAME, Description, Encoding, ErrorCode, HANDSHAKE_MAJOR, HANDSHAKE_MAX_FRAME, Op,
    Outcome, Reply, SecretState, Token, VersionInfo, decode,
};
use keyhole_transport::{BoxRead, BoxWrite, FrameReader, FrameWriter, socket};

use crate::api::*;
use crate::audit::{AuditEntry, AuditLog, VerifyReport};
use crate::journal::Journal;
use crate::manager::{Manager, ManagerError};
use crate::policy::{Caller, Decision, Operation, Policy, Request};
use crate::redact::Redactor;
use crate::state::{Handle, HandleState, NewHandle, StateStore, VersionPin, is_handle_id};

/// Everything a request needs.
pub struct Gateway {
    /// The providers.
    pub manager: Manager,
    /// Handles.
    pub state: Arc<StateStore>,
    /// The audit chain, for reading and verifying.
    pub audit: Arc<AuditLog>,
    /// The audit chain's writer (group commit).
    pub journal: Journal,
    /// Who may do what.
    pub policy: Policy,
    /// Every value seen, for redaction.
    pub redactor: Redactor,
    /// The provider used when a put names none.
    pub default_provider: String,
    /// Deadline of each provider call.
    pub call_timeout: Duration,
    /// How long an answer may wait for its client to read it ([`CLIENT_WRITE_TIMEOUT`] unless a
    /// test shortens it).
    pub client_write_timeout: Duration,
    /// The gateway's own uid: callers with it are the owner.
    pub owner_uid: u32,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn err(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError::new(code, message)
}

fn view(h: &Handle) -> HandleView {
    HandleView {
        handle: h.id.clone(),
        provider: h.provider.clone(),
        name: h.name.clone(),
        version_pin: match &h.version_pin {
            VersionPin::Current => None,
            VersionPin::Fixed(v) => Some(v.clone()),
        },
        scope: h.scope.clone(),
        labels: h.labels.clone(),
        state: match h.state {
            HandleState::Active => "active".into(),
            HandleState::Revoked => "revoked".into(),
        },
        created_at_ms: h.created_at_ms,
        updated_at_ms: h.updated_at_ms,
        secret: None,
    }
}

/// What one request did, for its audit record.
struct Trail {
    handle: Option<String>,
    scope: Option<String>,
}

impl Gateway {
    /// Serves one request from `caller`. The audit record is durable before this returns.
    pub async fn handle(
        self: &Arc<Self>,
        caller: &Caller,
        op: ApiOp,
    ) -> Result<ApiReply, ApiError> {
        let operation = op.name();
        let purpose = match &op {
            ApiOp::Resolve { purpose, .. } => Some(purpose.clone()),
            _ => None,
        };
        let ticket = self.journal.ticket();
        let mut trails = Vec::new();
        let result = self.dispatch(caller, op, &mut trails).await;
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) if e.code == ErrorCode::PermissionDenied => "denied".to_string(),
            Err(e) => e.code.name().to_string(),
        };
        if trails.is_empty() {
            trails.push(Trail {
                handle: None,
                scope: None,
            });
        }
        let entries: Vec<AuditEntry> = trails
            .into_iter()
            .map(|t| AuditEntry {
                who: format!("uid:{}", caller.uid),
                purpose: purpose.clone(),
                operation: operation.to_string(),
                handle: t.handle,
                scope: t.scope,
                outcome: outcome.clone(),
                time_ms: now_ms(),
            })
            .collect();
        // Durable before the answer; concurrent requests share one fsync (group commit).
        match ticket.append(entries).await {
            Ok(()) => result,
            // No record, no answer: a request the log cannot record is refused.
            Err(e) => Err(err(
                ErrorCode::Internal,
                format!("the audit log refused the record: {e}"),
            )),
        }
    }

    fn decide(
        &self,
        caller: &Caller,
        operation: Operation,
        scope: &str,
        labels: &BTreeMap<String, String>,
        purpose: Option<&str>,
    ) -> Result<(), ApiError> {
        let req = Request {
            caller,
            operation,
            scope,
            labels,
            purpose,
        };
        match self.policy.decide(&req) {
            Decision::Allow => Ok(()),
            Decision::Deny(reason) => Err(err(
                ErrorCode::PermissionDenied,
                format!(
                    "policy denies {} to uid {}: {reason}",
                    operation.name(),
                    caller.uid
                ),
            )),
        }
    }

    /// Decides `operation` for `caller` in the scope of every handle that already names `name`
    /// in `provider`: a request that changes or opens what they resolve to needs rights over each.
    async fn decide_on_existing(
        &self,
        caller: &Caller,
        provider: &str,
        name: &str,
        operation: Operation,
        purpose: Option<&str>,
    ) -> Result<(), ApiError> {
        let (p, n) = (provider.to_string(), name.to_string());
        for existing in self.blocking(move |s| s.find(&p, &n)).await? {
            self.decide(
                caller,
                operation,
                &existing.scope,
                &existing.labels,
                purpose,
            )?;
        }
        Ok(())
    }

    async fn call(&self, provider: &str, op: Op) -> Result<Reply, ApiError> {
        match self.manager.call(provider, op, self.call_timeout).await {
            Ok(Outcome::Ok(reply)) => Ok(reply),
            Ok(Outcome::Err(e)) => Err(err(
                e.code,
                format!(
                    "provider {provider:?}: {}",
                    self.redactor.redact_str(&e.message)
                ),
            )),
            Err(ManagerError::UnknownProvider(p)) => Err(err(
                ErrorCode::InvalidRequest,
                format!("no provider named {p:?} is configured; `keyhole providers` lists them"),
            )),
            Err(e) => Err(err(
                ErrorCode::Unavailable,
                format!("{e}; check `keyhole providers` and the gateway's log"),
            )),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&StateStore) -> Result<T, crate::state::StateError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let state = Arc::clone(&self.state);
        tokio::task::spawn_blocking(move || f(&state))
            .await
            .map_err(|e| err(ErrorCode::Internal, format!("a state task failed: {e}")))?
            .map_err(|e| err(ErrorCode::Internal, format!("the state store failed: {e}")))
    }

    async fn lookup(&self, id: &str) -> Result<Handle, ApiError> {
        if !is_handle_id(id) {
            return Err(err(
                ErrorCode::InvalidRequest,
                format!("{id:?} is not a keyhole handle (they look like kh_…)"),
            ));
        }
        if let Some(handle) = self.state.cached(id) {
            return Ok(handle);
        }
        let key = id.to_string();
        self.blocking(move |s| s.get(&key)).await?.ok_or_else(|| {
            err(
                ErrorCode::NotFound,
                format!("no handle {id}; `keyhole list` shows yours"),
            )
        })
    }

    /// Stores a new handle for a secret that now exists (Put, Link) and answers with it.
    async fn mint(
        &self,
        new: NewHandle,
        version: String,
        trails: &mut [Trail],
    ) -> Result<ApiReply, ApiError> {
        let handle = self.blocking(move |s| s.insert(new)).await?;
        if let Some(t) = trails.last_mut() {
            t.handle = Some(handle.id.clone());
        }
        Ok(ApiReply::Put {
            handle: handle.id,
            version: self.scrub(version),
        })
    }

    /// Provider text on its way to a client, redacted like the provider's error messages: a
    /// misbehaving provider must not reach a client with a value through a version string or a
    /// label.
    fn scrub(&self, text: String) -> String {
        self.redactor.redact_string(text)
    }

    /// A provider's description of a secret, with its text scrubbed (see [`Gateway::scrub`]).
    fn scrub_description(&self, d: Description) -> Description {
        Description {
            name: self.scrub(d.name),
            current_version: d.current_version.map(|v| self.scrub(v)),
            versions: d
                .versions
                .into_iter()
                .map(|v| VersionInfo {
                    version: self.scrub(v.version),
                    ..v
                })
                .collect(),
            labels: d
                .labels
                .into_iter()
                .map(|(k, v)| (self.scrub(k), self.scrub(v)))
                .collect(),
            ..d
        }
    }

    async fn dispatch(
        self: &Arc<Self>,
        caller: &Caller,
        op: ApiOp,
        trails: &mut Vec<Trail>,
    ) -> Result<ApiReply, ApiError> {
        match op {
            ApiOp::Put {
                name,
                provider,
                scope,
                labels,
                value,
            } => {
                let scope = scope.unwrap_or_else(|| "default".into());
                trails.push(Trail {
                    handle: None,
                    scope: Some(scope.clone()),
                });
                self.decide(caller, Operation::Put, &scope, &labels, None)?;
                let provider = provider.unwrap_or_else(|| self.default_provider.clone());
                // Put writes over a name that exists (and un-revokes it), which changes what its
                // handles resolve to: the caller must be allowed to rotate each of them.
                self.decide_on_existing(caller, &provider, &name, Operation::Rotate, None)
                    .await?;
                self.redactor.add(value.expose());
                let reply = self
                    .call(
                        &provider,
                        Op::Store {
                            name: name.clone(),
                            value,
                            create_only: false,
                            labels: labels.clone(),
                        },
                    )
                    .await?;
                let Reply::Stored { version } = reply else {
                    return Err(err(
                        ErrorCode::Internal,
                        "the provider answered Store with another reply",
                    ));
                };
                let new = NewHandle {
                    provider,
                    name,
                    version_pin: VersionPin::Current,
                    scope,
                    labels,
                };
                self.mint(new, version, trails).await
            }
            ApiOp::Link {
                name,
                provider,
                scope,
                labels,
            } => {
                let scope = scope.unwrap_or_else(|| "default".into());
                trails.push(Trail {
                    handle: None,
                    scope: Some(scope.clone()),
                });
                self.decide(caller, Operation::Link, &scope, &labels, None)?;
                let provider = provider.unwrap_or_else(|| self.default_provider.clone());
                // A new handle reaches the value, so it must not open a secret to a caller who
                // could not resolve it through the handles it already has.
                self.decide_on_existing(caller, &provider, &name, Operation::Resolve, Some("link"))
                    .await?;
                let reply = self
                    .call(&provider, Op::Describe { name: name.clone() })
                    .await?;
                let Reply::Described(d) = reply else {
                    return Err(err(
                        ErrorCode::Internal,
                        "the provider answered Describe with another reply",
                    ));
                };
                let (SecretState::Active, Some(version)) = (d.state, d.current_version) else {
                    return Err(err(
                        ErrorCode::Revoked,
                        format!("{name:?} in provider {provider:?} is revoked; nothing to link"),
                    ));
                };
                let new = NewHandle {
                    provider,
                    name,
                    version_pin: VersionPin::Current,
                    scope,
                    labels,
                };
                self.mint(new, version, trails).await
            }
            ApiOp::Rotate { handle, value } => {
                let h = self.lookup(&handle).await?;
                trails.push(Trail {
                    handle: Some(h.id.clone()),
                    scope: Some(h.scope.clone()),
                });
                self.decide(caller, Operation::Rotate, &h.scope, &h.labels, None)?;
                self.redactor.add(value.expose());
                let reply = self
                    .call(
                        &h.provider,
                        Op::Rotate {
                            name: h.name.clone(),
                            value,
                            expected_version: None,
                        },
                    )
                    .await?;
                let Reply::Rotated { version } = reply else {
                    return Err(err(
                        ErrorCode::Internal,
                        "the provider answered Rotate with another reply",
                    ));
                };
                let id = h.id.clone();
                self.blocking(move |s| s.set_state(&id, HandleState::Active))
                    .await?;
                Ok(ApiReply::Rotated {
                    version: self.scrub(version),
                })
            }
            ApiOp::Revoke { handle } => {
                let h = self.lookup(&handle).await?;
                trails.push(Trail {
                    handle: Some(h.id.clone()),
                    scope: Some(h.scope.clone()),
                });
                self.decide(caller, Operation::Revoke, &h.scope, &h.labels, None)?;
                self.call(
                    &h.provider,
                    Op::Revoke {
                        name: h.name.clone(),
                    },
                )
                .await?;
                let id = h.id.clone();
                self.blocking(move |s| s.set_state(&id, HandleState::Revoked))
                    .await?;
                Ok(ApiReply::Revoked {})
            }
            ApiOp::Describe { handle } => {
                let h = self.lookup(&handle).await?;
                trails.push(Trail {
                    handle: Some(h.id.clone()),
                    scope: Some(h.scope.clone()),
                });
                self.decide(caller, Operation::Describe, &h.scope, &h.labels, None)?;
                let mut v = view(&h);
                if let Reply::Described(d) = self
                    .call(
                        &h.provider,
                        Op::Describe {
                            name: h.name.clone(),
                        },
                    )
                    .await?
                {
                    v.secret = Some(self.scrub_description(d));
                }
                Ok(ApiReply::Described(Box::new(v)))
            }
            ApiOp::List {} => {
                let all = self.blocking(|s| s.list()).await?;
                let visible = all
                    .iter()
                    .filter(|h| {
                        self.decide(caller, Operation::List, &h.scope, &h.labels, None)
                            .is_ok()
                    })
                    .map(view)
                    .collect();
                Ok(ApiReply::Listed { handles: visible })
            }
            ApiOp::Resolve { handles, purpose } => {
                // Every handle is checked before any is resolved: all or nothing.
                let mut found = Vec::new();
                for id in &handles {
                    let h = self.lookup(id).await?;
                    trails.push(Trail {
                        handle: Some(h.id.clone()),
                        scope: Some(h.scope.clone()),
                    });
                    found.push(h);
                }
                for h in &found {
                    self.decide(
                        caller,
                        Operation::Resolve,
                        &h.scope,
                        &h.labels,
                        Some(&purpose),
                    )?;
                }
                // A revoked handle stays revoked even if its secret comes back through another
                // handle or a put; rotating this handle is what restores it.
                if let Some(h) = found.iter().find(|h| h.state == HandleState::Revoked) {
                    return Err(err(
                        ErrorCode::Revoked,
                        format!("handle {} was revoked; `keyhole rotate` restores it", h.id),
                    ));
                }
                let mut values = Vec::new();
                for h in found {
                    let version = match &h.version_pin {
                        VersionPin::Current => None,
                        VersionPin::Fixed(v) => Some(v.clone()),
                    };
                    match self
                        .call(
                            &h.provider,
                            Op::Resolve {
                                name: h.name.clone(),
                                version,
                            },
                        )
                        .await?
                    {
                        Reply::Resolved { value, version } => {
                            self.redactor.add(value.expose());
                            values.push(ResolvedValue {
                                handle: h.id,
                                value,
                                version: self.scrub(version),
                            });
                        }
                        _ => {
                            return Err(err(
                                ErrorCode::Internal,
                                "the provider answered Resolve with another reply",
                            ));
                        }
                    }
                }
                Ok(ApiReply::Resolved { values })
            }
            ApiOp::Providers {} => {
                self.decide(caller, Operation::Providers, "*", &BTreeMap::new(), None)?;
                // Ask every provider for its health first (which may restart it), then take the
                // state once, so it reflects those calls.
                let mut healths = Vec::new();
                for name in self.manager.names() {
                    healths.push(
                        match self
                            .manager
                            .call(&name, Op::Health {}, self.call_timeout)
                            .await
                        {
                            Ok(Outcome::Ok(Reply::Health(h))) => Some(h),
                            _ => None,
                        },
                    );
                }
                let mut out = Vec::new();
                for (fresh, health) in self.manager.status().await.into_iter().zip(healths) {
                    out.push(ProviderView {
                        name: fresh.name.clone(),
                        up: fresh.ack.is_some(),
                        provider: fresh.ack.as_ref().map(|a| {
                            self.scrub(format!("{} {}", a.provider.name, a.provider.version))
                        }),
                        health: health.as_ref().map(|h| format!("{:?}", h.status)),
                        detail: health
                            .map(|h| self.scrub(h.detail))
                            .filter(|d| !d.is_empty())
                            .or(fresh.down_reason)
                            .unwrap_or_default(),
                        restarts: fresh.restarts,
                    });
                }
                Ok(ApiReply::Providers { providers: out })
            }
            ApiOp::AuditVerify {} => {
                self.decide(caller, Operation::Audit, "*", &BTreeMap::new(), None)?;
                let audit = Arc::clone(&self.audit);
                let report = tokio::task::spawn_blocking(move || audit.verify())
                    .await
                    .map_err(|e| err(ErrorCode::Internal, format!("the audit task failed: {e}")))?
                    .map_err(|e| {
                        err(
                            ErrorCode::Internal,
                            format!("the audit log cannot be read: {e}"),
                        )
                    })?;
                Ok(ApiReply::Audit(match report {
                    VerifyReport::Intact { records } => AuditView {
                        intact: true,
                        records,
                        broken_at: None,
                        reason: None,
                    },
                    VerifyReport::Broken { seq, reason } => AuditView {
                        intact: false,
                        records: seq,
                        broken_at: Some(seq),
                        reason: Some(reason),
                    },
                }))
            }
        }
    }
}

/// Accepts clients on `path` until `shutdown` resolves. Each connection: peer uid, token, then
/// requests answered in order. `ready` runs once the socket accepts connections and before the
/// first is taken (the gateway writes its client token file there, so a client that waits for
/// the token file never finds the socket missing).
///
/// Shutdown drains: no connection is accepted and no request read any more (a connection still
/// in its hello is closed), and a request being handled finishes, provider call and audit record
/// alike, and is answered. Each of those steps has a deadline of its own (the call timeout, the
/// client write timeout), so every connection ends by itself; [`DRAIN_BOUND`] is only a
/// failsafe. Returns once every connection has ended.
pub async fn serve(
    gateway: Arc<Gateway>,
    path: &Path,
    token: Token,
    ready: impl FnOnce() -> std::io::Result<()>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let listener = socket::listen(path).await?;
    ready()?;
    let token = Arc::new(token);
    let (draining, drain_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    let uid = socket::peer_uid(&stream);
                    let (gateway, token) = (Arc::clone(&gateway), Arc::clone(&token));
                    let drain_rx = drain_rx.clone();
                    connections.spawn(async move {
                        let uid = match uid {
                            Ok(uid) => uid,
                            Err(e) => {
                                tracing::warn!("refused a client whose uid is unknown: {e}");
                                return;
                            }
                        };
                        let (read, write) = socket::into_halves(stream);
                        let ended = connection(gateway, read, write, uid, &token, drain_rx).await;
                        if let Err(e) = ended {
                            tracing::debug!("client connection ended: {e}");
                        }
                    });
                }
                Err(e) => tracing::warn!("accept failed: {e}"),
            },
            // Finished connections are reaped as they end, so the set holds only live ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let _ = draining.send(true);
    let drained = tokio::time::timeout(DRAIN_BOUND, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::error!(
            "{} client connections were still busy {DRAIN_BOUND:?} after shutdown began; \
             closing them, and their requests' audit records may be missing",
            connections.len()
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
    Ok(())
}

/// A failsafe on shutdown: no connection takes this long to finish its request and write the
/// answer, since each step has a deadline of its own.
const DRAIN_BOUND: Duration = Duration::from_secs(120);

/// How long an answer may take to write. A client that has not taken it by then is stuck; its
/// connection ends rather than hold the task and the answer (which may carry a value) for ever.
pub const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

async fn connection(
    gateway: Arc<Gateway>,
    read: BoxRead,
    write: BoxWrite,
    uid: u32,
    token: &Token,
    mut draining: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut reader = FrameReader::new(read, HANDSHAKE_MAX_FRAME);
    let mut writer = FrameWriter::new(write, HANDSHAKE_MAJOR, Encoding::Json, HANDSHAKE_MAX_FRAME);
    let first = tokio::select! {
        biased;
        _ = draining.wait_for(|now| *now) => return Ok(()),
        first = tokio::time::timeout(Duration::from_secs(5), reader.next()) => first,
    };
    let hello = match first {
        Ok(Ok(Some(frame))) => decode::<ClientHello>(Encoding::Json, frame.payload).ok(),
        _ => return Ok(()),
    };
    let refused = match &hello {
        None => Some("the first frame must be a ClientHello".to_string()),
        Some(h) if !h.token.ct_eq(token) => {
            Some("wrong token: read it from the gateway's token file".to_string())
        }
        Some(h) if !h.majors.contains(&API_MAJOR) => {
            Some(format!("this gateway speaks API major {API_MAJOR}"))
        }
        Some(_) => None,
    };
    if let Some(message) = refused {
        tracing::warn!(uid, "refused a client: {message}");
        let _ = writer.queue(&ServerHello::Refused { message });
        return writer.shutdown_within(gateway.client_write_timeout).await;
    }
    let _ = writer.queue(&ServerHello::Welcome {
        version: env!("CARGO_PKG_VERSION").into(),
    });
    writer.flush_within(gateway.client_write_timeout).await?;
    reader.set_cap(DEFAULT_MAX_FRAME);
    writer.set_format(API_MAJOR, Encoding::Json, DEFAULT_MAX_FRAME);
    let caller = Caller {
        uid,
        is_owner: uid == gateway.owner_uid,
    };
    loop {
        // Between requests, shutdown ends the connection; a request already read is answered.
        let next = tokio::select! {
            biased;
            _ = draining.wait_for(|now| *now) => return Ok(()),
            next = reader.next() => next,
        };
        let request = match next {
            Ok(Some(frame)) => match decode::<ApiRequest>(Encoding::Json, frame.payload) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(uid, "malformed client request: {e}");
                    return Ok(());
                }
            },
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::warn!(uid, "bad frame from a client: {e}");
                return Ok(());
            }
        };
        let result = match gateway.handle(&caller, request.op).await {
            Ok(reply) => ApiResult::Ok(reply),
            Err(e) => ApiResult::Err(e),
        };
        if let Err(e) = writer.queue(&ApiResponse {
            id: request.id,
            result,
        }) {
            let fallback = ApiResponse {
                id: request.id,
                result: ApiResult::Err(err(
                    ErrorCode::TooLarge,
                    format!("the answer does not fit a frame: {e}"),
                )),
            };
            let _ = writer.queue(&fallback);
        }
        writer.flush_within(gateway.client_write_timeout).await?;
    }
}
