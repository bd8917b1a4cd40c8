//! An in-process harness for provider authors: the provider runs through the real serve loop and
//! the real encoding, over an in-memory pipe, with no process or socket.
//!
//! ```
//! # async fn demo<P: keyhole_providers::Provider>(provider: P) {
//! use keyhole_providers::testing::Harness;
//! let h = Harness::start(provider).await.expect("handshake");
//! let version = h.store("db/password", b"s3cret").await.expect("store");
//! let got = h.resolve("db/password").await.expect("resolve");
//! assert_eq!(got.value.expose(), b"s3cret");
//! assert_eq!(got.version, version);
//! # }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keyhole_protocol::{
    Capabilities, Description, Encoding, HealthReport, Op, Outcome, ProviderError, Reply,
    SecretBytes, WatchEvent,
};
use keyhole_transport::client::{CallError, Client, HandshakeError, HelloOptions, handshake};
use tokio::sync::mpsc;

use crate::provider::{Provider, Resolved};
use crate::serve::{ServeOptions, serve_connection};

/// A harness call failed: either the provider said no, or the connection failed.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The provider answered with an error.
    #[error("{0}")]
    Provider(#[from] ProviderError),
    /// The connection failed.
    #[error("{0}")]
    Transport(#[from] CallError),
    /// The provider answered with the wrong reply variant.
    #[error("unexpected reply: {0}")]
    Unexpected(String),
}

impl HarnessError {
    /// The provider's error code, if the provider said no.
    pub fn code(&self) -> Option<keyhole_protocol::ErrorCode> {
        match self {
            HarnessError::Provider(e) => Some(e.code),
            _ => None,
        }
    }
}

/// A provider served in-process.
pub struct Harness {
    client: Client,
    events: mpsc::Receiver<WatchEvent>,
    timeout: Duration,
}

impl Harness {
    /// Serves `provider` over bincode and completes the handshake.
    pub async fn start<P: Provider>(provider: P) -> Result<Harness, HandshakeError> {
        Harness::start_with(provider, Encoding::Bincode).await
    }

    /// Serves `provider` over `encoding` and completes the handshake.
    pub async fn start_with<P: Provider>(
        provider: P,
        encoding: Encoding,
    ) -> Result<Harness, HandshakeError> {
        let (ours, theirs) = tokio::io::duplex(256 * 1024);
        let token = keyhole_transport::generate_token()?;
        let provider_token = token.clone();
        let (read, write) = tokio::io::split(theirs);
        tokio::spawn(async move {
            let _ = serve_connection(
                Arc::new(provider),
                Box::new(read),
                Box::new(write),
                &provider_token,
                &ServeOptions::default(),
            )
            .await;
        });
        let (read, write) = tokio::io::split(ours);
        let (reader, writer, ack) = handshake(
            Box::new(read),
            Box::new(write),
            &HelloOptions::new(token, encoding),
            Duration::from_secs(5),
        )
        .await?;
        let (tx, events) = keyhole_transport::client::event_channel();
        Ok(Harness {
            client: Client::start(reader, writer, ack, tx),
            events,
            timeout: Duration::from_secs(5),
        })
    }

    /// The underlying multiplexed client, for anything the helpers do not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The capabilities the provider declared.
    pub fn capabilities(&self) -> &Capabilities {
        &self.client.ack().capabilities
    }

    /// Sends any operation.
    pub async fn call(&self, op: Op) -> Result<Reply, HarnessError> {
        match self.client.call(op, self.timeout).await? {
            Outcome::Ok(reply) => Ok(reply),
            Outcome::Err(e) => Err(HarnessError::Provider(e)),
        }
    }

    /// Resolves the current version.
    pub async fn resolve(&self, name: &str) -> Result<Resolved, HarnessError> {
        self.resolve_version(name, None).await
    }

    /// Resolves a pinned version (or the current one).
    pub async fn resolve_version(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Resolved, HarnessError> {
        match self
            .call(Op::Resolve {
                name: name.into(),
                version: version.map(Into::into),
            })
            .await?
        {
            Reply::Resolved { value, version } => Ok(Resolved { value, version }),
            other => Err(unexpected(&other)),
        }
    }

    /// Stores a value (not create-only, no labels); returns the version.
    pub async fn store(&self, name: &str, value: &[u8]) -> Result<String, HarnessError> {
        match self
            .call(Op::Store {
                name: name.into(),
                value: SecretBytes::copy_from(value),
                create_only: false,
                labels: BTreeMap::new(),
            })
            .await?
        {
            Reply::Stored { version } => Ok(version),
            other => Err(unexpected(&other)),
        }
    }

    /// Rotates to a new value; returns the new version.
    pub async fn rotate(
        &self,
        name: &str,
        value: &[u8],
        expected_version: Option<&str>,
    ) -> Result<String, HarnessError> {
        match self
            .call(Op::Rotate {
                name: name.into(),
                value: SecretBytes::copy_from(value),
                expected_version: expected_version.map(Into::into),
            })
            .await?
        {
            Reply::Rotated { version } => Ok(version),
            other => Err(unexpected(&other)),
        }
    }

    /// Revokes.
    pub async fn revoke(&self, name: &str) -> Result<(), HarnessError> {
        match self.call(Op::Revoke { name: name.into() }).await? {
            Reply::Revoked {} => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Describes.
    pub async fn describe(&self, name: &str) -> Result<Description, HarnessError> {
        match self.call(Op::Describe { name: name.into() }).await? {
            Reply::Described(d) => Ok(d),
            other => Err(unexpected(&other)),
        }
    }

    /// Health.
    pub async fn health(&self) -> Result<HealthReport, HarnessError> {
        match self.call(Op::Health {}).await? {
            Reply::Health(h) => Ok(h),
            other => Err(unexpected(&other)),
        }
    }

    /// The next watch event, waiting at most `deadline`.
    pub async fn next_event(&mut self, deadline: Duration) -> Option<WatchEvent> {
        tokio::time::timeout(deadline, self.events.recv())
            .await
            .ok()
            .flatten()
    }
}

fn unexpected(reply: &Reply) -> HarnessError {
    // Debug of a Reply never prints a value: SecretBytes prints [REDACTED].
    HarnessError::Unexpected(format!("{reply:?}"))
}
