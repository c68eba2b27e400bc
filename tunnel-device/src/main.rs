//! `tunnel-device`: publishes TCP services to paired clients over an authenticated QUIC tunnel.
//!
//! Thin binary: parse arguments, build typed options, call `tunnel_shared::device`, map errors to
//! exit codes (0 ok, 1 runtime failure, 2 usage or configuration error).

#![allow(
    rustdoc::broken_intra_doc_links,
    reason = "doc comments here are --help text, where [..] marks optional parts"
)]

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tunnel_shared::config::{ServiceSpec, default_device_home};
use tunnel_shared::device::admin::{self, AdminError, InitOptions};
use tunnel_shared::device::{self, DeviceError, DeviceHome, RunOptions};
use tunnel_shared::identity::Fingerprint;

/// Publish TCP services (sshd, a camera's RTSP server, a web UI) to paired clients through an
/// authenticated, encrypted QUIC tunnel.
///
/// Quick start: `tunnel-device init`, then `tunnel-device user add NAME --fingerprint FP` with the
/// fingerprint `tunnel-client fingerprint` prints on the client, then `tunnel-device run`.
#[derive(Debug, Parser)]
#[command(name = "tunnel-device", version, max_term_width = 100)]
struct Cli {
    /// Device home directory (key, device.toml, state.json).
    /// [default: $XDG_DATA_HOME/tunnel-device or ~/.local/share/tunnel-device]
    #[arg(long, global = true, env = "TUNNEL_DEVICE_HOME", value_name = "DIR")]
    home: Option<PathBuf>,

    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides it).
    #[arg(long, global = true, default_value = "info", value_name = "LEVEL")]
    log_level: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the home: key (if none), device.toml and an empty state.json.
    Init {
        /// Device id shown to clients [default: dev- + 8 hex of the fingerprint].
        #[arg(long)]
        device_id: Option<String>,
        /// Human-friendly name [default: the host name].
        #[arg(long)]
        name: Option<String>,
        /// A service, repeatable: ID=HOST:PORT[,type=TYPE]. HOST may be IPv4, [IPv6] or a DNS name.
        /// [default: ssh=127.0.0.1:22]
        #[arg(long = "service", value_name = "ID=HOST:PORT[,type=T]")]
        services: Vec<ServiceSpec>,
        /// UDP address to listen on, repeatable [default: 0.0.0.0:5592].
        #[arg(long, value_name = "ADDR")]
        listen: Vec<SocketAddr>,
        /// Overwrite an existing device.toml and state.json (removes all users; keeps the key).
        #[arg(long)]
        force: bool,
    },
    /// Serve until SIGINT or SIGTERM (a second signal exits at once).
    Run {
        /// UDP address to listen on, repeatable; overrides device.toml's `listen`.
        #[arg(long, value_name = "ADDR")]
        listen: Vec<SocketAddr>,
        /// Write one JSON object here once listening: pid, fingerprint, device_id, name, listen.
        #[arg(long, value_name = "PATH")]
        ready_file: Option<PathBuf>,
        /// Probe every service with a TCP connect, print a table and exit (1 if any is unreachable).
        #[arg(long)]
        self_test: bool,
        /// Seconds live tunnels may continue after a shutdown signal.
        #[arg(long, default_value_t = 3, value_name = "SECS")]
        drain_timeout: u64,
        /// Worker threads. 1 (the default) is fastest per client; raise it only for many busy
        /// clients on a machine with many cores.
        #[arg(long, default_value_t = 1, value_name = "N")]
        threads: usize,
    },
    /// Print the device key's fingerprint.
    Fingerprint,
    /// Manage the services in device.toml (a running device reloads them).
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Manage users, the device's access list (like authorized_keys).
    #[command(subcommand)]
    User(UserCmd),
}

#[derive(Debug, Subcommand)]
enum ServiceCmd {
    /// List services.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a service: ID=HOST:PORT[,type=TYPE].
    Add {
        /// The service.
        #[arg(value_name = "ID=HOST:PORT[,type=T]")]
        spec: ServiceSpec,
    },
    /// Remove a service (a running device resets its live tunnels).
    Remove {
        /// Service id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum UserCmd {
    /// List users and their keys.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Authorize a client key as a new user.
    Add {
        /// User name (1-64 of A-Z a-z 0-9 . _ -).
        username: String,
        /// The client's key fingerprint (64 hex; `tunnel-client fingerprint` prints it).
        #[arg(long)]
        fingerprint: Fingerprint,
        /// Role: Owner, Standard or Guest [default: Owner for the first user, else Guest].
        #[arg(long)]
        role: Option<String>,
        /// A label for the key, e.g. "alice's laptop".
        #[arg(long)]
        key_name: Option<String>,
    },
    /// Remove a user; their live connections are closed at once.
    Remove {
        /// User name.
        username: String,
    },
    /// Change a user's role.
    SetRole {
        /// User name.
        username: String,
        /// Owner, Standard or Guest.
        role: String,
    },
}

/// An error for `main`: the message and the exit code.
struct Failure {
    code: u8,
    message: String,
}

impl From<AdminError> for Failure {
    fn from(e: AdminError) -> Self {
        Self {
            code: e.exit_code(),
            message: e.to_string(),
        }
    }
}

impl From<DeviceError> for Failure {
    fn from(e: DeviceError) -> Self {
        Self {
            code: e.exit_code(),
            message: e.to_string(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log_level);
    let Some(home) = cli.home.clone().or_else(default_device_home) else {
        eprintln!("error: cannot find a home directory: pass --home DIR or set TUNNEL_DEVICE_HOME");
        return ExitCode::from(2);
    };
    let home = DeviceHome::new(home);
    match dispatch(cli.command, &home) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn init_tracing(level: &str) {
    let filter = std::env::var("RUST_LOG")
        .unwrap_or_else(|_| format!("warn,tunnel_shared={level},tunnel_device={level}"));
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| {
        eprintln!("warning: invalid log level '{level}', using info");
        tracing_subscriber::EnvFilter::new("warn,tunnel_shared=info,tunnel_device=info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// One thread (the default) is the fastest per connection: quinn's connection driver and the
/// splice tasks then hand work to each other without cross-thread wake-ups (measured +50 % on
/// loopback, docs/BENCHMARKS.md). More threads help only with many busy clients on many cores.
fn runtime_with(threads: usize) -> Result<tokio::runtime::Runtime, Failure> {
    let mut b = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    b.enable_all().build().map_err(|e| Failure {
        code: 1,
        message: format!("cannot start the async runtime: {e}"),
    })
}

fn dispatch(command: Command, home: &DeviceHome) -> Result<ExitCode, Failure> {
    match command {
        Command::Init {
            device_id,
            name,
            services,
            listen,
            force,
        } => {
            let report = admin::init(
                home,
                InitOptions {
                    device_id,
                    name,
                    services: services.into_iter().map(|s| s.0).collect(),
                    listen,
                    force,
                },
            )?;
            print_init(home, &report);
        }
        Command::Run {
            listen,
            ready_file,
            self_test,
            drain_timeout,
            threads,
        } => {
            let rt = runtime_with(threads)?;
            if self_test {
                return rt.block_on(self_test_cmd(home));
            }
            let mut opts = RunOptions::new(home.dir());
            opts.listen = listen;
            opts.ready_file = ready_file;
            opts.drain_timeout = std::time::Duration::from_secs(drain_timeout);
            rt.block_on(async {
                let shutdown = CancellationToken::new();
                spawn_signal_handler(shutdown.clone());
                device::run(opts, shutdown, |_| {}).await
            })?;
        }
        Command::Fingerprint => println!("{}", admin::fingerprint(home)?),
        Command::Service(cmd) => service_cmd(home, cmd)?,
        Command::User(cmd) => user_cmd(home, cmd)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn print_init(home: &DeviceHome, report: &admin::InitReport) {
    let cfg = &report.config;
    println!(
        "Initialised device '{}' (id {}) in {}",
        cfg.name,
        cfg.device_id,
        home.dir().display()
    );
    println!(
        "{} key: {}",
        if report.key_created {
            "New"
        } else {
            "Existing"
        },
        home.key_path().display()
    );
    println!("Device fingerprint: {}", report.fingerprint);
    println!("Services:");
    for s in &cfg.services {
        println!("  {:<12} {:<8} -> {}", s.id, s.service_type, s.target());
    }
    let port = cfg.listen.first().map_or(5592, SocketAddr::port);
    println!();
    println!("Next steps:");
    println!("  1. On the client, print its key:   tunnel-client fingerprint");
    println!(
        "  2. Authorize it here:              tunnel-device user add NAME --fingerprint CLIENT_FP"
    );
    println!(
        "  3. On the client, pin this device: tunnel-client device add {} --addr THIS_HOST:{port} --fingerprint {}",
        cfg.device_id, report.fingerprint
    );
    println!("  4. Serve:                          tunnel-device run");
}

async fn self_test_cmd(home: &DeviceHome) -> Result<ExitCode, Failure> {
    let cfg = home.load_config().map_err(DeviceError::from)?;
    let probes = device::probe_services(&cfg).await;
    println!("{:<16} {:<8} {:<28} REACHABLE", "ID", "TYPE", "TARGET");
    let mut all_ok = true;
    for p in &probes {
        let reach = match &p.outcome {
            Ok(addr) => format!("yes ({addr})"),
            Err(e) => {
                all_ok = false;
                format!("NO: {e}")
            }
        };
        println!(
            "{:<16} {:<8} {:<28} {reach}",
            p.service.id,
            p.service.service_type,
            p.service.target().to_string()
        );
    }
    if probes.is_empty() {
        println!("(no services configured: add one with `tunnel-device service add ID=HOST:PORT`)");
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn service_cmd(home: &DeviceHome, cmd: ServiceCmd) -> Result<(), Failure> {
    match cmd {
        ServiceCmd::List { json } => {
            let services = admin::service_list(home)?;
            if json {
                let v: Vec<_> = services
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "id": s.id, "type": s.service_type, "host": s.host.to_string(),
                            "port": s.port, "metadata": s.metadata,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!("{:<16} {:<8} TARGET", "ID", "TYPE");
                for s in services {
                    println!("{:<16} {:<8} {}", s.id, s.service_type, s.target());
                }
            }
        }
        ServiceCmd::Add { spec } => {
            admin::service_add(home, &spec.0)?;
            println!("Added service '{}' -> {}", spec.0.id, spec.0.target());
        }
        ServiceCmd::Remove { id } => {
            admin::service_remove(home, &id)?;
            println!("Removed service '{id}'");
        }
    }
    Ok(())
}

fn user_cmd(home: &DeviceHome, cmd: UserCmd) -> Result<(), Failure> {
    match cmd {
        UserCmd::List { json } => {
            let users = admin::user_list(home)?;
            if json {
                let v: Vec<_> = users
                    .iter()
                    .map(|u| {
                        serde_json::json!({
                            "username": u.username, "role": u.role,
                            "fingerprints": u.fingerprints.iter().map(|k| serde_json::json!({
                                "fingerprint": k.fingerprint.to_string(), "name": k.name,
                            })).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else if users.is_empty() {
                println!("No users. Add one with: tunnel-device user add NAME --fingerprint FP");
            } else {
                println!("{:<16} {:<9} FINGERPRINT", "USER", "ROLE");
                for u in users {
                    for (i, k) in u.fingerprints.iter().enumerate() {
                        let (name, role) = if i == 0 {
                            (u.username.as_str(), u.role.as_str())
                        } else {
                            ("", "")
                        };
                        let label = k
                            .name
                            .as_deref()
                            .map(|n| format!("  ({n})"))
                            .unwrap_or_default();
                        println!("{name:<16} {role:<9} {}{label}", k.fingerprint);
                    }
                }
            }
        }
        UserCmd::Add {
            username,
            fingerprint,
            role,
            key_name,
        } => {
            let role = match role {
                Some(r) => r,
                None if admin::user_list(home)?.is_empty() => "Owner".to_string(),
                None => "Guest".to_string(),
            };
            let user = admin::user_add(home, &username, fingerprint, &role, key_name)?;
            println!(
                "Added user '{}' with role {} and key {}",
                user.username, user.role, fingerprint
            );
        }
        UserCmd::Remove { username } => {
            admin::user_remove(home, &username)?;
            println!("Removed user '{username}' (a running device closes their connections now)");
        }
        UserCmd::SetRole { username, role } => {
            admin::user_set_role(home, &username, &role)?;
            println!(
                "User '{username}' now has role {}",
                admin::parse_role(&role)?
            );
        }
    }
    Ok(())
}

/// First SIGINT/SIGTERM: graceful shutdown. Second: exit at once.
fn spawn_signal_handler(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    tokio::spawn(async move {
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            tracing::warn!("cannot install signal handlers; stop the device with SIGKILL");
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("signal received: shutting down (send it again to exit at once)");
        shutdown.cancel();
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!("second signal: exiting now");
        std::process::exit(130);
    });
}
