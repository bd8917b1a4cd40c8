//! The file store as a keyhole provider.

use std::sync::Arc;

use keyhole_providers::protocol::{
    Capabilities, Description, HealthReport, HealthStatus, ProviderError, ProviderInfo, SecretBytes,
};
use keyhole_providers::{Page, Provider, Resolved, StoreRequest, page_token};

use crate::error::StoreError;
use crate::store::Store;

/// Default largest value: 512 KiB, within the protocol's sizing rule for 1 MiB frames.
pub const DEFAULT_MAX_VALUE_SIZE: u32 = 512 * 1024;

/// The provider: every operation runs on tokio's blocking pool, because it does file I/O.
pub struct FileProvider {
    store: Arc<Store>,
    versions_kept: u32,
    max_value_size: u32,
}

impl FileProvider {
    /// Serves `store`.
    pub fn new(store: Store, versions_kept: u32, max_value_size: u32) -> FileProvider {
        FileProvider {
            store: Arc::new(store),
            versions_kept,
            max_value_size,
        }
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, ProviderError> {
        let store = Arc::clone(&self.store);
        // If the request is cancelled, the blocking work still finishes and commits durably.
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| ProviderError::internal(format!("a store task failed: {e}")))?
            .map_err(ProviderError::from)
    }
}

impl Provider for FileProvider {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            name: "file".into(),
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
            versions_kept: self.versions_kept,
            max_value_size: self.max_value_size,
        }
    }

    async fn resolve(&self, name: &str, version: Option<&str>) -> Result<Resolved, ProviderError> {
        // A cached record needs no file I/O: answer on this task and skip the blocking pool's
        // two thread hand-offs.
        if let Some(answer) = self.store.resolve_cached(name, version) {
            return answer
                .map(|(value, version)| Resolved { value, version })
                .map_err(Into::into);
        }
        let (name, version) = (name.to_string(), version.map(str::to_string));
        self.run(move |s| s.resolve(&name, version.as_deref()))
            .await
            .map(|(value, version)| Resolved { value, version })
    }

    async fn store(&self, request: StoreRequest) -> Result<String, ProviderError> {
        self.run(move |s| {
            s.store(
                &request.name,
                &request.value,
                request.create_only,
                request.labels,
            )
        })
        .await
    }

    async fn rotate(
        &self,
        name: &str,
        value: SecretBytes,
        expected_version: Option<&str>,
    ) -> Result<String, ProviderError> {
        let (name, expected) = (name.to_string(), expected_version.map(str::to_string));
        self.run(move |s| s.rotate(&name, &value, expected.as_deref()))
            .await
    }

    async fn revoke(&self, name: &str) -> Result<(), ProviderError> {
        let name = name.to_string();
        self.run(move |s| s.revoke(&name)).await
    }

    async fn describe(&self, name: &str) -> Result<Description, ProviderError> {
        let name = name.to_string();
        self.run(move |s| s.describe(&name)).await
    }

    async fn list(
        &self,
        prefix: &str,
        page: Option<&str>,
        limit: u32,
    ) -> Result<Page, ProviderError> {
        let prefix = prefix.to_string();
        let after = page.map(page_token::parse).transpose()?;
        self.run(move |s| s.list(&prefix, after.as_deref(), limit as usize))
            .await
            .map(|(entries, last)| Page {
                entries,
                next_page: last.map(|n| page_token::after(&n)),
            })
    }

    async fn health(&self) -> HealthReport {
        match self
            .run(|s| s.describe("\u{1}health-probe").map(|_| ()))
            .await
        {
            Ok(()) => HealthReport {
                status: HealthStatus::Ok,
                detail: String::new(),
            },
            Err(e) if e.code == keyhole_providers::protocol::ErrorCode::NotFound => HealthReport {
                status: HealthStatus::Ok,
                detail: String::new(),
            },
            Err(e) => HealthReport {
                status: HealthStatus::Unavailable,
                detail: format!("the store cannot be read: {}", e.message),
            },
        }
    }
}
