//! The causal table: which inbound connection caused each of an app's outbound connections.
//!
//! The preload library (`tracecar-preload`), running inside the app's processes, publishes
//! here the cause of every request the app writes on an outbound TCP connection; the proxy
//! looks the connection up when the request reaches its outbound listener and parents the
//! CLIENT span on the inbound request in flight on the connection that caused it.
//!
//! - [`layout`]: the file format (header, slot words, hash and probing), written once.
//! - [`key`]: the key, an outbound connection as the app sees it.
//! - [`slot`]: one slot's seqlock: consistent reads and non-blocking writes.
//! - [`table`]: the mapped file: [`Table::create`] (proxy), [`Table::open`] (both),
//!   [`Table::lookup`] (proxy), [`Table::publish`] and [`Table::mark_closed`] (library).
//!
//! Nothing here allocates after the file is mapped, blocks, or panics on what it reads from
//! the file: the app's processes write it, so the proxy treats its contents as untrusted. One
//! thing it cannot guard against: an app process that truncates the file makes the next read of
//! the mapping past the new end a `SIGBUS` (only the pod's own app can do that, to its own
//! sidecar; docs/causal.md, "Trust").

#[cfg(target_endian = "big")]
compile_error!("the causal table is little-endian and is read in place");

pub mod key;
pub mod layout;
pub mod slot;
pub mod table;

pub use key::Key;
pub use layout::{DEFAULT_PATH, DEFAULT_SLOTS, ENV_VAR};
pub use table::{Error, Table};
