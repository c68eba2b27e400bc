//! QUIC transport settings shared by every end (`[transport]` in `device.toml`), range-checked.
//!
//! Kind: pure.

use serde::{Deserialize, Serialize};

/// QUIC transport tuning shared by both ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportSettings {
    /// A connection with no packets for this long is dead.
    pub idle_timeout_secs: u64,
    /// Interval of keep-alive packets (keeps NAT bindings open).
    pub keep_alive_secs: u64,
    /// Per-stream receive window in bytes (bounds one stream's in-flight data). 6 MiB by
    /// default: larger windows let a lossy, rate-policed path leave more than quinn-proto's 1,024
    /// gaps in one stream's reassembly buffer, and quinn then closes the connection ("too many
    /// gaps in stream buffer"; 8 MiB did in 2 of 5 quick runs of the reliability class "Network
    /// faults between two NATs", 6 MiB in 0 of 12). At 50 ms RTT one stream gets ≈ 0.74 Gbit/s
    /// (8 MiB: 0.89).
    pub stream_window: u64,
    /// Per-connection receive window in bytes (bounds all streams' in-flight data).
    pub connection_window: u64,
    /// Requested UDP socket buffer size in bytes.
    pub socket_buffer: usize,
    /// Congestion controller of the data this end sends. BBR by default: with random loss (Wi-Fi,
    /// cellular) a loss-based controller shrinks its window at every lost packet, BBR does not.
    /// Measured between two namespaces behind NATs, 64 MiB, RTT ≈ 0: at 5 % loss CUBIC took 2.6 s
    /// and BBR 0.35 s, at 20 % loss 48 s and 0.46 s (docs/BENCHMARKS.md); on loopback and through
    /// a 20 Mbit/s bottleneck both were equal.
    pub congestion: Congestion,
    /// Move relayed connections onto a direct path when both ends can reach each other through
    /// their NATs (hole punching). Either end turning it off keeps its connections relayed.
    pub hole_punching: bool,
    /// How legs reach relays: `auto` (UDP, and TLS over TCP to the same port where UDP gets no
    /// answer or cannot carry a full packet), `udp`, or `tcp`.
    pub relay_via: RelayVia,
}

/// How legs reach relays (`[transport] relay_via`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayVia {
    /// UDP, and TCP where UDP gets no answer within a second ([`super::leg::UDP_HEAD_START`]) or its path is too small.
    #[default]
    Auto,
    /// UDP only.
    Udp,
    /// TCP (TLS 1.3) only: for networks known to block UDP.
    Tcp,
}

/// A QUIC congestion controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// CUBIC (RFC 9438), loss-based, as Linux TCP.
    Cubic,
    /// BBR (model-based: bandwidth and round-trip time; random loss does not shrink its window).
    Bbr,
    /// NewReno (RFC 9002's reference controller).
    NewReno,
}

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            idle_timeout_secs: 15,
            keep_alive_secs: 4,
            stream_window: 6 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            socket_buffer: 4 * 1024 * 1024,
            congestion: Congestion::Bbr,
            hole_punching: true,
            relay_via: RelayVia::Auto,
        }
    }
}

/// A transport setting out of its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// `idle_timeout_secs`.
    #[error("transport.idle_timeout_secs must be 1-600")]
    IdleTimeout,
    /// `keep_alive_secs`.
    #[error("transport.keep_alive_secs must be at least 1 and below idle_timeout_secs")]
    KeepAlive,
    /// `stream_window`.
    #[error("transport.stream_window must be between 64 KiB and 1 GiB")]
    StreamWindow,
    /// `connection_window`.
    #[error("transport.connection_window must be at least stream_window and at most 4 GiB")]
    ConnectionWindow,
    /// `socket_buffer`.
    #[error("transport.socket_buffer must be between 64 KiB and 256 MiB")]
    SocketBuffer,
}

impl TransportSettings {
    /// Checks the ranges.
    ///
    /// # Errors
    /// The first setting out of range.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if !(1..=600).contains(&self.idle_timeout_secs) {
            return Err(SettingsError::IdleTimeout);
        }
        if self.keep_alive_secs == 0 || self.keep_alive_secs >= self.idle_timeout_secs {
            return Err(SettingsError::KeepAlive);
        }
        if !(64 * 1024..=1 << 30).contains(&self.stream_window) {
            return Err(SettingsError::StreamWindow);
        }
        if self.connection_window < self.stream_window || self.connection_window > 1 << 32 {
            return Err(SettingsError::ConnectionWindow);
        }
        if !(64 * 1024..=256 * 1024 * 1024).contains(&self.socket_buffer) {
            return Err(SettingsError::SocketBuffer);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_each_range_is_checked() {
        assert_eq!(TransportSettings::default().validate(), Ok(()));
        let d = TransportSettings::default;
        let cases = [
            (
                TransportSettings {
                    idle_timeout_secs: 0,
                    ..d()
                },
                SettingsError::IdleTimeout,
            ),
            (
                TransportSettings {
                    keep_alive_secs: 15,
                    ..d()
                },
                SettingsError::KeepAlive,
            ),
            (
                TransportSettings {
                    stream_window: 1,
                    ..d()
                },
                SettingsError::StreamWindow,
            ),
            (
                TransportSettings {
                    connection_window: 1 << 20,
                    ..d()
                },
                SettingsError::ConnectionWindow,
            ),
            (
                TransportSettings {
                    socket_buffer: 1,
                    ..d()
                },
                SettingsError::SocketBuffer,
            ),
        ];
        for (s, e) in cases {
            assert_eq!(s.validate(), Err(e));
        }
    }
}
