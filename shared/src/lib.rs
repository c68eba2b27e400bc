//! `tunnel-shared`: everything `tunnel-device` and `tunnel-client` share.
//!
//! # Layout
//! | module | kind | holds |
//! |---|---|---|
//! | [`identity`] | pure + key files | P-256 keys, fingerprints, key files (0600, no symlinks) |
//! | [`secret`] | pure | [`secret::Secret`]: tokens and passwords (zeroized, redacted, constant-time) |
//! | [`proto`] | pure | ALPN, messages, frame codec, close and reject codes |
//! | [`config`] | pure + file edge | `device.toml`, `known_devices.toml`, `HOST:PORT` values |
//! | [`iam`] | pure (+ `iam.toml` loader) | actions, policies, roles, evaluation, `explain` |
//! | [`pairing`] | pure | pairing modes, pairing strings, SPAKE2 with channel binding, attempt limiter |
//! | [`state`] | pure + [`state::StateStore`] | `state.json`: users; locked, atomic updates |
//! | [`fsutil`] | IO | atomic writes, private dirs and files, locks |
//! | [`transport`] | IO | UDP sockets, quinn endpoints, TLS configs, pinning verifiers |
//! | [`framed`] | IO | frames on QUIC streams |
//! | [`splice`] | IO | TCP ⇄ QUIC stream copy with the half-close / reset contract |
//! | [`shutdown`] | IO | SIGINT/SIGTERM: graceful first, immediate second |
//! | [`device`] | IO | the device's [`device::run`], control requests and file-management commands |
//! | [`discovery`] | IO | mDNS announcement and browsing (`_tunnel._udp.local`) |
//! | [`client`] | IO | connecting, control requests, and [`client::open`] (port forwarding) |
//!
//! Pure modules do no IO and read no clock. Peers only ever see codes, never local error details.
//! No `unsafe` anywhere.
//!
//! # Panics
//! Library code does not panic on peer or file input: decoders check lengths before allocating and
//! there is no `unwrap` on untrusted data. The binaries keep the default `panic = "unwind"`, so a
//! bug in one connection's task ends that task, not the process.

#![warn(
    missing_docs,
    clippy::missing_errors_doc,
    clippy::print_stdout,
    clippy::print_stderr
)]

pub mod client;
pub mod config;
pub mod device;
pub mod discovery;
pub mod framed;
pub mod fsutil;
pub mod iam;
pub mod identity;
pub mod pairing;
pub mod proto;
pub mod secret;
pub mod shutdown;
pub mod splice;
pub mod state;
pub mod transport;
