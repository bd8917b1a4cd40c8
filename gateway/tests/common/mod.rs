//! Helpers shared by the gateway's integration tests.

use std::path::PathBuf;

/// A binary of another workspace package, built beside this test by `cargo build --workspace`.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary knows its path");
    let path = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("the test binary lives in target/<profile>/deps")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: cargo build --workspace --bins",
        path.display()
    );
    path
}
