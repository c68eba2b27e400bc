//! `tunnel-core`: what every binary of the project shares, the relay included.
//!
//! # Layout
//! | module | kind | holds |
//! |---|---|---|
//! | [`identity`] | pure + key files | P-256 keys, fingerprints, key files (0600, no symlinks) |
//! | [`secret`] | pure | [`secret::Secret`]: tokens and passwords (zeroized, redacted, constant-time) |
//! | [`codec`] | pure | the frame codec (`len ‖ postcard ‖ crc32`) |
//! | [`framed`] | IO | frames on QUIC streams |
//! | [`transport`] | IO | UDP sockets (direct and relayed paths), quinn endpoints, TLS configs, pinning verifiers |
//! | [`jwt`] | pure + JWKS file | JWTs of an identity provider (ES256, RS256) as an alternative to tokens |
//! | [`limits`] | pure | sources (IPv4, IPv6 /64), token buckets, the handshake gate |
//! | [`relay`] | pure | the relay leg protocol: hello, events, codes, token hashes, datagram tags |
//! | [`stun`] | pure | STUN binding requests and responses (a socket's reflexive address) |
//! | [`fsutil`] | IO | atomic writes, private dirs and files, locks |
//! | [`shutdown`] | IO | SIGINT/SIGTERM: graceful first, immediate second |
//! | [`sdnotify`] | IO | systemd's readiness, reload, stopping and watchdog notifications |
//! | [`metrics`] | IO | Prometheus metrics: registry, scrape-time sources, connection histograms, the HTTP exporter |
//! | [`logging`] | IO | the binaries' log output: text or JSON lines on stderr |
//!
//! Nothing here knows about devices, users, access control or pairing: those live in
//! `tunnel-shared`, which depends on this crate, never the other way round. The relay
//! (`tunnel-relay`, DESIGN §13) depends on this crate alone, so the compiler keeps it from
//! pulling in device, IAM or pairing code.
//!
//! Pure modules do no IO and read no clock. No `unsafe` anywhere.

#![warn(
    missing_docs,
    clippy::missing_errors_doc,
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::too_many_lines
)]

pub mod codec;
pub mod framed;
pub mod fsutil;
pub mod identity;
pub mod jwt;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod relay;
pub mod sdnotify;
pub mod secret;
pub mod shutdown;
pub mod stun;
pub mod transport;
