//! The keychain itself: the keyring-core credential store of the chosen kind, the blocking
//! get/set/delete calls on its entries, the mapping of keyring errors to protocol error codes,
//! and the health probe.
//!
//! Everything here blocks; [`crate::provider`] runs it on threads of its own under a deadline.
//! The store object is held directly (not as keyring-core's process-wide default store) and built
//! lazily, so a provider started before its D-Bus session is up still starts and answers Health;
//! after a call times out the store is dropped and rebuilt on the next call, because a stuck call
//! may hold the store's connection lock forever.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use keyhole_providers::protocol::{
    ErrorCode, HealthReport, HealthStatus, ProviderError, SecretBytes,
};
use keyring_core::{CredentialStore, Entry, Error as KeyringError};
use zeroize::{Zeroize, Zeroizing};

use crate::index::NameIndex;
use crate::layout;
use crate::lock::WriteLock;
use crate::options::StoreKind;

/// One keychain store and namespace.
pub struct Keychain {
    kind: StoreKind,
    service: String,
    store: Mutex<Option<Arc<CredentialStore>>>,
    /// Held while the store is being built.
    building: Mutex<Arc<Mutex<()>>>,
    #[cfg(target_os = "linux")]
    bus: Mutex<Option<zbus::blocking::Connection>>,
    /// The default collection's object path, and when it was looked up.
    #[cfg(target_os = "linux")]
    collection: Mutex<Option<(String, std::time::Instant)>>,
    lock: Option<WriteLock>,
    index: NameIndex,
    /// Set once a keyutils write probe succeeded in this process.
    #[cfg(target_os = "linux")]
    keyutils_ready: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Keychain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keychain")
            .field("store", &self.kind.name())
            .field("service", &self.service)
            .finish()
    }
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values are replaceable caches; a panic elsewhere cannot corrupt them.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Keychain {
    /// A keychain of `kind` under the namespace `service`, writes serialized by `lock` (without
    /// one, writes are refused: for probes). Nothing is contacted yet.
    pub fn new(kind: StoreKind, service: &str, lock: Option<WriteLock>) -> Keychain {
        Keychain {
            kind,
            service: service.to_string(),
            store: Mutex::new(None),
            building: Mutex::new(Arc::new(Mutex::new(()))),
            #[cfg(target_os = "linux")]
            bus: Mutex::new(None),
            #[cfg(target_os = "linux")]
            collection: Mutex::new(None),
            lock,
            index: NameIndex::default(),
            #[cfg(target_os = "linux")]
            keyutils_ready: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Process-wide set-up, before any thread starts. For keyutils: make sure this process has a
    /// session keyring of its own. A process on its user's default session keyring (a service,
    /// a container, anything started outside a login session) would otherwise get a new one
    /// from the first call that links the persistent keyring, on that thread only (session
    /// keyrings are per thread), and the keyutils store then writes to one keyring and links
    /// from another, which the kernel refuses. An inherited session keyring (a login session's,
    /// or one from `keyctl session`) is kept.
    pub fn prepare_process(kind: StoreKind) {
        #[cfg(target_os = "linux")]
        if kind == StoreKind::Keyutils {
            use linux_keyutils::{KeyRing, KeyRingIdentifier};
            if let Err(e) = KeyRing::from_special_id(KeyRingIdentifier::Session, true) {
                tracing::warn!("could not set up a session keyring: {e}");
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = kind;
    }

    /// The store kind.
    pub fn kind(&self) -> StoreKind {
        self.kind
    }

    /// The namespace.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The write lock.
    pub fn write_lock(&self) -> Option<&WriteLock> {
        self.lock.as_ref()
    }

    /// The name index.
    pub fn index(&self) -> &NameIndex {
        &self.index
    }

    /// The largest value Store and Rotate accept on this store.
    pub fn max_value_size(&self) -> u32 {
        match self.kind {
            StoreKind::SecretService | StoreKind::Macos => crate::options::DESKTOP_MAX_VALUE_SIZE,
            StoreKind::Windows => {
                (crate::options::WINDOWS_MAX_BLOB - layout::VALUE_OVERHEAD) as u32
            }
            StoreKind::Keyutils => keyutils_value_cap(),
        }
    }

    /// Forgets the store and the probe connection, so the next call connects afresh. Called
    /// after a timeout: the stuck call may hold the old store's connection forever.
    pub fn reset(&self) {
        *guard(&self.store) = None;
        *guard(&self.building) = Arc::new(Mutex::new(()));
        #[cfg(target_os = "linux")]
        {
            *guard(&self.bus) = None;
            *guard(&self.collection) = None;
        }
    }

    fn credential_store(&self) -> Result<Arc<CredentialStore>, ProviderError> {
        if let Some(store) = guard(&self.store).as_ref() {
            return Ok(Arc::clone(store));
        }
        // One builder at a time (the Secret Service store opens a connection and an encrypted
        // session), outside the cache lock. A reset installs a new gate, so a build stuck on a
        // dead daemon never blocks the builds after it.
        let gate = Arc::clone(&guard(&self.building));
        let _building = guard(&gate);
        if let Some(store) = guard(&self.store).as_ref() {
            return Ok(Arc::clone(store));
        }
        let store = build_store(self.kind).map_err(|e| self.failure(e, "opening the keychain"))?;
        *guard(&self.store) = Some(Arc::clone(&store));
        Ok(store)
    }

    fn entry(&self, user: &str, label: &str, what: &str) -> Result<Entry, ProviderError> {
        let store = self.credential_store()?;
        let mut modifiers: HashMap<&str, &str> = HashMap::new();
        let description;
        match self.kind {
            // Shown in Seahorse and `secret-tool search`; it names the secret, never the value.
            StoreKind::SecretService => {
                if !label.is_empty() {
                    modifiers.insert("label", label);
                }
            }
            // The key's description, "<service>:<user>", so `keyctl` can find keyhole's keys
            // by prefix.
            StoreKind::Keyutils => {
                description = format!("{}:{user}", self.service);
                modifiers.insert("description", &description);
            }
            StoreKind::Macos | StoreKind::Windows => {}
        }
        let modifiers = (!modifiers.is_empty()).then_some(&modifiers);
        store
            .build(&self.service, user, modifiers)
            .map_err(|e| self.failure(e, what))
    }

    /// Runs `call` on entry `user`. On the Secret Service, a D-Bus failure (the daemon was
    /// restarted, and the store's encrypted session with it) reconnects and runs the call once
    /// more: each call is a single read, replace or delete, so running it twice is harmless.
    fn with_entry<T>(
        &self,
        op: &'static str,
        user: &str,
        label: &str,
        what: &str,
        call: impl Fn(&Entry) -> Result<T, KeyringError>,
    ) -> Result<T, ProviderError> {
        let mut retried = false;
        loop {
            let entry = self.entry(user, label, what)?;
            let _timer = Timer::new(op, user);
            match call(&entry) {
                Ok(v) => return Ok(v),
                Err(KeyringError::PlatformFailure(_))
                    if !retried && self.kind == StoreKind::SecretService =>
                {
                    retried = true;
                    self.reset();
                }
                Err(e) => return Err(self.failure(e, what)),
            }
        }
    }

    /// The bytes of entry `user`, or `None` if it does not exist. `what` names it in errors.
    pub fn get(&self, user: &str, what: &str) -> Result<Option<Zeroizing<Vec<u8>>>, ProviderError> {
        self.with_entry("get", user, "", what, |entry| match entry.get_secret() {
            Ok(bytes) => Ok(Some(Zeroizing::new(bytes))),
            Err(KeyringError::NoEntry) => Ok(None),
            Err(e) => Err(e),
        })
    }

    /// Creates or replaces entry `user`. `label` is the Secret Service item's label.
    pub fn set(
        &self,
        user: &str,
        label: &str,
        bytes: &[u8],
        what: &str,
    ) -> Result<(), ProviderError> {
        if bytes.len() > self.kind.entry_cap() {
            return Err(ProviderError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "{what} needs {} bytes, more than the {} bytes an entry of {} holds; \
                     use a shorter name or fewer labels",
                    bytes.len(),
                    self.kind.entry_cap(),
                    self.kind.describe()
                ),
            ));
        }
        self.with_entry("set", user, label, what, |entry| entry.set_secret(bytes))
    }

    /// Deletes entry `user`; `false` if it did not exist.
    pub fn delete(&self, user: &str, what: &str) -> Result<bool, ProviderError> {
        self.with_entry("delete", user, "", what, |entry| {
            match entry.delete_credential() {
                Ok(()) => Ok(true),
                Err(KeyringError::NoEntry) => Ok(false),
                Err(e) => Err(e),
            }
        })
    }

    /// Checks, without prompting, that operations can proceed: on the Secret Service, that the
    /// default collection exists and is unlocked (an operation on a locked collection would ask
    /// for an unlock prompt and wait for a human), `Locked` or `Unavailable` otherwise; on
    /// keyutils, once per process, that a key can be written and linked (a refused link leaves
    /// the key behind in the session keyring, so no secret is written before this passed).
    pub fn check_access(&self) -> Result<(), ProviderError> {
        match self.kind {
            #[cfg(target_os = "linux")]
            StoreKind::Keyutils => {
                use std::sync::atomic::Ordering;
                if self.keyutils_ready.load(Ordering::Acquire) {
                    return Ok(());
                }
                self.keyutils_probe()?;
                self.keyutils_ready.store(true, Ordering::Release);
                Ok(())
            }
            #[cfg(target_os = "linux")]
            StoreKind::SecretService => match self.secret_service_state() {
                SsState::Unlocked => Ok(()),
                SsState::Locked(detail) => Err(ProviderError::new(ErrorCode::Locked, detail)),
                SsState::Unavailable(detail) => {
                    Err(ProviderError::new(ErrorCode::Unavailable, detail))
                }
            },
            _ => Ok(()),
        }
    }

    /// The backend's health, found without prompting.
    pub fn health(&self) -> HealthReport {
        let (status, detail) = match self.kind {
            #[cfg(target_os = "linux")]
            StoreKind::SecretService => match self.secret_service_state() {
                SsState::Unlocked => {
                    // Open the keyring store too: it needs its own encrypted session.
                    match self.credential_store() {
                        Ok(_) => (HealthStatus::Ok, String::new()),
                        Err(e) => (status_of(&e), e.message),
                    }
                }
                SsState::Locked(detail) => (HealthStatus::Locked, detail),
                SsState::Unavailable(detail) => (HealthStatus::Unavailable, detail),
            },
            #[cfg(target_os = "linux")]
            StoreKind::Keyutils => self.keyutils_health(),
            _ => self.read_probe_health(),
        };
        HealthReport { status, detail }
    }

    /// Health by reading an entry that does not exist: "not found" means the store answers.
    #[cfg_attr(target_os = "linux", allow(dead_code))]
    fn read_probe_health(&self) -> (HealthStatus, String) {
        match self.get(layout::PROBE, "the health probe") {
            Ok(_) => (HealthStatus::Ok, String::new()),
            Err(e) => (status_of(&e), e.message),
        }
    }

    /// The one place a keyring error becomes a protocol error. Never quotes data: the
    /// `BadEncoding` and `BadDataFormat` variants carry raw entry bytes, zeroized here.
    pub fn failure(&self, e: KeyringError, what: &str) -> ProviderError {
        let store = self.kind.describe();
        match e {
            KeyringError::NoEntry => ProviderError::internal(format!(
                "{what} is missing from {store}; it may have been deleted outside keyhole"
            )),
            KeyringError::BadEncoding(mut bytes) => {
                bytes.zeroize();
                ProviderError::internal(format!("{what}: {store} returned undecodable data"))
            }
            KeyringError::BadDataFormat(mut bytes, _) => {
                bytes.zeroize();
                ProviderError::internal(format!("{what}: {store} returned malformed data"))
            }
            KeyringError::Ambiguous(entries) => ProviderError::internal(format!(
                "{what}: {} entries of {store} match it under service {:?}; keyhole writes one, \
                 so delete the duplicates",
                entries.len(),
                self.service
            )),
            KeyringError::TooLong(field, limit) => ProviderError::new(
                ErrorCode::InvalidRequest,
                format!("{what}: its {field} exceeds the limit of {limit} of {store}"),
            ),
            KeyringError::Invalid(field, reason) => {
                ProviderError::internal(format!("{what}: {store} refused the {field}: {reason}"))
            }
            KeyringError::NoStorageAccess(inner) => self.no_access(what, &*inner),
            KeyringError::PlatformFailure(inner) => self.platform_failure(what, &*inner),
            other => {
                ProviderError::internal(format!("{what}: {store} failed: {}", describe(&other)))
            }
        }
    }

    fn no_access(&self, what: &str, inner: &(dyn std::error::Error + 'static)) -> ProviderError {
        match self.kind {
            // Locked items, a dismissed prompt, or no default collection.
            StoreKind::SecretService => ProviderError::new(
                ErrorCode::Locked,
                format!(
                    "{what}: the Secret Service refused access ({inner}): {}",
                    UNLOCK_ADVICE
                ),
            ),
            StoreKind::Keyutils => ProviderError::new(
                ErrorCode::PermissionDenied,
                format!("{what}: the kernel refused access ({inner}): {KEYUTILS_SESSION_ADVICE}"),
            ),
            StoreKind::Macos => ProviderError::new(
                ErrorCode::Locked,
                format!(
                    "{what}: the keychain refused access ({inner}); unlock the login keychain and retry"
                ),
            ),
            StoreKind::Windows => ProviderError::new(
                ErrorCode::PermissionDenied,
                format!("{what}: the Credential Manager refused access ({inner})"),
            ),
        }
    }

    fn platform_failure(
        &self,
        what: &str,
        inner: &(dyn std::error::Error + 'static),
    ) -> ProviderError {
        let store = self.kind.describe();
        #[cfg(target_os = "linux")]
        if let Some(key_error) = inner.downcast_ref::<linux_keyutils::KeyError>() {
            if matches!(key_error, linux_keyutils::KeyError::QuotaExceeded) {
                return ProviderError::new(ErrorCode::PermissionDenied, quota_message(what));
            }
            return ProviderError::internal(format!("{what}: {store} failed: {key_error}"));
        }
        match self.kind {
            // A D-Bus failure: the daemon went away, or the session was closed under us.
            StoreKind::SecretService => {
                self.reset();
                ProviderError::new(
                    ErrorCode::Unavailable,
                    format!("{what}: the Secret Service failed ({inner}); {SS_ADVICE}"),
                )
            }
            _ => ProviderError::internal(format!("{what}: {store} failed: {inner}")),
        }
    }

    /// Takes the write lock, waiting until `deadline`.
    pub fn lock(&self, deadline: std::time::Instant) -> Result<std::fs::File, ProviderError> {
        match &self.lock {
            Some(lock) => lock.acquire(deadline),
            None => Err(ProviderError::internal(
                "this keychain handle has no write lock",
            )),
        }
    }

    /// Reads a value entry and opens it.
    pub fn get_value(&self, user: &str, what: &str) -> Result<Option<SecretBytes>, ProviderError> {
        match self.get(user, what)? {
            None => Ok(None),
            Some(bytes) => layout::open_value(&bytes).map(Some).ok_or_else(|| {
                ProviderError::internal(format!(
                    "{what} in {} is not in keyhole's format; revoke and store the secret again",
                    self.kind.describe()
                ))
            }),
        }
    }
}

/// Logs how long one keychain call took, at debug level (the entry's user, never its data).
struct Timer {
    op: &'static str,
    user: String,
    started: std::time::Instant,
}

impl Timer {
    fn new(op: &'static str, user: &str) -> Timer {
        Timer {
            op,
            user: user.to_string(),
            started: std::time::Instant::now(),
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        tracing::debug!(
            op = self.op,
            user = %self.user,
            micros = self.started.elapsed().as_micros() as u64,
            "keychain call"
        );
    }
}

/// A keyring error's description, without the data some variants carry.
fn describe(e: &KeyringError) -> String {
    match e {
        KeyringError::BadEncoding(_) => "undecodable data".into(),
        KeyringError::BadDataFormat(..) => "malformed data".into(),
        KeyringError::Ambiguous(entries) => format!("{} entries match", entries.len()),
        other => other.to_string(),
    }
}

/// The health status an error answer corresponds to.
fn status_of(e: &ProviderError) -> HealthStatus {
    match e.code {
        ErrorCode::Locked => HealthStatus::Locked,
        ErrorCode::PermissionDenied | ErrorCode::Unauthenticated => HealthStatus::Unauthorized,
        _ => HealthStatus::Unavailable,
    }
}

const UNLOCK_ADVICE: &str = "unlock the default keyring (log in to the desktop session, open \
    Passwords and Keys, or pipe its password to `gnome-keyring-daemon --unlock`) and retry; \
    keyhole never shows an unlock prompt itself";

const SS_ADVICE: &str = "run the provider inside the desktop session, or start a session bus \
    and a Secret Service first, e.g. `dbus-run-session -- sh -c 'printf %s PASSWORD | \
    gnome-keyring-daemon --components=secrets --daemonize --unlock; exec keyhole serve'`; \
    on a headless machine use --store keyutils";

const KEYUTILS_SESSION_ADVICE: &str = "keys go to this process's session keyring and are \
    linked to the user's persistent keyring, and this session keyring (often the user-default \
    one of a container or service, not a login session's) does not allow that; run the provider \
    under a session keyring of its own: `keyctl session - keyhole-provider-keychain --store \
    keyutils ...` (as a spawned provider: command \"keyctl\", args [\"session\", \"-\", \
    \"keyhole-provider-keychain\", \"--store\", \"keyutils\"]), or start the gateway under \
    `keyctl session -`";

fn build_store(kind: StoreKind) -> Result<Arc<CredentialStore>, KeyringError> {
    match kind {
        #[cfg(target_os = "linux")]
        StoreKind::SecretService => {
            let store: Arc<CredentialStore> = zbus_secret_service_keyring_store::Store::new()?;
            Ok(store)
        }
        #[cfg(target_os = "linux")]
        StoreKind::Keyutils => {
            let store: Arc<CredentialStore> = linux_keyutils_keyring_store::Store::new()?;
            Ok(store)
        }
        #[cfg(target_os = "macos")]
        StoreKind::Macos => {
            let store: Arc<CredentialStore> = apple_native_keyring_store::keychain::Store::new()?;
            Ok(store)
        }
        #[cfg(windows)]
        StoreKind::Windows => {
            let store: Arc<CredentialStore> = windows_native_keyring_store::Store::new()?;
            Ok(store)
        }
        #[allow(unreachable_patterns)]
        other => Err(KeyringError::NotSupportedByStore(format!(
            "{} is not available in this build",
            other.describe()
        ))),
    }
}

// ---- the Secret Service probe ----------------------------------------------------------------

/// What the Secret Service's default collection looks like, found without prompting.
#[cfg(target_os = "linux")]
enum SsState {
    Unlocked,
    Locked(String),
    Unavailable(String),
}

#[cfg(target_os = "linux")]
const SS_NAME: &str = "org.freedesktop.secrets";

/// How long the default collection's path is trusted before the alias is read again.
#[cfg(target_os = "linux")]
const COLLECTION_CACHE: std::time::Duration = std::time::Duration::from_secs(5);

#[cfg(target_os = "linux")]
impl Keychain {
    fn bus(&self) -> Result<zbus::blocking::Connection, String> {
        if let Some(conn) = guard(&self.bus).as_ref() {
            return Ok(conn.clone());
        }
        let conn = zbus::blocking::Connection::session()
            .map_err(|e| format!("cannot reach {} ({e}); {SS_ADVICE}", bus_description()))?;
        *guard(&self.bus) = Some(conn.clone());
        Ok(conn)
    }

    /// On a plain D-Bus connection, the default collection's `Locked` property (and, every few
    /// seconds, the `default` alias, to follow a change of default). Never calls anything that
    /// could prompt.
    fn secret_service_state(&self) -> SsState {
        let _timer = Timer::new("probe", "");
        let conn = match self.bus() {
            Ok(conn) => conn,
            Err(detail) => return SsState::Unavailable(detail),
        };
        let fail = |e: zbus::Error| {
            // The connection may be dead; connect afresh next time.
            *guard(&self.bus) = None;
            *guard(&self.collection) = None;
            SsState::Unavailable(match &e {
                zbus::Error::MethodError(name, _, _)
                    if name.as_str() == "org.freedesktop.DBus.Error.ServiceUnknown"
                        || name.as_str() == "org.freedesktop.DBus.Error.NameHasNoOwner" =>
                {
                    format!(
                        "no Secret Service answers on {} ({e}): start one, e.g. \
                         `gnome-keyring-daemon --components=secrets --daemonize --unlock` with \
                         the keyring password on stdin (or KeePassXC or KWallet with Secret \
                         Service integration); on a headless machine use --store keyutils",
                        bus_description()
                    )
                }
                _ => format!(
                    "the Secret Service on {} failed ({e}); {SS_ADVICE}",
                    bus_description()
                ),
            })
        };
        let cached = guard(&self.collection)
            .as_ref()
            .filter(|(_, at)| at.elapsed() < COLLECTION_CACHE)
            .map(|(path, _)| path.clone());
        let path = match cached {
            Some(path) => path,
            None => {
                let alias = conn.call_method(
                    Some(SS_NAME),
                    "/org/freedesktop/secrets",
                    Some("org.freedesktop.Secret.Service"),
                    "ReadAlias",
                    &("default",),
                );
                let path: zbus::zvariant::OwnedObjectPath =
                    match alias.and_then(|m| m.body().deserialize()) {
                        Ok(path) => path,
                        Err(e) => return fail(e),
                    };
                if path.as_str() == "/" {
                    return SsState::Unavailable(
                        "the Secret Service has no default collection (keyring) to keep secrets \
                         in: create one, e.g. start `gnome-keyring-daemon --components=secrets \
                         --unlock` with a password on stdin, which creates the login keyring, or \
                         make one the default in Passwords and Keys"
                            .into(),
                    );
                }
                let path = path.as_str().to_string();
                *guard(&self.collection) = Some((path.clone(), std::time::Instant::now()));
                path
            }
        };
        let property = |name: &str| {
            conn.call_method(
                Some(SS_NAME),
                path.as_str(),
                Some("org.freedesktop.DBus.Properties"),
                "Get",
                &("org.freedesktop.Secret.Collection", name),
            )
            .and_then(|m| m.body().deserialize::<zbus::zvariant::OwnedValue>())
        };
        let locked = match property("Locked").and_then(|v| bool::try_from(v).map_err(Into::into)) {
            Ok(locked) => locked,
            Err(e) => return fail(e),
        };
        if !locked {
            return SsState::Unlocked;
        }
        let label = property("Label")
            .ok()
            .and_then(|v| String::try_from(v).ok())
            .filter(|l| !l.is_empty())
            .unwrap_or_else(|| path.clone());
        SsState::Locked(format!(
            "the default Secret Service collection {label:?} is locked: {UNLOCK_ADVICE}"
        ))
    }

    /// Writes and deletes a one-byte probe key. Where the session keyring does not allow the
    /// link to the persistent keyring (the user-default session keyring of a container or a
    /// service), reads can work while writes fail half-way, so only a write tells.
    fn keyutils_probe(&self) -> Result<(), ProviderError> {
        let result = self
            .set(layout::PROBE, "", &[1], "the keyutils write probe")
            .and_then(|()| self.delete(layout::PROBE, "the keyutils write probe"))
            .map(|_| ());
        if result.is_err() {
            self.scrub_probe();
        }
        result
    }

    /// Removes a probe key a failed write left in the session keyring, where the store's own
    /// search may not find it.
    fn scrub_probe(&self) {
        use linux_keyutils::{KeyRing, KeyRingIdentifier};
        let description = format!("{}:{}", self.service, layout::PROBE);
        let Ok(session) = KeyRing::from_special_id(KeyRingIdentifier::Session, false) else {
            return;
        };
        let Ok(links) = session.get_links(4096) else {
            return;
        };
        for key in links.iter().filter_map(|node| node.as_key()) {
            if key
                .metadata()
                .is_ok_and(|m| m.get_description() == description)
            {
                let _ = session.unlink_key(key);
            }
        }
    }

    fn keyutils_health(&self) -> (HealthStatus, String) {
        use linux_keyutils::{KeyRing, KeyRingIdentifier};
        let result = self.keyutils_probe();
        if result.is_ok() {
            self.keyutils_ready
                .store(true, std::sync::atomic::Ordering::Release);
        }
        match result {
            Ok(()) => match KeyRing::get_persistent(KeyRingIdentifier::Session) {
                Ok(_) => (HealthStatus::Ok, String::new()),
                Err(e) => (
                    HealthStatus::Degraded,
                    format!(
                        "the kernel gives uid {} no persistent keyring ({e}): secrets live only \
                         as long as this provider's session keyring; run the gateway under \
                         `keyctl session -` so they outlive one provider process",
                        nix::unistd::geteuid().as_raw()
                    ),
                ),
            },
            Err(e) if e.code == ErrorCode::PermissionDenied && e.message.contains("quota") => {
                (HealthStatus::Degraded, e.message)
            }
            Err(e) => (status_of(&e), e.message),
        }
    }
}

#[cfg(target_os = "linux")]
fn bus_description() -> String {
    match std::env::var("DBUS_SESSION_BUS_ADDRESS") {
        Ok(address) if !address.is_empty() => format!("the D-Bus session bus at {address}"),
        _ => {
            let runtime = std::env::var("XDG_RUNTIME_DIR")
                .unwrap_or_else(|_| format!("/run/user/{}", nix::unistd::geteuid().as_raw()));
            format!(
                "the D-Bus session bus (DBUS_SESSION_BUS_ADDRESS is unset, and \
                 {runtime}/bus was tried)"
            )
        }
    }
}

// ---- keyutils limits ---------------------------------------------------------------------------

/// The largest value on keyutils: the `user` key payload limit minus the format byte, and, for
/// users other than root, at most half the per-user key quota
/// (`/proc/sys/kernel/keys/maxbytes`, 20000 bytes by default), which every key of the user shares.
pub fn keyutils_value_cap() -> u32 {
    let payload = crate::options::KEYUTILS_MAX_PAYLOAD - layout::VALUE_OVERHEAD;
    let cap = match keyutils_quota_bytes() {
        Some(quota) => payload.min(quota / 2),
        None => payload,
    };
    u32::try_from(cap).unwrap_or(u32::MAX)
}

#[cfg(target_os = "linux")]
fn keyutils_quota_bytes() -> Option<usize> {
    let file = if nix::unistd::geteuid().is_root() {
        "/proc/sys/kernel/keys/root_maxbytes"
    } else {
        "/proc/sys/kernel/keys/maxbytes"
    };
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

#[cfg(not(target_os = "linux"))]
fn keyutils_quota_bytes() -> Option<usize> {
    None
}

#[cfg(target_os = "linux")]
fn quota_message(what: &str) -> String {
    let (file, uid) = if nix::unistd::geteuid().is_root() {
        ("root_maxbytes and root_maxkeys", 0)
    } else {
        ("maxbytes and maxkeys", nix::unistd::geteuid().as_raw())
    };
    format!(
        "{what}: the kernel key quota of uid {uid} is exhausted (see /proc/key-users and \
         /proc/sys/kernel/keys/{file}); revoke secrets, lower --keep, or raise the quota"
    )
}
