//! The binaries' log output on stderr: human-readable text (coloured on a terminal) or one JSON
//! object per line for log collectors (`--log-format json`).
//!
//! Kind: IO (installs the global `tracing` subscriber; binaries only, once, at start).

use std::fmt;
use std::str::FromStr;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// `--log-format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `2026-12-07T10:00:00Z  INFO message key=value` lines.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `message` and the event's fields.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("'{other}' is not a log format: text or json")),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

/// The filter for `level` on the project's crates (`crates`, e.g. `["tunnel_device"]`, besides
/// `tunnel_core` and `tunnel_shared`), `warn` for everything else.
fn filter_for(level: &str, crates: &[&str]) -> String {
    let mut f = format!("warn,tunnel_core={level},tunnel_shared={level}");
    for c in crates {
        f.push_str(&format!(",{c}={level}"));
    }
    f
}

/// Installs the global subscriber: `RUST_LOG` if set, else `level` for the project's crates;
/// `format` on `writer`. An invalid level falls back to `info` with a warning.
pub fn init<W>(level: &str, crates: &[&str], format: LogFormat, ansi: bool, writer: W)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let wanted = std::env::var("RUST_LOG").unwrap_or_else(|_| filter_for(level, crates));
    let filter = EnvFilter::try_new(&wanted).unwrap_or_else(|_| {
        #[expect(clippy::print_stderr, reason = "no logger exists yet to say it")]
        {
            eprintln!("warning: invalid log level '{level}', using info");
        }
        EnvFilter::new(filter_for("info", crates))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false);
    match format {
        LogFormat::Text => builder.with_ansi(ansi).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_filters() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert!("xml".parse::<LogFormat>().is_err());
        assert_eq!(LogFormat::Json.to_string(), "json");
        assert_eq!(
            filter_for("debug", &["tunnel_relay"]),
            "warn,tunnel_core=debug,tunnel_shared=debug,tunnel_relay=debug"
        );
    }
}
