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

use clap::{CommandFactory, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tunnel_shared::config::{HostPort, RelayRef, ServiceSpec, default_device_home};
use tunnel_shared::device::admin::{self, ExplainQuery, InitOptions};
use tunnel_shared::device::{self, DeviceError, DeviceHome, RunOptions};
use tunnel_shared::iam::{Action, DEFAULT_IAM_TOML};
use tunnel_shared::identity::{Fingerprint, KeyFileError};
use tunnel_shared::pairing::{PairingMode, PairingString};
use tunnel_shared::sdnotify;
use tunnel_shared::state::StateError;

/// Publish TCP services (sshd, a camera's RTSP server, a web UI) to paired clients through an
/// authenticated, encrypted QUIC tunnel.
///
/// Quick start: `tunnel-device init` prints a pairing string for the first user (the owner);
/// start `tunnel-device run`, and on the client run `tunnel-client pair PAIRING_STRING`. Or
/// authorize a key directly, like authorized_keys: `tunnel-device user add NAME --fingerprint FP`.
#[derive(Debug, Parser)]
#[command(name = "tunnel-device", version, max_term_width = 100)]
struct Cli {
    /// Device home directory (key, device.toml, state.json, iam.toml).
    /// [default: $XDG_DATA_HOME/tunnel-device or ~/.local/share/tunnel-device]
    #[arg(long, global = true, env = "TUNNEL_DEVICE_HOME", value_name = "DIR")]
    home: Option<PathBuf>,

    #[command(flatten)]
    log: tunnel_cli::LogArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the home: key (if none), device.toml, and state.json with an invitation for the
    /// first user (password invite pairing on, every other mode off).
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
        /// Name of the first user's invitation (its role is the initial role, Owner).
        #[arg(long, default_value = "owner", value_name = "NAME")]
        owner: String,
        /// Create no invitation and leave every pairing mode off (add keys with `user add`).
        #[arg(long)]
        no_invite: bool,
        /// Address clients use to reach the device, for the pairing string, repeatable
        /// [default: network.advertise, else this host's addresses and the listen port].
        #[arg(long = "addr", value_name = "HOST:PORT")]
        addrs: Vec<HostPort>,
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
    #[command(flatten)]
    Docs(tunnel_cli::DocsCommand),
    /// Manage the services in device.toml (a running device reloads them).
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Relays the device attaches to, so clients reach it from anywhere (behind NAT too).
    #[command(subcommand)]
    Relay(RelayCmd),
    /// Manage users, the device's access list (like authorized_keys).
    #[command(subcommand)]
    User(UserCmd),
    /// Pairing modes: local-initial, local-open, password-invite, password-open.
    #[command(subcommand)]
    Pairing(PairingCmd),
    /// Access control: explain a decision, print or check the policies.
    #[command(subcommand)]
    Iam(IamCmd),
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
enum RelayCmd {
    /// List the relays and their fingerprints (`run` shows each one's state).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Attach to a relay (a running device connects within a second). The relay's operator
    /// must serve this device: `tunnel-relay device add DEVICE_ID --fingerprint DEVICE_FP`.
    Add {
        /// The relay's UDP address, HOST:PORT.
        addr: HostPort,
        /// The relay's key fingerprint (`tunnel-relay fingerprint`); the device refuses a relay
        /// with another key.
        #[arg(long)]
        fingerprint: Fingerprint,
    },
    /// Detach from a relay.
    Remove {
        /// The relay's address as added.
        addr: HostPort,
    },
}

#[derive(Debug, Subcommand)]
enum UserCmd {
    /// List users, their keys and pending invitations.
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
        /// Role [default: Owner for the first user with a key, else the open-pairing role].
        #[arg(long)]
        role: Option<String>,
        /// A label for the key, e.g. "alice's laptop".
        #[arg(long)]
        key_name: Option<String>,
    },
    /// Invite a user: a one-time password, printed as a pairing string (and QR code). Inviting an
    /// existing user replaces its pending password.
    Invite {
        /// User name.
        username: String,
        /// Role [default: the open-pairing role, Guest].
        #[arg(long)]
        role: Option<String>,
        /// Address clients use to reach the device, repeatable.
        #[arg(long = "addr", value_name = "HOST:PORT")]
        addrs: Vec<HostPort>,
    },
    /// Remove a user; their live connections are closed at once.
    Remove {
        /// User name.
        username: String,
    },
    /// Replace a user's server-connect token and print the new one; the old one stops working at
    /// once (a running device closes remote connections that hold it).
    RotateToken {
        /// User name.
        username: String,
    },
    /// Change a user's role (live tunnels the new role may not use are reset at once).
    SetRole {
        /// User name.
        username: String,
        /// A role defined in iam.toml (built-in: Owner, Standard, Guest).
        role: String,
    },
}

#[derive(Debug, Subcommand)]
enum PairingCmd {
    /// Show which modes are on, pending invitations, and the open-pairing role.
    Status,
    /// Switch a mode on (a running device applies it at once).
    Enable {
        /// local-initial, local-open, password-invite or password-open.
        mode: PairingMode,
    },
    /// Switch a mode off.
    Disable {
        /// local-initial, local-open, password-invite or password-open.
        mode: PairingMode,
    },
    /// Print the pairing string (and QR code) of USER's pending invitation, or of password open
    /// pairing without USER. It contains the password: share it privately.
    String {
        /// The invited user (omit for password open pairing).
        user: Option<String>,
        /// Address clients use to reach the device, repeatable.
        #[arg(long = "addr", value_name = "HOST:PORT")]
        addrs: Vec<HostPort>,
    },
}

#[derive(Debug, Subcommand)]
enum IamCmd {
    /// Evaluate one request; print the decision and the statement that decided it (exit 1 when
    /// denied).
    Explain {
        /// The acting user (omit for an unpaired key).
        #[arg(long)]
        user: Option<String>,
        /// The action, e.g. Tunnel:Connect, IAM:DeleteUser, Pairing:PasswordInvite.
        #[arg(long)]
        action: Action,
        /// The service, for Tunnel:* actions.
        #[arg(long)]
        service: Option<String>,
        /// Evaluate for a remote connection (default: local).
        #[arg(long)]
        remote: bool,
        /// The user an IAM action is about (IAM:Username).
        #[arg(long, value_name = "USER")]
        target_user: Option<String>,
        /// The role an IAM action sets (IAM:RoleId).
        #[arg(long, value_name = "ROLE")]
        target_role: Option<String>,
        /// Evaluate with this role instead of the user's.
        #[arg(long)]
        role: Option<String>,
    },
    /// Print the built-in policies and roles (copy to iam.toml in the home to change them).
    Defaults,
    /// Check iam.toml and every user's role; exit 2 naming the line of the first problem.
    Check,
}

/// Exit status for every error: 1 for a runtime failure (the network, the OS, another process),
/// 2 for something the user fixes in arguments or files. One table for the whole binary.
fn exit_code(e: &DeviceError) -> u8 {
    use DeviceError as E;
    match e {
        E::Config(_)
        | E::Iam(_)
        | E::Role(_)
        | E::UnknownRole(_)
        | E::Value(_)
        | E::AlreadyInitialised(_)
        | E::NoInvitation(_)
        | E::Jwt(_)
        | E::NoAddress => 2,
        E::State(
            StateError::Missing(_)
            | StateError::Corrupt { .. }
            | StateError::Untrusted { .. }
            | StateError::Rejected(_),
        ) => 2,
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
        E::State(StateError::Io { .. })
        | E::Key(_)
        | E::Transport(_)
        | E::AlreadyRunning(_)
        | E::Metrics { .. }
        | E::Io { .. } => 1,
    }
}

/// An error for `main`: the message and the exit status.
struct Failure {
    code: u8,
    message: String,
}

impl From<DeviceError> for Failure {
    fn from(e: DeviceError) -> Self {
        Self {
            code: exit_code(&e),
            message: e.to_string(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli.log.init("info", "tunnel_device", std::io::stderr);
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
            owner,
            no_invite,
            addrs,
        } => {
            let report = admin::init(
                home,
                InitOptions {
                    device_id,
                    name,
                    services: services.into_iter().map(|s| s.0).collect(),
                    listen,
                    force,
                    owner_invite: (!no_invite).then_some(owner),
                },
            )?;
            print_init(home, &report, addrs);
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
                tunnel_shared::shutdown::spawn_signal_handler(shutdown.clone(), || {});
                sdnotify::attach(&shutdown);
                device::run(opts, shutdown, |r| {
                    let listen: Vec<String> = r.listen.iter().map(ToString::to_string).collect();
                    sdnotify::ready(&format!("serving {} on {}", r.device_id, listen.join(", ")));
                })
                .await
            })?;
        }
        Command::Docs(docs) => docs
            .run(Cli::command())
            .map_err(|message| Failure { code: 1, message })?,
        Command::Fingerprint => println!("{}", admin::fingerprint(home)?),
        Command::Service(cmd) => service_cmd(home, cmd)?,
        Command::Relay(cmd) => relay_cmd(home, cmd)?,
        Command::User(cmd) => user_cmd(home, cmd)?,
        Command::Pairing(cmd) => pairing_cmd(home, cmd)?,
        Command::Iam(cmd) => return iam_cmd(home, cmd),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_init(home: &DeviceHome, report: &admin::InitReport, addrs: Vec<HostPort>) {
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
    println!();
    match &report.invite {
        Some((user, role, _, _)) => {
            println!(
                "Invitation for the first user '{user}' (role {role}); password invite pairing is on."
            );
            match admin::pairing_string(home, Some(user), addrs) {
                Ok(ps) => print_pairing(&ps),
                Err(e) => println!(
                    "(no pairing string yet: {e}. Print it later with \
                     `tunnel-device pairing string {user} --addr HOST:PORT`)"
                ),
            }
            println!();
            println!(
                "Next: `tunnel-device run`, then on the client `tunnel-client pair PAIRING_STRING`."
            );
        }
        None => {
            println!("No invitation; every pairing mode is off. Authorize a client key with");
            println!(
                "  tunnel-device user add NAME --fingerprint CLIENT_FP   (tunnel-client fingerprint prints it)"
            );
            println!("then `tunnel-device run`.");
        }
    }
}

/// Prints a pairing string, and its QR code when stdout is a terminal.
fn print_pairing(ps: &PairingString) {
    print!("{}", ps.to_terminal(std::io::stdout().is_terminal()));
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

fn relay_cmd(home: &DeviceHome, cmd: RelayCmd) -> Result<(), Failure> {
    match cmd {
        RelayCmd::List { json } => {
            let relays = admin::relay_list(home)?;
            if json {
                let v: Vec<_> = relays
                    .iter()
                    .map(|r| {
                        serde_json::json!({"addr": r.addr.to_string(), "fingerprint": r.fingerprint.to_string()})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else if relays.is_empty() {
                println!(
                    "No relays (add one with `tunnel-device relay add HOST:PORT --fingerprint FP`)"
                );
            } else {
                println!("{:<32} FINGERPRINT", "RELAY");
                for r in relays {
                    println!("{:<32} {}", r.addr.to_string(), r.fingerprint);
                }
            }
        }
        RelayCmd::Add { addr, fingerprint } => {
            let relay = RelayRef { addr, fingerprint };
            admin::relay_add(home, &relay)?;
            println!(
                "Added relay {} (key {}). Its operator must serve this device: tunnel-relay \
                 device add {} --fingerprint {}",
                relay.addr,
                relay.fingerprint.fmt_short(),
                admin::device_id(home)?,
                admin::fingerprint(home)?
            );
        }
        RelayCmd::Remove { addr } => {
            admin::relay_remove(home, &addr)?;
            println!("Removed relay {addr}");
        }
    }
    Ok(())
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
                            "display_name": u.display_name, "invited": u.password.is_some(),
                            "fingerprints": u.fingerprints.iter().map(|k| serde_json::json!({
                                "fingerprint": k.fingerprint.to_string(), "name": k.name,
                            })).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else if users.is_empty() {
                println!(
                    "No users. Invite one with `tunnel-device user invite NAME`, or add a key with \
                     `tunnel-device user add NAME --fingerprint FP`"
                );
            } else {
                println!("{:<16} {:<9} FINGERPRINT", "USER", "ROLE");
                for u in users {
                    if u.fingerprints.is_empty() {
                        let note = if u.password.is_some() {
                            "(invited, not paired yet)"
                        } else {
                            "(no key)"
                        };
                        println!("{:<16} {:<9} {note}", u.username, u.role);
                    }
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
            let user = admin::user_add(home, &username, fingerprint, role.as_deref(), key_name)?;
            println!(
                "Added user '{}' with role {} and key {}",
                user.username, user.role, fingerprint
            );
            println!(
                "Its server-connect token, needed for remote connections (the client also learns \
                 it on its first local connection): {}",
                user.sct.expose()
            );
        }
        UserCmd::Invite {
            username,
            role,
            addrs,
        } => {
            let (user, _) = admin::user_invite(home, &username, role.as_deref())?;
            println!("Invited '{}' (role {}).", user.username, user.role);
            if !admin::pairing_status(home)?.password_invite {
                println!(
                    "Note: password invite pairing is off; switch it on with \
                     `tunnel-device pairing enable password-invite`."
                );
            }
            match admin::pairing_string(home, Some(&username), addrs) {
                Ok(ps) => print_pairing(&ps),
                Err(e) => println!("(no pairing string: {e})"),
            }
        }
        UserCmd::Remove { username } => {
            admin::user_remove(home, &username)?;
            println!("Removed user '{username}' (a running device closes their connections now)");
        }
        UserCmd::RotateToken { username } => {
            let token = admin::user_rotate_token(home, &username)?;
            println!("New server-connect token of '{username}' (the old one no longer works):");
            println!("  {}", token.expose());
        }
        UserCmd::SetRole { username, role } => {
            let role = admin::user_set_role(home, &username, &role)?;
            println!("User '{username}' now has role {role}");
        }
    }
    Ok(())
}

fn pairing_cmd(home: &DeviceHome, cmd: PairingCmd) -> Result<(), Failure> {
    match cmd {
        PairingCmd::Status => {
            let p = admin::pairing_status(home)?;
            let iam = home.load_iam().map_err(DeviceError::from)?;
            for mode in PairingMode::ALL {
                let note = if mode == PairingMode::LocalInitial && p.initial_done {
                    " (already used)"
                } else {
                    ""
                };
                println!(
                    "{:<16} {}{note}",
                    mode.as_str(),
                    if p.enabled(mode) { "on" } else { "off" }
                );
            }
            println!("open pairing role: {}", iam.open_pairing_role);
            let invited: Vec<String> = admin::user_list(home)?
                .into_iter()
                .filter(|u| u.password.is_some())
                .map(|u| u.username)
                .collect();
            if !invited.is_empty() {
                println!("pending invitations: {}", invited.join(", "));
            }
        }
        PairingCmd::Enable { mode } => {
            admin::pairing_set(home, mode, true)?;
            println!("{mode} pairing is on");
        }
        PairingCmd::Disable { mode } => {
            admin::pairing_set(home, mode, false)?;
            println!("{mode} pairing is off");
        }
        PairingCmd::String { user, addrs } => {
            let ps = admin::pairing_string(home, user.as_deref(), addrs)?;
            if user.is_none() && !admin::pairing_status(home)?.password_open {
                println!(
                    "Note: password open pairing is off; switch it on with \
                     `tunnel-device pairing enable password-open`."
                );
            }
            print_pairing(&ps);
        }
    }
    Ok(())
}

fn iam_cmd(home: &DeviceHome, cmd: IamCmd) -> Result<ExitCode, Failure> {
    match cmd {
        IamCmd::Explain {
            user,
            action,
            service,
            remote,
            target_user,
            target_role,
            role,
        } => {
            let q = ExplainQuery {
                user,
                role,
                action,
                service,
                target_user,
                target_role,
                remote,
            };
            let (role, attrs, decision) = admin::explain(home, &q)?;
            let who = q.user.as_deref().unwrap_or("an unpaired key");
            println!(
                "{} {who} (role {role}) {} {action}{} from a {} connection",
                if decision.allowed { "ALLOW:" } else { "DENY:" },
                if decision.allowed { "may" } else { "may not" },
                q.service
                    .as_deref()
                    .map(|s| format!(" on service '{s}'"))
                    .unwrap_or_default(),
                if q.remote { "remote" } else { "local" }
            );
            println!("  {decision}");
            let attrs: Vec<String> = attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("  attributes: {}", attrs.join(", "));
            let source = if home.iam_path().exists() {
                home.iam_path().display().to_string()
            } else {
                "built-in (print them with `tunnel-device iam defaults`)".into()
            };
            println!("  policies: {source}");
            Ok(if decision.allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        IamCmd::Defaults => {
            print!("{DEFAULT_IAM_TOML}");
            Ok(ExitCode::SUCCESS)
        }
        IamCmd::Check => {
            let (state, iam) = home.load_checked()?;
            println!(
                "{}: roles {}; all {} users' roles are defined",
                iam.source
                    .as_ref()
                    .map_or_else(|| "built-in IAM".to_string(), |p| p.display().to_string()),
                iam.role_ids().join(", "),
                state.users.len()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
