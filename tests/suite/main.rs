//! The integration tests, as one suite: the real `server` and `client` binaries (and the library
//! on its own) on real loopback sockets.
//!
//! One test binary, so one copy of [`support`]: a helper is written once, and one that no test
//! uses any more is reported as dead code. Every server listens on port 0, nothing sleeps to
//! synchronise (tests wait for lines, or poll with a deadline), and every wait is bounded.
//!
//! Run one part with a filter, e.g. `cargo test --test suite hardening::`.

mod support;

mod chat_bus;
mod delivery;
mod hardening;
mod library;
mod load;
mod modes;
mod proxy;
mod scale;
mod server_client;
mod tls;
#[cfg(target_os = "linux")]
mod windows;
