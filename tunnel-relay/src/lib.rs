//! `tunnel-relay`: lets clients reach devices behind NAT (DESIGN §13, docs/RELAY.md).
//!
//! Devices keep an outbound QUIC connection (a *leg*) to the relay, authenticated by their key;
//! the relay serves a device id only to the key `relay.toml` names for it. A client opens a leg,
//! names the device and presents its server-connect token (or a JWT); the relay checks the
//! token's hash against those the device uploaded, and only then forwards. The client ⇄ device
//! QUIC connection runs end to end inside QUIC DATAGRAM frames of the two legs: the relay moves
//! opaque packets and never holds an inner key, and the device checks the token again itself.
//!
//! # Layout
//! | module | kind | holds |
//! |---|---|---|
//! | [`config`] | pure | `relay.toml`: listen, limits, `[jwt]`, the devices served; comment-keeping edits |
//! | [`home`] | IO (files) | the home (`relay.key`, `relay.toml`), `init`, `device add/remove/list` |
//! | `hub` | IO | one device's meeting point: its leg, its clients' channels, token hashes, forwarding |
//! | [`server`] | IO | [`run`]: endpoints, reload, counters, shutdown |
//! | `leg` | IO | one leg: the handshake gate, the first frame, a device's attachment or a client's channel |
//! | `metrics` | IO | what `[metrics] listen` exports: legs, devices, channels, forwarding, refusals, RTT |
//! | `registry` | IO | `[fleet]`: the Redis registry (device id → relay, token hashes, TTL) behind redirects |
//!
//! This crate depends on `tunnel-core` only (codec, identity, transport, limits, the leg
//! protocol): never on device, IAM or pairing code.

#![warn(
    missing_docs,
    clippy::missing_errors_doc,
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::too_many_lines
)]

pub mod config;
pub mod home;
mod hub;
mod leg;
mod metrics;
mod registry;
pub mod server;

pub use server::{Ready, RelayError, RunOptions, run};
