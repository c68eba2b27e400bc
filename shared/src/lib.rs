//! `tunnel-shared`: the device and client logic behind `tunnel-device` and `tunnel-client`.
//!
//! # Layout
//! | module | kind | holds |
//! |---|---|---|
//! | [`identity`], [`secret`], [`fsutil`], [`framed`], [`transport`], [`shutdown`], [`limits`], [`relay`], [`jwt`] | re-exported | from `tunnel-core`: keys, secrets, files, frames, QUIC and relayed paths, signals, limits, the relay leg protocol, JWTs |
//! | [`proto`] | pure | ALPN, messages, stream header, close/reject/error codes |
//! | [`wire`] | IO | the tunnel protocol on QUIC: hello, control calls, tunnel stream headers |
//! | [`config`] | pure + file edge | `device.toml`, `HOST:PORT`, networks, identifiers |
//! | [`iam`] | pure (+ `iam.toml` loader) | actions, policies, roles, evaluation |
//! | [`authz`] | pure | who a connection is, admission, every decision, re-enforcement actions |
//! | [`pairing`] | pure | modes, pairing strings, SPAKE2 with channel binding, limiter, password flow |
//! | [`sanitize`] | pure | peer strings made safe to print (control and bidi characters escaped) |
//! | [`state`] | pure + [`state::StateStore`] | `state.json`: users; locked, atomic updates |
//! | [`splice`] | IO | TCP ⇄ QUIC stream copy with the half-close / reset contract |
//! | [`discovery`] | IO | mDNS announcement and browsing (`_tunnel._udp.local`) |
//! | [`device`] | IO | the device's [`device::run`], control requests and file-management commands |
//! | [`client`] | IO | the client's home, sessions, pairing and [`client::open`] (port forwarding) |
//!
//! Dependency direction: `tunnel-core` ← pure modules (`proto`, `config`, `iam`, `pairing`,
//! `state`, `authz`) ← IO modules (`wire`, `splice`, `device`, `client`). Pure modules do no IO
//! and read no clock. Peers only ever see codes, never local error details. No `unsafe` anywhere.
//!
//! # Panics
//! Library code does not panic on peer or file input: decoders check lengths before allocating and
//! there is no `unwrap` on untrusted data. The binaries keep the default `panic = "unwind"`, so a
//! bug in one connection's task ends that task, not the process.

#![warn(
    missing_docs,
    clippy::missing_errors_doc,
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::too_many_lines
)]

pub use tunnel_core::{
    framed, fsutil, identity, jwt, limits, logging, metrics, relay, sdnotify, secret, shutdown,
    transport,
};

pub mod authz;
pub mod client;
pub mod config;
pub mod device;
pub mod discovery;
#[doc(hidden)]
pub mod fuzzing;
pub mod iam;
pub mod pairing;
pub mod proto;
pub mod sanitize;
pub mod splice;
pub mod state;
pub mod wire;
