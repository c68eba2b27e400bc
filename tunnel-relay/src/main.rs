//! `tunnel-relay`: lets clients reach devices behind NAT through an end-to-end encrypted relay.
//!
//! Thin binary: parse arguments, call `tunnel_relay`, map errors to exit codes (0 ok, 1 runtime
//! failure, 2 usage or configuration error).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tunnel_core::identity::{Fingerprint, KeyFileError};
use tunnel_core::sdnotify;
use tunnel_relay::home::{HomeError, RelayHome};
use tunnel_relay::{RelayError, RunOptions};

/// Relay end-to-end encrypted tunnel connections to devices behind NAT (the basestation).
///
/// Devices attach with an outbound connection, authenticated by their key; clients name a device
/// and present its server-connect token, which the relay checks before it forwards anything. The
/// relay never sees tunnelled data: client and device speak TLS 1.3 with each other through it.
///
/// Quick start: `tunnel-relay init`, `tunnel-relay device add ID --fingerprint FP` (the device's
/// `tunnel-device fingerprint`), `tunnel-relay run`; on the device `tunnel-device relay add
/// HOST:5593 --fingerprint RELAY_FP` (this relay's `tunnel-relay fingerprint`).
#[derive(Debug, Parser)]
#[command(name = "tunnel-relay", version, max_term_width = 100)]
struct Cli {
    /// Relay home directory (relay.key, relay.toml).
    /// [default: $XDG_DATA_HOME/tunnel-relay or ~/.local/share/tunnel-relay]
    #[arg(long, global = true, env = "TUNNEL_RELAY_HOME", value_name = "DIR")]
    home: Option<PathBuf>,

    #[command(flatten)]
    log: tunnel_cli::LogArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the home: a key (if none) and relay.toml.
    Init {
        /// UDP address to listen on, repeatable [default: 0.0.0.0:5593].
        #[arg(long, value_name = "ADDR")]
        listen: Vec<SocketAddr>,
        /// Overwrite an existing relay.toml (its device list is lost; the key is kept).
        #[arg(long)]
        force: bool,
    },
    /// Serve until SIGINT or SIGTERM (a second signal exits at once).
    Run {
        /// UDP address to listen on, repeatable; overrides relay.toml.
        #[arg(long, value_name = "ADDR")]
        listen: Vec<SocketAddr>,
        /// Write a JSON object (pid, fingerprint, bound addresses) here once listening.
        #[arg(long, value_name = "PATH")]
        ready_file: Option<PathBuf>,
    },
    /// Print the relay's key fingerprint (devices and clients pin it).
    Fingerprint,
    #[command(flatten)]
    Docs(tunnel_cli::DocsCommand),
    /// The devices this relay serves.
    #[command(subcommand)]
    Device(DeviceCmd),
}

#[derive(Debug, Subcommand)]
enum DeviceCmd {
    /// Serve a device: only a connection with this key may attach as ID (a running relay picks
    /// it up within a second).
    Add {
        /// The device id (`tunnel-device`'s device_id).
        id: String,
        /// The device's key fingerprint (`tunnel-device fingerprint`).
        #[arg(long)]
        fingerprint: Fingerprint,
    },
    /// Stop serving a device; a running relay closes its connections.
    Remove {
        /// The device id.
        id: String,
    },
    /// List the devices served.
    List {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
}

struct Failure {
    code: u8,
    message: String,
}

fn home_code(e: &HomeError) -> u8 {
    match e {
        HomeError::Config { .. }
        | HomeError::NotInitialised(_)
        | HomeError::AlreadyInitialised(_)
        | HomeError::Untrusted { .. }
        | HomeError::NoSuchDevice(_) => 2,
        HomeError::Key(
            KeyFileError::Unprotected { .. }
            | KeyFileError::Invalid { .. }
            | KeyFileError::Untrusted { .. },
        ) => 2,
        HomeError::Key(KeyFileError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            2
        }
        HomeError::Key(_) | HomeError::Io { .. } => 1,
    }
}

/// One table: the exit status of each cause.
fn exit_code(e: &RelayError) -> u8 {
    match e {
        RelayError::Home(h) => home_code(h),
        RelayError::Jwt(_) | RelayError::Fleet(_) => 2,
        RelayError::Transport(_)
        | RelayError::TcpBind { .. }
        | RelayError::AlreadyRunning(_)
        | RelayError::Metrics { .. }
        | RelayError::Io { .. } => 1,
    }
}

impl From<RelayError> for Failure {
    fn from(e: RelayError) -> Self {
        Self {
            code: exit_code(&e),
            message: e.to_string(),
        }
    }
}

impl From<HomeError> for Failure {
    fn from(e: HomeError) -> Self {
        RelayError::Home(e).into()
    }
}

fn default_home() -> Option<PathBuf> {
    std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .map(|d| d.join("tunnel-relay"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli.log.init("info", "tunnel_relay", std::io::stderr);
    let Some(home) = cli.home.clone().or_else(default_home) else {
        eprintln!("error: cannot find a home directory: pass --home DIR or set TUNNEL_RELAY_HOME");
        return ExitCode::from(2);
    };
    match dispatch(cli.command, &RelayHome::new(home)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn dispatch(command: Command, home: &RelayHome) -> Result<(), Failure> {
    match command {
        Command::Init { listen, force } => {
            let fp = home.init(&listen, force)?;
            println!("Initialised the relay in {}", home.dir().display());
            println!("Relay fingerprint: {fp}");
            println!(
                "Next: serve a device with `tunnel-relay device add ID --fingerprint FP`, start \
                 `tunnel-relay run`, and on the device run `tunnel-device relay add \
                 HOST:PORT --fingerprint {fp}`."
            );
        }
        Command::Run { listen, ready_file } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Failure {
                    code: 1,
                    message: format!("cannot start the async runtime: {e}"),
                })?;
            let mut opts = RunOptions::new(home.dir());
            opts.listen = listen;
            opts.ready_file = ready_file;
            rt.block_on(async {
                let shutdown = CancellationToken::new();
                tunnel_core::shutdown::spawn_signal_handler(shutdown.clone(), || {});
                sdnotify::attach(&shutdown);
                tunnel_relay::run(opts, shutdown, |r| {
                    let listen: Vec<String> = r.listen.iter().map(ToString::to_string).collect();
                    sdnotify::ready(&format!(
                        "relaying for {} devices on {}",
                        r.devices,
                        listen.join(", ")
                    ));
                })
                .await
            })?;
        }
        Command::Docs(docs) => docs
            .run(Cli::command())
            .map_err(|message| Failure { code: 1, message })?,
        Command::Fingerprint => println!("{}", home.load_key()?.fingerprint()),
        Command::Device(DeviceCmd::Add { id, fingerprint }) => {
            home.add_device(&id, &fingerprint)?;
            println!("Serving device '{id}' (key {})", fingerprint.fmt_short());
        }
        Command::Device(DeviceCmd::Remove { id }) => {
            home.remove_device(&id)?;
            println!("No longer serving device '{id}'");
        }
        Command::Device(DeviceCmd::List { json }) => {
            let devices = home.devices()?;
            if json {
                let v: Vec<_> = devices
                    .iter()
                    .map(|d| serde_json::json!({"id": d.id, "fingerprint": d.fingerprint.to_string()}))
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else if devices.is_empty() {
                println!("No devices (add one with `tunnel-relay device add ID --fingerprint FP`)");
            } else {
                println!("{:<24} FINGERPRINT", "ID");
                for d in devices {
                    println!("{:<24} {}", d.id, d.fingerprint);
                }
            }
        }
    }
    Ok(())
}
