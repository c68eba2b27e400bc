//! In-process tests of the device and client libraries over real QUIC on loopback: the
//! permission matrix, pairing (every mode, races, rate limits, a man in the middle), and
//! server-connect tokens.
//!
//! The devices and clients are `tunnel_testkit::inproc`'s. Locality: the test devices count only `127.0.0.1` as local (`trust_private_networks = false`,
//! `local_networks = ["127.0.0.1/32"]`), so a client bound to `127.0.0.2` is remote.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::missing_panics_doc,
    unreachable_pub,
    reason = "tests: a panic is a failure with a message"
)]

mod hardening;
mod matrix;
mod mitm;
mod pairing;
mod sct;
