//! `tunnel-client`: reaches a device's TCP services through local listeners, over one
//! authenticated QUIC connection per device.
//!
//! Thin binary: parse arguments, call `tunnel_shared::client`, render status, map errors to exit
//! codes (0 ok, 1 runtime failure, 2 usage or configuration error).

#![allow(
    rustdoc::broken_intra_doc_links,
    reason = "doc comments here are --help text, where [..] marks optional parts"
)]

mod status;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tunnel_shared::client::open::{ForwardSpec, OpenOptions, Opener};
use tunnel_shared::client::{ClientError, ClientHome, ConnectOptions, connect};
use tunnel_shared::config::{HostPort, default_client_home};
use tunnel_shared::identity::Fingerprint;
use tunnel_shared::transport;

/// Reach a device's TCP services (ssh, a camera's RTSP, a web UI) through local listeners carried
/// over an authenticated, encrypted QUIC tunnel. Devices are pinned by key fingerprint, like
/// ssh's known_hosts.
///
/// Quick start: `tunnel-client fingerprint` (give it to the device's owner), `tunnel-client device
/// add cam --addr HOST:5592 --fingerprint DEVICE_FP`, then `tunnel-client open cam -L 2222:ssh`
/// and `ssh -p 2222 127.0.0.1`.
#[derive(Debug, Parser)]
#[command(name = "tunnel-client", version, max_term_width = 100)]
struct Cli {
    /// Client home directory (key and known devices).
    /// [default: $XDG_CONFIG_HOME/tunnel-client or ~/.config/tunnel-client]
    #[arg(long, global = true, env = "TUNNEL_CLIENT_HOME", value_name = "DIR")]
    home: Option<PathBuf>,

    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides it).
    #[arg(long, global = true, default_value = "info", value_name = "LEVEL")]
    log_level: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print this client's key fingerprint (creating the key on first use).
    Fingerprint,
    /// Pin devices by hand.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// List known devices.
    Devices {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Forget a known device (by name, id or fingerprint prefix of at least 16 hex).
    Forget {
        /// The device.
        device: String,
    },
    /// List the services a device offers you.
    Services {
        /// The device (name, id or fingerprint prefix).
        device: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Forward local ports to a device's services until SIGINT/SIGTERM.
    Open {
        /// The device (name, id or fingerprint prefix).
        device: String,
        /// A forward, repeatable: [BIND:]PORT:SERVICE. BIND defaults to 127.0.0.1 (IPv6 in
        /// brackets); PORT 0 picks a free port.
        #[arg(
            short = 'L',
            long = "local",
            value_name = "[BIND:]PORT:SERVICE",
            required = true
        )]
        forwards: Vec<ForwardSpec>,
        /// Write one JSON object here once listening: pid, fingerprint, device, and each
        /// service's local address.
        #[arg(long, value_name = "PATH")]
        ready_file: Option<PathBuf>,
        /// Seconds a local connection waits for the device before it is reset.
        #[arg(long, default_value_t = 15, value_name = "SECS")]
        connect_wait: u64,
        /// Seconds live tunnels may continue after a shutdown signal.
        #[arg(long, default_value_t = 2, value_name = "SECS")]
        drain_timeout: u64,
    },
}

#[derive(Debug, Subcommand)]
enum DeviceCmd {
    /// Pin a device: its addresses and key fingerprint (like a known_hosts line).
    Add {
        /// Local name for the device.
        name: String,
        /// HOST:PORT, repeatable (tried in order). HOST may be IPv4, [IPv6] or a DNS name.
        #[arg(long = "addr", value_name = "HOST:PORT", required = true)]
        addrs: Vec<HostPort>,
        /// The device's full key fingerprint (64 hex; `tunnel-device fingerprint` prints it).
        #[arg(long)]
        fingerprint: Fingerprint,
    },
}

struct Failure {
    code: u8,
    message: String,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Self {
            code: e.exit_code(),
            message: e.to_string(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    status::init_tracing(&cli.log_level);
    let Some(home) = cli.home.clone().or_else(default_client_home) else {
        eprintln!("error: cannot find a home directory: pass --home DIR or set TUNNEL_CLIENT_HOME");
        return ExitCode::from(2);
    };
    let home = ClientHome::new(home);
    match dispatch(cli.command, home) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            status::clear();
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// A single-threaded runtime: `open` drives one QUIC connection, and keeping its driver and the
/// splice tasks on one thread avoids cross-thread wake-ups (measured +50 % throughput on
/// loopback, docs/BENCHMARKS.md).
fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure {
            code: 1,
            message: format!("cannot start the async runtime: {e}"),
        })
}

fn dispatch(command: Command, home: ClientHome) -> Result<(), Failure> {
    match command {
        Command::Fingerprint => {
            let id = home.identity()?;
            println!("{}", id.fingerprint());
        }
        Command::Device(DeviceCmd::Add {
            name,
            addrs,
            fingerprint,
        }) => {
            let dev = home.add_device(&name, addrs, fingerprint)?;
            let addrs: Vec<String> = dev.addresses.iter().map(ToString::to_string).collect();
            println!(
                "Pinned device '{}' at {} with key {}",
                dev.name,
                addrs.join(", "),
                dev.fingerprint
            );
        }
        Command::Devices { json } => {
            let known = home.known_devices()?;
            if json {
                let v: Vec<_> = known
                    .devices
                    .iter()
                    .map(|d| {
                        serde_json::json!({
                            "name": d.name,
                            "fingerprint": d.fingerprint.to_string(),
                            "addresses": d.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                            "device_id": d.device_id,
                            "user": d.user,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else if known.devices.is_empty() {
                println!(
                    "No known devices. Pin one with: tunnel-client device add NAME --addr HOST:PORT --fingerprint FP"
                );
            } else {
                println!(
                    "{:<16} {:<24} {:<18} {:<10} ADDRESSES",
                    "NAME", "DEVICE ID", "FINGERPRINT", "USER"
                );
                for d in &known.devices {
                    let addrs: Vec<String> = d.addresses.iter().map(ToString::to_string).collect();
                    println!(
                        "{:<16} {:<24} {:<18} {:<10} {}",
                        d.name,
                        d.device_id.as_deref().unwrap_or("-"),
                        d.fingerprint.fmt_short(),
                        d.user.as_deref().unwrap_or("-"),
                        addrs.join(", ")
                    );
                }
            }
        }
        Command::Forget { device } => {
            let d = home.forget(&device)?;
            println!("Forgot device '{}' ({})", d.name, d.fingerprint);
        }
        Command::Services { device, json } => {
            runtime()?.block_on(services_cmd(home, &device, json))?;
        }
        Command::Open {
            device,
            forwards,
            ready_file,
            connect_wait,
            drain_timeout,
        } => {
            let mut opts = OpenOptions::new(home, device, forwards);
            opts.ready_file = ready_file;
            opts.connect_wait = Duration::from_secs(connect_wait);
            opts.drain_timeout = Duration::from_secs(drain_timeout);
            runtime()?.block_on(open_cmd(opts))?;
        }
    }
    Ok(())
}

async fn services_cmd(home: ClientHome, device: &str, json: bool) -> Result<(), ClientError> {
    let identity = home.identity()?;
    let dev = home.find_device(device)?;
    let opts = ConnectOptions::default();
    let endpoint = transport::client_endpoint(&opts.transport)?;
    let session = connect(&endpoint, &identity, &dev, &opts).await?;
    if let Err(e) = home.remember(&dev.name, &session.welcome) {
        tracing::warn!("could not update known_devices.toml: {e}");
    }
    let services = session.services().await?;
    session.close();
    endpoint.wait_idle().await;
    if json {
        let v: Vec<_> = services
            .iter()
            .map(
                |s| serde_json::json!({"id": s.id, "type": s.service_type, "metadata": s.metadata}),
            )
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else if services.is_empty() {
        println!("Device '{}' offers you no services.", dev.name);
    } else {
        println!("{:<16} {:<8} METADATA", "ID", "TYPE");
        for s in services {
            let meta: Vec<String> = s.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("{:<16} {:<8} {}", s.id, s.service_type, meta.join(" "));
        }
    }
    Ok(())
}

async fn open_cmd(opts: OpenOptions) -> Result<(), ClientError> {
    let opener = Opener::bind(opts).await?;
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let display = status::spawn(
        opener.status(),
        std::io::stdout().is_terminal(),
        shutdown.clone(),
    );
    let result = opener.run(shutdown.clone()).await;
    shutdown.cancel();
    let _ = display.await;
    result
}

/// First SIGINT/SIGTERM: graceful shutdown. Second: exit at once.
fn spawn_signal_handler(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    tokio::spawn(async move {
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            tracing::warn!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("signal received: closing (send it again to exit at once)");
        shutdown.cancel();
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        status::clear();
        eprintln!("second signal: exiting now");
        std::process::exit(130);
    });
}
