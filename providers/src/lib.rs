//! The keyhole provider SDK.
//!
//! Implement [`Provider`] and hand it to [`main`] (or [`serve`], if your binary has its own command
//! line). The SDK does everything the protocol requires of every provider, identically for all
//! of them: the handshake with a constant-time token check, concurrent requests answered out of
//! order, deadlines, `Cancel`, `Goodbye`, the frame cap, input validation, declared-capability
//! checks, and exiting when the gateway goes away. Your provider only implements the operations.
//!
//! [`testing::Harness`] runs a provider in-process over an in-memory pipe, through the same serve
//! loop and the real wire encoding, for unit tests.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod cli;
mod provider;
mod serve;
pub mod testing;
mod watcher;

pub use cli::{ServeArgs, ServeMode, init_tracing, main, serve};
pub use keyhole_protocol as protocol;
pub use provider::{Page, Provider, Resolved, StoreRequest, WatchChange, page_token};
pub use serve::{ConnectionEnd, ServeOptions, dispatch, serve_connection};
pub use watcher::Watcher;
