//! The relay in the benchmark: a `tunnel-relay` on loopback that the benchmark's device attaches
//! to, an `open` through it (measured in the same interleaved rounds as the direct paths), and
//! the relay's memory per attached device and per channel with many simulated devices.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use tunnel_shared::framed::{read_frame, write_frame};
use tunnel_shared::identity::{Fingerprint, SecretKey};
use tunnel_shared::relay::{self, LegHello, RelayEvent, TokenHash};
use tunnel_shared::secret::Secret;
use tunnel_shared::transport::{self, Identity, TransportSettings};

use crate::sys::{Child, rss_kib, wait_file};
use crate::{Bench, echo_once, output, pin_client, start_open};

/// The client's name for the benchmark device reached through the relay only.
pub(crate) const RELAYED_NAME: &str = "dev-relayed";

/// A running relay.
pub(crate) struct RelayProc {
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
    pub(crate) fingerprint: String,
    home: PathBuf,
}

impl RelayProc {
    /// `device.toml` text that attaches a device to it.
    pub(crate) fn device_toml(&self) -> String {
        format!(
            "[[relay]]\naddr = \"{}\"\nfingerprint = \"{}\"\n",
            self.addr, self.fingerprint
        )
    }
}

fn relay_cmd(b: &Bench, home: &std::path::Path) -> Command {
    let mut c = Command::new(b.bin("tunnel-relay"));
    c.arg("--home").arg(home);
    c
}

fn start_in(b: &Bench, home: PathBuf, tag: &str) -> anyhow::Result<RelayProc> {
    let ready = b.path(&format!("{tag}.ready"));
    let _ = std::fs::remove_file(&ready);
    let child = Child::spawn(
        "tunnel-relay",
        relay_cmd(b, &home)
            .args(["--log-level", "warn", "run", "--ready-file"])
            .arg(&ready),
        &b.path(&format!("{tag}.log")),
    )?;
    let (addr, fingerprint) = wait_file(&ready, Duration::from_secs(20), |s| {
        let v: Value = serde_json::from_str(s).ok()?;
        Some((
            v["listen"][0].as_str()?.parse().ok()?,
            v["fingerprint"].as_str()?.to_string(),
        ))
    })?;
    Ok(RelayProc {
        child,
        addr,
        fingerprint,
        home,
    })
}

/// `tunnel-relay init` of `home`, listening on `127.0.0.1:0`.
fn init(b: &Bench, home: &std::path::Path) -> anyhow::Result<()> {
    let ok = relay_cmd(b, home)
        .args(["init", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .status()?
        .success();
    if !ok {
        bail!("tunnel-relay init failed");
    }
    Ok(())
}

/// Initialises and starts a relay on `127.0.0.1:0`.
pub(crate) fn start(b: &Bench) -> anyhow::Result<RelayProc> {
    let home = b.path("relay");
    init(b, &home)?;
    start_in(b, home, "relay")
}

/// An `open` through the relay to the device started as `device` (its home and ready file are
/// the benchmark's).
pub(crate) struct Relayed {
    pub(crate) client: Child,
    pub(crate) iperf: u16,
    pub(crate) echo: u16,
}

/// Serves the running device `device` on the relay, pins it on the client through the relay
/// only, and starts `open` to it.
pub(crate) fn open_relayed(b: &Bench, relay: &RelayProc, device: &str) -> anyhow::Result<Relayed> {
    let ready_path = b.path(&format!("{device}.ready"));
    let ready: Value = serde_json::from_str(&std::fs::read_to_string(&ready_path)?)?;
    let (id, fp) = (
        ready["device_id"]
            .as_str()
            .context("device_id")?
            .to_string(),
        ready["fingerprint"]
            .as_str()
            .context("fingerprint")?
            .to_string(),
    );
    output(relay_cmd(b, &relay.home).args(["device", "add", &id, "--fingerprint", &fp]))?;
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(b.path(device).join("state.json"))?)?;
    let token = state["users"][0]["sct"]
        .as_str()
        .context("the bench user's token")?
        .to_string();
    pin_client(
        b,
        RELAYED_NAME,
        &[
            "--fingerprint",
            &fp,
            "--device-id",
            &id,
            "--relay",
            &relay.addr.to_string(),
            "--relay-fingerprint",
            &relay.fingerprint,
            "--sct",
            &token,
        ],
    )?;
    // The device attaches once the relay has reloaded relay.toml (its first try may be early).
    wait_file(&ready_path, Duration::from_secs(30), |s| {
        let v: Value = serde_json::from_str(s).ok()?;
        v["relays"][0]["state"]
            .as_str()?
            .starts_with("attached")
            .then_some(())
    })?;
    // Relayed for good: what the relay itself costs and carries.
    open_through(b, "relayed-open", &["--no-punch"])
}

/// A relayed `open` whose leg to the relay rides TLS over TCP (a client on a network that
/// blocks UDP); the device's leg stays UDP.
pub(crate) fn open_relayed_tcp(b: &Bench) -> anyhow::Result<Relayed> {
    open_through(b, "tcp-open", &["--no-punch", "--relay-via", "tcp"])
}

/// Starts `open` through the relay (tagged `tag`, with `extra` flags) and checks it echoes.
fn open_through(b: &Bench, tag: &str, extra: &[&str]) -> anyhow::Result<Relayed> {
    let (child, ports) = start_open(b, RELAYED_NAME, &["0:iperf", "0:echo"], tag, extra)?;
    wait_file(
        &b.path(&format!("{tag}.ready")),
        Duration::from_secs(20),
        |s| {
            let v: Value = serde_json::from_str(s).ok()?;
            v["path"].as_str()?.starts_with("relayed").then_some(())
        },
    )
    .context("open did not connect through the relay")?;
    let r = Relayed {
        client: child,
        iperf: ports["iperf"],
        echo: ports["echo"],
    };
    echo_once(r.echo).context("the relayed tunnel does not echo")?;
    Ok(r)
}

/// Milliseconds from starting `open` (relay only, punching on) to its first path, relayed, and
/// to the direct path.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct PunchTimes {
    pub(crate) relayed: Vec<f64>,
    pub(crate) direct: Vec<f64>,
}

/// Starts `open` through the relay with hole punching on, `samples` times, timing each up to
/// the direct path; the last one is kept running for the throughput rounds.
pub(crate) fn punch_times(b: &Bench, samples: usize) -> anyhow::Result<(Relayed, PunchTimes)> {
    let mut times = PunchTimes::default();
    let path_of = |s: &str| -> Option<String> {
        let v: Value = serde_json::from_str(s).ok()?;
        v["path"].as_str().map(ToString::to_string)
    };
    for i in 0..samples {
        let ready = b.path("punched-open.ready");
        let t0 = std::time::Instant::now();
        let (child, ports) =
            start_open(b, RELAYED_NAME, &["0:iperf", "0:echo"], "punched-open", &[])?;
        // `start_open` returns as soon as the ready file names the forwards: the first path.
        let connected = t0.elapsed().as_secs_f64() * 1000.0;
        let first = wait_file(&ready, Duration::from_secs(1), |s| path_of(s))?;
        if first.starts_with("relayed") {
            times.relayed.push(connected);
        }
        wait_file(&ready, Duration::from_secs(20), |s| {
            (path_of(s)? == "direct (punched)").then_some(())
        })
        .context("the relayed connection did not go direct")?;
        times.direct.push(t0.elapsed().as_secs_f64() * 1000.0);
        if i + 1 == samples {
            let r = Relayed {
                client: child,
                iperf: ports["iperf"],
                echo: ports["echo"],
            };
            echo_once(r.echo).context("the punched tunnel does not echo")?;
            return Ok((r, times));
        }
    }
    anyhow::bail!("no samples")
}

/// The relay's memory with many attached devices and open channels.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct Scale {
    /// (devices, channels, RSS idle, RSS with the devices, RSS with the channels too, errors),
    /// RSS in KiB.
    pub(crate) rows: Vec<(usize, usize, u64, u64, u64, usize)>,
}

/// A leg from this process: its connection, kept open.
type Leg = (quinn::Connection, quinn::SendStream, quinn::RecvStream);

async fn leg(
    endpoint: &quinn::Endpoint,
    key: SecretKey,
    relay: SocketAddr,
    pin: Fingerprint,
    hello: impl FnOnce(&quinn::Connection) -> LegHello,
) -> anyhow::Result<Leg> {
    let settings = TransportSettings::default();
    let identity = Identity::new(key)?;
    let (mut cfg, _) = transport::client_config(&identity, relay::ALPN, Some(pin), &settings)?;
    cfg.transport_config(Arc::new(transport::leg_transport_config(&settings, 0)));
    let conn = endpoint
        .connect_with(cfg, relay, transport::SERVER_NAME)?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, &hello(&conn), relay::MAX_FRAME).await?;
    match read_frame::<RelayEvent>(&mut recv, relay::MAX_FRAME).await? {
        Some(RelayEvent::Attached { .. } | RelayEvent::Connected { .. }) => Ok((conn, send, recv)),
        other => bail!("refused: {other:?}"),
    }
}

/// What a simulated leg says first: attach as a device, or connect to one as a client.
enum Hello {
    Attach(LegHello),
    Connect {
        device_id: String,
        channel: u64,
        token: Secret,
    },
}

impl Hello {
    fn frame(self, conn: &quinn::Connection) -> LegHello {
        match self {
            Self::Attach(h) => h,
            Self::Connect {
                device_id,
                channel,
                token,
            } => {
                let binding =
                    transport::leg::binding(conn, &device_id, channel).unwrap_or_default();
                LegHello::Connect {
                    version: relay::PROTOCOL_VERSION,
                    proof: relay::Proof::for_token(Some(&token), &binding),
                    device_id,
                    channel,
                }
            }
        }
    }
}

/// Opens `hellos.len()` legs, 32 at a time; returns those that succeeded and the error count.
async fn legs(
    endpoint: &quinn::Endpoint,
    relay: SocketAddr,
    pin: Fingerprint,
    hellos: Vec<(SecretKey, Hello)>,
) -> (Vec<Leg>, usize) {
    let mut ok = Vec::new();
    let mut errors = 0;
    let mut it = hellos.into_iter().peekable();
    while it.peek().is_some() {
        let batch: Vec<_> = it.by_ref().take(32).collect();
        let futs = batch
            .into_iter()
            .map(|(k, h)| leg(endpoint, k, relay, pin, move |c| h.frame(c)));
        for r in futures_join(futs).await {
            match r {
                Ok(l) => ok.push(l),
                Err(_) => errors += 1,
            }
        }
    }
    (ok, errors)
}

/// Awaits all of `futs` concurrently on this task.
async fn futures_join<F: Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..futs.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in futs.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// For each count: a relay serving that many devices, each attached by a leg from this
/// process, then channels to one of them from as many client keys.
pub(crate) fn scale(b: &Bench) -> anyhow::Result<Scale> {
    let counts: &[usize] = if b.opts.quick {
        &[200]
    } else {
        &[1000, 10_000]
    };
    let mut out = Scale::default();
    for &n in counts {
        let channels = n.min(1000);
        let keys: Vec<SecretKey> = (0..n).map(|_| SecretKey::generate()).collect();
        let home = b.path(&format!("relay-{n}"));
        init(b, &home)?;
        let mut toml = format!(
            "listen = [\"127.0.0.1:0\"]\n[limits]\nmax_legs = {}\nmax_channels_per_device = {}\n\
             max_handshakes = 4096\nretry_threshold = 4096\nmax_handshakes_per_source = 4096\n",
            n + channels + 100,
            channels + 10
        );
        for (i, k) in keys.iter().enumerate() {
            toml.push_str(&format!(
                "[[device]]\nid = \"sim-{i}\"\nfingerprint = \"{}\"\n",
                k.fingerprint()
            ));
        }
        std::fs::write(home.join("relay.toml"), toml)?;
        let relay = start_in(b, home, &format!("relay-{n}"))?;
        let pin: Fingerprint = relay.fingerprint.parse()?;
        let pid = relay.child.pid();
        let token = Secret::new("bench-token-0123456789");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let row = rt.block_on(async {
            let endpoint = transport::client_endpoint(&TransportSettings::default())?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let idle = rss_kib(pid);
            let hellos = keys
                .into_iter()
                .enumerate()
                .map(|(i, k)| {
                    (
                        k,
                        Hello::Attach(LegHello::Attach {
                            version: relay::PROTOCOL_VERSION,
                            device_id: format!("sim-{i}"),
                            // An owner's: the channels below come from one token.
                            tokens: vec![relay::TokenEntry {
                                hash: TokenHash::of(&token),
                                owner: true,
                            }],
                        }),
                    )
                })
                .collect();
            let (devices, mut errors) = legs(&endpoint, relay.addr, pin, hellos).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let with_devices = rss_kib(pid);
            let hellos = (0..channels)
                .map(|i| {
                    (
                        SecretKey::generate(),
                        Hello::Connect {
                            device_id: "sim-0".into(),
                            channel: i as u64,
                            token: token.clone(),
                        },
                    )
                })
                .collect();
            let (chans, e) = legs(&endpoint, relay.addr, pin, hellos).await;
            errors += e;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let with_channels = rss_kib(pid);
            eprintln!(
                "[bench]   relay: {} devices, {} channels, {errors} errors",
                devices.len(),
                chans.len()
            );
            drop((devices, chans));
            endpoint.close(0u32.into(), b"done");
            anyhow::Ok((n, channels, idle, with_devices, with_channels, errors))
        })?;
        out.rows.push(row);
        drop(relay);
    }
    Ok(out)
}
