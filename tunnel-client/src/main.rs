//! `tunnel-client`: reaches a device's TCP services through local listeners, over one
//! authenticated QUIC connection per device.
//!
//! Thin binary: parse arguments, call `tunnel_shared::client`, render status, map errors to exit
//! codes (0 ok, 1 runtime failure, 2 usage or configuration error).

#![allow(
    rustdoc::broken_intra_doc_links,
    reason = "doc comments here are --help text, where [..] marks optional parts"
)]

mod manage;
mod status;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tunnel_shared::client::forwarder::{ForwarderOptions, Status};
use tunnel_shared::client::open::{ForwardSpec, OpenOptions, Opener};
use tunnel_shared::client::pair::{self, LocalPairing, PairOutcome};
use tunnel_shared::client::up::{self, Up};
use tunnel_shared::client::{ClientError, ClientHome, ConnectOptions, Dialer, connect_paired};
use tunnel_shared::client::{forwards, stdio};
use tunnel_shared::config::{HostPort, RelayRef, default_client_home};
use tunnel_shared::discovery;
use tunnel_shared::identity::{Fingerprint, KeyFileError};
use tunnel_shared::pairing::{PairingMode, PairingString};
use tunnel_shared::sdnotify;
use tunnel_shared::secret::Secret;

/// Reach a device's TCP services (ssh, a camera's RTSP, a web UI) through local listeners carried
/// over an authenticated, encrypted QUIC tunnel. Devices are pinned by key fingerprint, like
/// ssh's known_hosts.
///
/// Quick start: `tunnel-client pair PAIRING_STRING` (the string `tunnel-device init` or
/// `user invite` printed), then `tunnel-client open DEVICE -L 2222:ssh` and
/// `ssh -p 2222 127.0.0.1`.
#[derive(Debug, Parser)]
#[command(name = "tunnel-client", version, max_term_width = 100)]
struct Cli {
    /// Client home directory (key and known devices).
    /// [default: $XDG_CONFIG_HOME/tunnel-client or ~/.config/tunnel-client]
    #[arg(long, global = true, env = "TUNNEL_CLIENT_HOME", value_name = "DIR")]
    home: Option<PathBuf>,

    #[command(flatten)]
    log: tunnel_cli::LogArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once per process; boxing would only obscure the clap definition"
)]
enum Command {
    /// Print this client's key fingerprint (creating the key on first use).
    Fingerprint,
    #[command(flatten)]
    Docs(tunnel_cli::DocsCommand),
    /// Pair with a device: with a pairing string (pinned, password-authenticated), or on the
    /// local network by address (--addr) or by discovery (--local), which trusts the key seen
    /// first unless --fingerprint pins it.
    Pair {
        /// The pairing string tunnel-device printed (tp1,d=…,f=…,a=…,…), or - to read it from
        /// standard input. It holds a password: on the command line every local user can read
        /// it (ps), so prefer -, --string-file or the environment variable.
        #[arg(
            value_name = "PAIRING_STRING|-",
            env = "TUNNEL_PAIRING_STRING",
            hide_env_values = true,
            conflicts_with_all = ["local", "string_file"],
            required_unless_present_any = ["addr", "local", "string_file"]
        )]
        string: Option<String>,
        /// Read the pairing string from this file.
        #[arg(long, value_name = "FILE", conflicts_with = "local")]
        string_file: Option<PathBuf>,
        /// Without a pairing string: pair by address on the local network (local initial or
        /// local open pairing). With one: reach the device here instead of at the string's
        /// addresses (a port forward, another port); the key is still pinned by the string's
        /// fingerprint. Repeatable.
        #[arg(long, value_name = "HOST:PORT")]
        addr: Vec<HostPort>,
        /// Pair with a device found by mDNS on the LAN (see `discover`); with several, give
        /// --device.
        #[arg(long, conflicts_with = "addr")]
        local: bool,
        /// With --local: the device id to pair with.
        #[arg(long, requires = "local")]
        device: Option<String>,
        /// With --addr or --local: require this device key instead of trusting the first one.
        #[arg(long)]
        fingerprint: Option<Fingerprint>,
        /// Local name for the device [default: its device id].
        #[arg(long)]
        name: Option<String>,
        /// The user to create (local open and password open pairing).
        #[arg(long)]
        username: Option<String>,
        /// Force a local mode: local-initial or local-open [default: what the device offers].
        #[arg(long)]
        mode: Option<PairingMode>,
        /// A label for this key on the device, e.g. "alice's laptop".
        #[arg(long)]
        key_name: Option<String>,
    },
    /// List devices announcing themselves on the local network (mDNS).
    Discover {
        /// Seconds to listen.
        #[arg(long, default_value_t = 2.0, value_name = "SECS")]
        timeout: f64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pin devices by hand, rename them on the device.
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
        #[command(flatten)]
        run: ForwardingArgs,
    },
    /// Keep every forward of forwards.toml open in one process, for as long as it runs (a
    /// systemd user unit runs this). SIGHUP or `tunnel-client reload` re-reads the file and
    /// adds or removes forwards without touching the others.
    Up {
        #[command(flatten)]
        run: ForwardingArgs,
    },
    /// Make the running `tunnel-client up` re-read forwards.toml (as SIGHUP does).
    Reload,
    /// Edit forwards.toml, the forwards `up` keeps open (a running `up` is reloaded).
    #[command(subcommand)]
    Forward(ForwardCmd),
    /// Carry one connection to a device's service on standard input and output, for ssh's
    /// ProxyCommand (no local port): `ssh -o ProxyCommand='tunnel-client stdio %h ssh' user@cam`.
    /// Exits when the connection ends (1 if the tunnel was refused or broke off). Logs only
    /// warnings unless --log-level says otherwise, so ssh's terminal stays clean.
    Stdio {
        /// The device (name, id or fingerprint prefix; ssh's %h when the Host alias is the
        /// device's name).
        device: String,
        /// The service id, e.g. ssh.
        service: String,
        /// How legs reach relays: auto, udp or tcp (as for open).
        #[arg(long, value_enum, default_value_t = Via::Auto, value_name = "HOW")]
        relay_via: Via,
    },
    /// Manage a device's users (needs a role that allows it, e.g. Owner).
    User {
        /// The device.
        device: String,
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Show or switch a device's pairing modes (needs a role that allows it, e.g. Owner).
    Pairing {
        /// The device.
        device: String,
        #[command(subcommand)]
        cmd: PairingCmd,
    },
}

/// What `open` and `up` share.
#[derive(Debug, clap::Args)]
struct ForwardingArgs {
    /// Write one JSON object here once listening (pid, fingerprint, and per device its state,
    /// path and forwards), rewritten on every change.
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    /// Seconds a local connection waits for its device before it is reset.
    #[arg(long, default_value_t = 15, value_name = "SECS")]
    connect_wait: u64,
    /// Seconds live tunnels may continue after a shutdown signal.
    #[arg(long, default_value_t = 2, value_name = "SECS")]
    drain_timeout: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9465; port 0 picks one,
    /// written to the ready file).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Keep relayed connections on the relay: no hole punching to a direct path (to measure or
    /// debug the relayed path).
    #[arg(long)]
    no_punch: bool,
    /// How legs reach relays: auto (UDP; TLS over TCP to the same port when UDP gets no answer
    /// within a second or cannot carry a full packet), udp, or tcp.
    #[arg(long, value_enum, default_value_t = Via::Auto, value_name = "HOW")]
    relay_via: Via,
}

impl ForwardingArgs {
    fn options(self, home: ClientHome) -> ForwarderOptions {
        let mut opts = ForwarderOptions::new(home);
        opts.connect.transport.hole_punching = !self.no_punch;
        opts.connect.transport.relay_via = self.relay_via.into();
        opts.ready_file = self.ready_file;
        opts.connect_wait = Duration::from_secs(self.connect_wait);
        opts.drain_timeout = Duration::from_secs(self.drain_timeout);
        opts.metrics = self.metrics;
        opts
    }
}

/// `--relay-via`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Via {
    Auto,
    Udp,
    Tcp,
}

impl From<Via> for tunnel_shared::transport::RelayVia {
    fn from(v: Via) -> Self {
        match v {
            Via::Auto => Self::Auto,
            Via::Udp => Self::Udp,
            Via::Tcp => Self::Tcp,
        }
    }
}

#[derive(Debug, Subcommand)]
enum ForwardCmd {
    /// Add a forward for a device: [BIND:]PORT:SERVICE, e.g. 2222:ssh (BIND defaults to
    /// 127.0.0.1, PORT 0 picks a free port).
    Add {
        /// The device (name, id or fingerprint prefix of a known device).
        device: String,
        /// [BIND:]PORT:SERVICE.
        #[arg(value_name = "[BIND:]PORT:SERVICE")]
        forward: ForwardSpec,
        /// Only edit the file; do not reload a running `up`.
        #[arg(long)]
        no_reload: bool,
    },
    /// Remove a device's forward: [BIND:]PORT:SERVICE, or just the local PORT.
    Remove {
        /// The device, as in forwards.toml (or its name).
        device: String,
        /// [BIND:]PORT:SERVICE or PORT.
        #[arg(value_name = "FORWARD|PORT")]
        forward: String,
        /// Only edit the file; do not reload a running `up`.
        #[arg(long)]
        no_reload: bool,
    },
    /// List the forwards in forwards.toml.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DeviceCmd {
    /// Pin a device: its addresses and/or relays, and its key fingerprint (like a known_hosts
    /// line).
    Add {
        /// Local name for the device.
        name: String,
        /// HOST:PORT, repeatable (tried in order). HOST may be IPv4, [IPv6] or a DNS name.
        #[arg(
            long = "addr",
            value_name = "HOST:PORT",
            required_unless_present = "relays"
        )]
        addrs: Vec<HostPort>,
        /// A relay the device is attached to, HOST:PORT, repeatable (each with a
        /// --relay-fingerprint, in the same order). Tried in parallel with the addresses.
        #[arg(
            long = "relay",
            value_name = "HOST:PORT",
            requires = "relay_fingerprints"
        )]
        relays: Vec<HostPort>,
        /// The relay's key fingerprint (`tunnel-relay fingerprint`), one per --relay.
        #[arg(long = "relay-fingerprint", value_name = "FP")]
        relay_fingerprints: Vec<Fingerprint>,
        /// The device's id (needed with --relay: a relay knows devices by id).
        #[arg(long, value_name = "ID")]
        device_id: Option<String>,
        /// The device's full key fingerprint (64 hex; `tunnel-device fingerprint` prints it).
        #[arg(long)]
        fingerprint: Fingerprint,
        /// Your server-connect token for remote connections (`tunnel-device user add` prints it;
        /// a local connection also fetches it), or - to read it from standard input. On the
        /// command line every local user can read it (ps): prefer -, --sct-file or the
        /// environment variable.
        #[arg(
            long,
            value_name = "TOKEN|-",
            env = "TUNNEL_SCT",
            hide_env_values = true
        )]
        sct: Option<String>,
        /// Read the server-connect token from this file.
        #[arg(long, value_name = "FILE", conflicts_with = "sct")]
        sct_file: Option<PathBuf>,
    },
    /// Rename the device itself (its name on the device; needs Device:SetName).
    Rename {
        /// The device.
        device: String,
        /// The new name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum UserCmd {
    /// List the device's users.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a user; their connections are closed at once.
    Remove {
        /// User name.
        username: String,
    },
    /// Change a user's role.
    SetRole {
        /// User name.
        username: String,
        /// Role (e.g. Owner, Standard, Guest).
        role: String,
    },
    /// Replace a server-connect token (yours by default; an owner may replace anyone's). The old
    /// token stops working at once; yours is saved in known_devices.toml.
    RotateToken {
        /// The user [default: you].
        username: Option<String>,
    },
    /// Invite a user: prints a pairing string with a one-time password (and a QR code).
    Invite {
        /// User name.
        username: String,
        /// Role [default: the device's open-pairing role].
        #[arg(long)]
        role: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum PairingCmd {
    /// Which modes are on (and the open-pairing string, if password open is on).
    Status,
    /// Switch a mode on.
    Enable {
        /// local-initial, local-open, password-invite or password-open.
        mode: PairingMode,
    },
    /// Switch a mode off.
    Disable {
        /// local-initial, local-open, password-invite or password-open.
        mode: PairingMode,
    },
}

/// Exit status for every error: 1 for a runtime failure (the network, the device, the OS), 2 for
/// something the user fixes in arguments or files. One table for the whole binary.
fn exit_code(e: &ClientError) -> u8 {
    use ClientError as E;
    match e {
        E::Config(_)
        | E::Lookup(_)
        | E::Value(_)
        | E::NoAddress
        | E::NameTaken { .. }
        | E::PinnedToOtherKey { .. }
        | E::NoForwards
        | E::NeedsUsername
        | E::NeedsPairingString(_)
        | E::NeedsDeviceId
        | E::AlreadyUp { .. } => 2,
        E::Key(
            KeyFileError::Unprotected { .. }
            | KeyFileError::Invalid { .. }
            | KeyFileError::Untrusted { .. },
        ) => 2,
        E::Key(KeyFileError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            2
        }
        E::Key(_)
        | E::Transport(_)
        | E::Connect(_)
        | E::Io { .. }
        | E::Listen { .. }
        | E::Tunnel { .. }
        | E::Discovery(_) => 1,
    }
}

/// An error for `main`: the message and the exit status.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    /// A usage problem found by the binary itself (status 2).
    fn usage(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Self {
            code: exit_code(&e),
            message: e.to_string(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // stdio's stderr is ssh's terminal: warnings only, unless asked.
    let quiet = matches!(cli.command, Command::Stdio { .. });
    status::init_tracing(&cli.log, if quiet { "warn" } else { "info" });
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
        Command::Docs(docs) => docs
            .run(Cli::command())
            .map_err(|message| Failure { code: 1, message })?,
        Command::Fingerprint => {
            let id = home.identity()?;
            println!("{}", id.fingerprint());
        }
        Command::Pair {
            string,
            string_file,
            addr,
            local,
            device,
            fingerprint,
            name,
            username,
            mode,
            key_name,
        } => {
            let string = secret_arg(
                string,
                string_file,
                "TUNNEL_PAIRING_STRING",
                "pairing string",
                "--string-file",
            )?
            .map(|s| s.parse::<PairingString>())
            .transpose()
            .map_err(|e| Failure::usage(e.to_string()))?
            .map(|ps| with_addresses(ps, &addr, fingerprint))
            .transpose()?;
            let opts = ConnectOptions::default();
            let outcome = runtime()?.block_on(async {
                if let Some(ps) = string {
                    return pair::pair_with_string(
                        &home,
                        &ps,
                        name.as_deref(),
                        username,
                        key_name,
                        &opts,
                    )
                    .await
                    .map_err(Failure::from);
                }
                let addresses = if local {
                    discover_one(device.as_deref(), fingerprint).await?
                } else {
                    addr
                };
                pair::pair_local(
                    &home,
                    addresses,
                    LocalPairing {
                        fingerprint,
                        name,
                        username,
                        mode,
                        key_name,
                    },
                    &opts,
                )
                .await
                .map_err(Failure::from)
            })?;
            print_paired(&outcome);
        }
        Command::Discover { timeout, json } => {
            let found = discovery::browse(Duration::from_secs_f64(timeout.clamp(0.1, 60.0)))
                .map_err(ClientError::from)?;
            if json {
                let v: Vec<_> = found
                    .iter()
                    .map(|f| {
                        serde_json::json!({
                            "device_id": f.device_id, "name": f.name,
                            "fingerprint": f.fingerprint.map(|fp| fp.to_string()),
                            "addresses": f.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else if found.is_empty() {
                println!("No devices answered on the local network.");
            } else {
                println!(
                    "{:<24} {:<20} {:<18} ADDRESSES",
                    "DEVICE ID", "NAME", "FINGERPRINT"
                );
                for f in found {
                    let addrs: Vec<String> = f.addresses.iter().map(ToString::to_string).collect();
                    println!(
                        "{:<24} {:<20} {:<18} {}",
                        f.device_id,
                        f.name,
                        f.fingerprint
                            .map_or_else(|| "-".into(), |fp| fp.fmt_short()),
                        addrs.join(", ")
                    );
                }
                println!(
                    "(announced fingerprints are not verified; `tunnel-client pair --local \
                     --device ID` shows the key it connects to)"
                );
            }
        }
        Command::Device(DeviceCmd::Add {
            name,
            addrs,
            relays,
            relay_fingerprints,
            device_id,
            fingerprint,
            sct,
            sct_file,
        }) => {
            if relays.len() != relay_fingerprints.len() {
                return Err(Failure::usage(
                    "give one --relay-fingerprint per --relay, in the same order",
                ));
            }
            let relays: Vec<RelayRef> = relays
                .into_iter()
                .zip(relay_fingerprints)
                .map(|(addr, fingerprint)| RelayRef { addr, fingerprint })
                .collect();
            let sct = secret_arg(sct, sct_file, "TUNNEL_SCT", "token", "--sct-file")?;
            let dev = home.add_device(
                &name,
                addrs,
                fingerprint,
                sct.map(Secret::new),
                relays,
                device_id,
            )?;
            let mut paths: Vec<String> = dev.addresses.iter().map(ToString::to_string).collect();
            paths.extend(dev.relays.iter().map(|r| format!("relay {}", r.addr)));
            println!(
                "Pinned device '{}' at {} with key {}",
                dev.name,
                paths.join(", "),
                dev.fingerprint
            );
        }
        Command::Device(DeviceCmd::Rename { device, name }) => {
            runtime()?.block_on(manage::rename(&home, &device, name))?;
        }
        Command::Devices { json } => print_devices(&home, json)?,
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
            run,
        } => {
            let opts = OpenOptions {
                device,
                forwards,
                forwarding: run.options(home),
            };
            runtime()?.block_on(open_cmd(opts))?;
        }
        Command::Up { run } => runtime()?.block_on(up_cmd(run.options(home)))?,
        Command::Reload => {
            let pid = up::reload(&home).map_err(|e| Failure {
                code: 1,
                message: e.to_string(),
            })?;
            println!("Asked `tunnel-client up` (pid {pid}) to re-read forwards.toml");
        }
        Command::Forward(cmd) => forward_cmd(&home, cmd)?,
        Command::Stdio {
            device,
            service,
            relay_via,
        } => {
            let mut opts = ConnectOptions::default();
            opts.transport.relay_via = relay_via.into();
            let rt = runtime()?;
            let result = rt.block_on(async {
                let shutdown = CancellationToken::new();
                tunnel_shared::shutdown::spawn_signal_handler(shutdown.clone(), || {});
                stdio::run(&home, &device, &service, &opts, shutdown).await
            });
            // A read of standard input may still be pending on a blocking thread: do not wait
            // for it.
            rt.shutdown_timeout(Duration::from_millis(100));
            result?;
        }
        Command::User { device, cmd } => {
            runtime()?.block_on(manage::user(&home, &device, cmd))?;
        }
        Command::Pairing { device, cmd } => {
            runtime()?.block_on(manage::pairing(&home, &device, cmd))?;
        }
    }
    Ok(())
}

/// A pairing string with `--addr` in place of its addresses; a `--fingerprint` must agree with
/// the one it carries.
fn with_addresses(
    mut ps: PairingString,
    addrs: &[HostPort],
    fingerprint: Option<Fingerprint>,
) -> Result<PairingString, Failure> {
    if let Some(fp) = fingerprint
        && fp != ps.fingerprint
    {
        return Err(Failure::usage(format!(
            "--fingerprint {} differs from the pairing string's {}: check where the string came \
             from (the string pins the device's key; --fingerprint is not needed with it)",
            fp.fmt_short(),
            ps.fingerprint.fmt_short()
        )));
    }
    if !addrs.is_empty() {
        ps.addresses = addrs.to_vec();
    }
    Ok(ps)
}

/// A secret given as an argument (`-`: read standard input), a file, or an environment variable.
/// A literal on the command line still works, with a warning: every local user can read a
/// process's arguments.
fn secret_arg(
    value: Option<String>,
    file: Option<PathBuf>,
    env: &str,
    what: &str,
    file_flag: &str,
) -> Result<Option<String>, Failure> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(&path).map_err(|e| Failure {
            code: 2,
            message: format!("cannot read the {what} from '{}': {e}", path.display()),
        })?;
        return Ok(Some(text.trim().to_string()));
    }
    let Some(value) = value else {
        return Ok(None);
    };
    if value == "-" {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map_err(|e| Failure {
            code: 2,
            message: format!("cannot read the {what} from standard input: {e}"),
        })?;
        return Ok(Some(line.trim().to_string()));
    }
    if std::env::var(env).ok().as_deref() != Some(value.as_str()) {
        eprintln!(
            "warning: the {what} on the command line can be read by every local user (ps, \
             /proc); pass - and give it on standard input, or use {file_flag} or ${env}"
        );
    }
    Ok(Some(value))
}

async fn discover_one(
    device: Option<&str>,
    fingerprint: Option<Fingerprint>,
) -> Result<Vec<HostPort>, Failure> {
    let found = tokio::task::spawn_blocking(|| discovery::browse(Duration::from_secs(2)))
        .await
        .map_err(|e| Failure {
            code: 1,
            message: format!("discovery failed: {e}"),
        })?
        .map_err(ClientError::from)?;
    let candidates: Vec<_> = found
        .into_iter()
        .filter(|f| device.is_none_or(|d| f.device_id == d))
        .filter(|f| fingerprint.is_none_or(|fp| f.fingerprint == Some(fp)))
        .collect();
    match candidates.as_slice() {
        [] => Err(Failure::usage(
            "no matching device answered on the local network (`tunnel-client discover` lists \
             them; or pair by address with --addr HOST:PORT)",
        )),
        [one] => Ok(one
            .addresses
            .iter()
            .map(|a| HostPort {
                host: tunnel_shared::config::Host::Ip(a.ip()),
                port: a.port(),
            })
            .collect()),
        many => Err(Failure::usage(format!(
            "several devices answered ({}): choose one with --device ID",
            many.iter()
                .map(|f| f.device_id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn print_paired(o: &PairOutcome) {
    match o.mode {
        Some(mode) => println!(
            "Paired with '{}' as user '{}' (role {}) by {mode} pairing.",
            o.device.name, o.user.username, o.user.role
        ),
        None => println!(
            "This key was already paired with '{}' as user '{}' (role {}); saved it.",
            o.device.name, o.user.username, o.user.role
        ),
    }
    if o.trusted_on_first_use {
        println!(
            "The device's key was trusted on first use: {}\nCompare it with `tunnel-device \
             fingerprint` on the device; if it differs, `tunnel-client forget {}` at once.",
            o.device.fingerprint, o.device.name
        );
    }
    println!("Next: tunnel-client services {}", o.device.name);
}

fn print_devices(home: &ClientHome, json: bool) -> Result<(), Failure> {
    let known = home.known_devices()?;
    let seen = home.seen();
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
                    "has_sct": d.sct.is_some(),
                    "relays": d.relays.iter().map(|r| serde_json::json!({
                        "addr": r.addr.to_string(), "fingerprint": r.fingerprint.to_string(),
                    })).collect::<Vec<_>>(),
                    "last_seen": seen.get(&d.fingerprint).map(|e| serde_json::json!({
                        "path": e.path, "addr": e.addr, "at": e.at,
                    })),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else if known.devices.is_empty() {
        println!(
            "No known devices. Pair with one (tunnel-client pair PAIRING_STRING) or pin one with \
             tunnel-client device add NAME --addr HOST:PORT --fingerprint FP"
        );
    } else {
        let now = std::time::SystemTime::now();
        println!(
            "{:<16} {:<20} {:<18} {:<10} {:<30} ADDRESSES",
            "NAME", "DEVICE ID", "FINGERPRINT", "USER", "LAST SEEN"
        );
        for d in &known.devices {
            let mut addrs: Vec<String> = d.addresses.iter().map(ToString::to_string).collect();
            addrs.extend(d.relays.iter().map(|r| format!("relay {}", r.addr)));
            println!(
                "{:<16} {:<20} {:<18} {:<10} {:<30} {}",
                d.name,
                d.device_id.as_deref().unwrap_or("-"),
                d.fingerprint.fmt_short(),
                d.user.as_deref().unwrap_or("-"),
                seen.get(&d.fingerprint)
                    .map_or_else(|| "never".to_string(), |e| e.describe(now)),
                addrs.join(", ")
            );
        }
    }
    Ok(())
}

async fn services_cmd(home: ClientHome, device: &str, json: bool) -> Result<(), ClientError> {
    let identity = home.identity()?;
    let dev = home.find_device(device)?;
    let opts = ConnectOptions::default();
    let dialer = Dialer::new(&opts.transport)?;
    let session = connect_paired(&home, &dialer, &identity, &dev, &opts).await?;
    let services = session.services().await?;
    session.close();
    drop(session);
    dialer.close().await;
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

async fn up_cmd(opts: ForwarderOptions) -> Result<(), ClientError> {
    let (up, applied) = Up::start(opts).await?;
    if !applied.failed.is_empty() {
        eprintln!(
            "warning: {} forward(s) could not be opened (retried at the next reload):\n  {}",
            applied.failed.len(),
            applied.failed.join("\n  ")
        );
    }
    let shutdown = CancellationToken::new();
    tunnel_shared::shutdown::spawn_signal_handler(shutdown.clone(), status::clear);
    sdnotify::attach(&shutdown);
    sdnotify::ready(&up_summary(&up.statuses().borrow()));
    let reload = Arc::new(Notify::new());
    up::on_sighup(reload.clone()).map_err(|source| ClientError::Io {
        path: "SIGHUP".into(),
        source,
    })?;
    let display = status::spawn(
        up.statuses(),
        std::io::stdout().is_terminal(),
        shutdown.clone(),
    );
    let statuses = up.statuses();
    up.run(shutdown.clone(), reload, |outcome| match outcome {
        Ok(_) => {
            sdnotify::ready(&up_summary(&statuses.borrow()));
        }
        Err(e) => {
            sdnotify::ready(&format!("forwards.toml not reloaded: {e}"));
        }
    })
    .await;
    shutdown.cancel();
    let _ = display.await;
    Ok(())
}

/// `systemctl status`'s line for `up`: how many forwards to how many devices.
fn up_summary(list: &[Arc<Status>]) -> String {
    let forwards: usize = list.iter().map(|s| s.services.len()).sum();
    let failed: usize = list.iter().map(|s| s.failed.len()).sum();
    let mut line = format!("{forwards} forwards to {} devices", list.len());
    if failed > 0 {
        line.push_str(&format!(", {failed} not forwarded (port in use?)"));
    }
    line
}

fn forward_cmd(home: &ClientHome, cmd: ForwardCmd) -> Result<(), Failure> {
    let reload_up = |no_reload: bool| {
        if no_reload {
            return;
        }
        match up::reload(home) {
            Ok(pid) => println!("Reloaded the running `tunnel-client up` (pid {pid})."),
            Err(up::ReloadError::NotRunning(_)) => {
                println!("`tunnel-client up` (or its systemd unit) opens it.");
            }
            Err(e) => eprintln!("warning: {e}"),
        }
    };
    match cmd {
        ForwardCmd::Add {
            device,
            forward,
            no_reload,
        } => {
            // Stored under the device's name, so a fingerprint prefix reads well in the file.
            let name = home.find_device(&device)?.name;
            home.edit_forwards(|text| Ok((forwards::add(text, &name, &forward)?, ())))?;
            println!("Added forward {forward} to device '{name}'.");
            reload_up(no_reload);
        }
        ForwardCmd::Remove {
            device,
            forward,
            no_reload,
        } => {
            let file = home.forwards()?;
            let key = if file.devices.contains_key(&device) {
                device
            } else {
                home.find_device(&device)?.name
            };
            let removed = home.edit_forwards(|text| forwards::remove(text, &key, &forward))?;
            for r in removed {
                println!("Removed forward {r} of device '{key}'.");
            }
            reload_up(no_reload);
        }
        ForwardCmd::List { json } => {
            let file = home.forwards()?;
            if json {
                let v: Vec<_> = file
                    .iter()
                    .map(|(d, f)| {
                        serde_json::json!({
                            "device": d, "forward": f.to_string(), "bind": f.bind.to_string(),
                            "port": f.port, "service": f.service,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else if file.devices.is_empty() {
                println!(
                    "No forwards in {}. Add one with `tunnel-client forward add DEVICE \
                     [BIND:]PORT:SERVICE`.",
                    home.forwards_path().display()
                );
            } else {
                println!("{:<16} {:<24} SERVICE", "DEVICE", "LOCAL");
                for (d, f) in file.iter() {
                    let local = std::net::SocketAddr::new(f.bind, f.port);
                    println!("{d:<16} {:<24} {}", local.to_string(), f.service);
                }
            }
        }
    }
    Ok(())
}

async fn open_cmd(opts: OpenOptions) -> Result<(), ClientError> {
    let opener = Opener::bind(opts).await?;
    let shutdown = CancellationToken::new();
    tunnel_shared::shutdown::spawn_signal_handler(shutdown.clone(), status::clear);
    sdnotify::attach(&shutdown);
    sdnotify::ready(&up_summary(&opener.statuses().borrow()));
    let display = status::spawn(
        opener.statuses(),
        std::io::stdout().is_terminal(),
        shutdown.clone(),
    );
    let result = opener.run(shutdown.clone()).await;
    shutdown.cancel();
    let _ = display.await;
    result
}
