//! The provider `keyhole serve` picks when nothing configured one: the OS keychain when a Secret
//! Service answers, and otherwise the envelope-encrypted file store.
//!
//! "Answers" means the keychain provider started, shook hands and reported its health as `Ok`
//! or `Locked` within a deadline. A locked collection still counts: it is the user's keychain,
//! and the desktop unlocks it at login; splitting their secrets across two stores would be worse.
//! Without a session bus the probe does not even start the provider, so a headless start costs
//! nothing.

use std::time::Duration;

use keyhole_protocol::{Encoding, HealthStatus, Op, Outcome, Reply};
use keyhole_transport::client::Client;
use keyhole_transport::spawn::{SpawnOptions, spawn};

use crate::config::{
    Config, EMBEDDED_KEYCHAIN, EMBEDDED_PROVIDER, EMBEDDED_PROVIDER_COMMAND, ProviderConfig,
};

/// The longest the probe may take, start-up, Health and shutdown included.
const PROBE_DEADLINE: Duration = Duration::from_secs(5);

/// The file in the data directory that remembers the first choice, so that a later start
/// where the Secret Service happens not to answer (the session bus not up yet) does not send
/// new secrets to another store than the old ones.
pub const CHOICE_FILE: &str = "default-provider";

/// The choice, for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The provider picked.
    pub provider: String,
    /// Why, in a sentence fragment that follows "because".
    pub reason: String,
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "default provider: {}, because {}",
            self.provider, self.reason
        )
    }
}

/// Picks the default provider when `config` leaves it to the defaults, and rewrites its provider
/// set to match: `{keychain}` (plus `file` if its store already exists, so old handles keep
/// resolving), or `{file}`. Returns `None` when the configuration had already decided.
pub async fn choose(config: &mut Config) -> Option<Choice> {
    let candidate = config.auto_default.take()?;
    let remembered = config.data_dir.join(CHOICE_FILE);
    let earlier = std::fs::read_to_string(&remembered).ok();
    let probed = match (candidate, earlier.as_deref().map(str::trim)) {
        (Ok(keychain), Some(EMBEDDED_KEYCHAIN)) => Ok((
            keychain,
            format!(
                "it was chosen when this data directory was first used ({}; delete it to \
                 choose again)",
                remembered.display()
            ),
        )),
        (Err(why), Some(EMBEDDED_KEYCHAIN)) => Err(format!(
            "{why}, although {} says keychain: secrets stored in the keychain will not \
             resolve until it is installed",
            remembered.display()
        )),
        (_, Some(EMBEDDED_PROVIDER)) => Err(format!(
            "it was chosen when this data directory was first used ({}; delete it to choose \
             again)",
            remembered.display()
        )),
        (Err(why), _) => Err(why),
        (Ok(keychain), _) => probe(&keychain, config.handshake_timeout)
            .await
            .map(|reason| (keychain, reason)),
    };
    let choice = match probed {
        Ok((keychain, reason)) => {
            let store_exists = config.data_dir.join("file-store/header.json").exists();
            if !store_exists {
                config.providers.remove(EMBEDDED_PROVIDER);
            }
            config
                .providers
                .insert(EMBEDDED_KEYCHAIN.to_owned(), keychain);
            config.default_provider = EMBEDDED_KEYCHAIN.to_owned();
            Choice {
                provider: EMBEDDED_KEYCHAIN.to_owned(),
                reason,
            }
        }
        Err(why) => Choice {
            provider: EMBEDDED_PROVIDER.to_owned(),
            reason: format!(
                "{why}; secrets go to {EMBEDDED_PROVIDER_COMMAND}'s encrypted store in {}",
                config.data_dir.join("file-store").display()
            ),
        },
    };
    if earlier.is_none()
        && let Err(e) = std::fs::write(&remembered, format!("{}\n", choice.provider))
    {
        tracing::warn!(
            "cannot remember the default provider in {}: {e}",
            remembered.display()
        );
    }
    Some(choice)
}

/// Starts the keychain provider and asks its health. `Ok` holds why it qualifies; `Err` why not.
async fn probe(keychain: &ProviderConfig, handshake_timeout: Duration) -> Result<String, String> {
    let ProviderConfig::Spawn { command, args, env } = keychain else {
        return Err("the keychain provider is not one keyhole starts".into());
    };
    let bus = std::env::var_os("DBUS_SESSION_BUS_ADDRESS").filter(|v| !v.is_empty());
    if bus.is_none() {
        return Err(
            "there is no D-Bus session bus (DBUS_SESSION_BUS_ADDRESS is unset), so no Secret \
             Service can answer"
                .into(),
        );
    }
    let deadline = tokio::time::Instant::now() + PROBE_DEADLINE;
    let left = || {
        deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_millis(1))
    };
    let mut options = SpawnOptions::new(command, args.clone(), Encoding::Bincode);
    options.env = env.iter().map(|(k, v)| (k.into(), v.into())).collect();
    // Spawn and handshake get at most 60% of the budget, so Health always has some.
    options.handshake_timeout = handshake_timeout.min(PROBE_DEADLINE * 3 / 5);
    let (mut process, conn) = spawn(&options)
        .await
        .map_err(|e| format!("{} did not start: {e}", command.display()))?;
    let (events, _ignored) = keyhole_transport::client::event_channel();
    let client = Client::start(conn.reader, conn.writer, conn.ack, events);
    let answer = client.call(Op::Health {}, left()).await;
    drop(client);
    // kill() waits for the process group to go; it is a SIGKILL, so this is brief.
    process.kill().await;
    match answer {
        Ok(Outcome::Ok(Reply::Health(report))) => match report.status {
            HealthStatus::Ok => Ok("a Secret Service answered on the D-Bus session bus".into()),
            HealthStatus::Locked => Ok(format!(
                "a Secret Service answered on the D-Bus session bus (its collection is locked: \
                 {}; resolves fail until it is unlocked)",
                report.detail
            )),
            other => Err(format!(
                "the Secret Service is not usable ({other:?}: {})",
                report.detail
            )),
        },
        Ok(Outcome::Ok(other)) => Err(format!(
            "the keychain provider answered Health with {other:?}"
        )),
        Ok(Outcome::Err(e)) => Err(format!("the keychain provider's health check failed: {e}")),
        Err(e) => Err(format!("the keychain provider did not answer: {e}")),
    }
}
