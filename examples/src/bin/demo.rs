//! The one-command demo: a device and a client in temporary homes, a built-in target, pairing
//! with the device's invitation, a tunnel, and a few hundred MiB pushed through it with a progress
//! bar and checked by SHA-256.
//!
//! `cargo run --release -p tunnel-examples --bin demo [-- --size MIB] [--relay]`
//!
//! With `--relay` a `tunnel-relay` runs too, the device attaches to it, and the client is given
//! no device address at all: pairing and the tunnel go through the relay, end to end encrypted.
//!
//! Everything runs in this process through the library that the two binaries use; at the end the
//! demo prints the commands a user would type to do the same with `tunnel-device` and
//! `tunnel-client`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tunnel_relay::home::RelayHome;
use tunnel_shared::client::open::{ForwardSpec, LinkState, OpenOptions, Opener};
use tunnel_shared::client::{ClientHome, ConnectOptions, pair};
use tunnel_shared::config::{HostPort, RelayRef, ServiceSpec};
use tunnel_shared::device::admin::{self, InitOptions};
use tunnel_shared::device::{self, DeviceHome, RunOptions};
use tunnel_shared::identity::Fingerprint;
use tunnel_testkit::servers::TestServer;

const CHUNK: usize = 256 * 1024;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (size_mib, via_relay) = parse_args()?;
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_string()))
        .with_writer(std::io::stderr)
        .init();

    let dir = tempfile::Builder::new().prefix("tunnel-demo-").tempdir()?;
    let device_home = DeviceHome::new(dir.path().join("device"));
    let client_home = ClientHome::new(dir.path().join("client"));
    let shutdown = CancellationToken::new();

    // 1. A target service: reads everything, answers with its SHA-256.
    let target_addr = TestServer::hasher().addr;
    println!("1. Target service (a built-in hash server) on {target_addr}");

    // 2. Device home: key, device.toml with the service, and an invitation for the first user.
    let spec: ServiceSpec = format!("demo={target_addr},type=tcp").parse()?;
    let report = admin::init(
        &device_home,
        InitOptions {
            device_id: Some("demo-device".into()),
            name: Some("Demo device".into()),
            services: vec![spec.0],
            listen: vec!["127.0.0.1:0".parse()?],
            ..InitOptions::default()
        },
    )?;
    println!("2. Device initialised, fingerprint {}", report.fingerprint);

    // 2b. With --relay: a relay that serves this device, and the device attached to it.
    let relay_task = if via_relay {
        let (task, relay) = start_relay(&dir, &report.fingerprint, shutdown.clone()).await?;
        admin::relay_add(&device_home, &relay)?;
        println!(
            "   relay on udp/{} (fingerprint {}), device attaches to it",
            relay.addr,
            relay.fingerprint.fmt_short()
        );
        Some(task)
    } else {
        None
    };

    // 3. Run the device.
    let ready_file = dir.path().join("device.ready");
    let mut run_opts = RunOptions::new(device_home.dir());
    run_opts.ready_file = Some(ready_file.clone());
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let device_task = tokio::spawn(device::run(run_opts, shutdown.clone(), move |ready| {
        let _ = ready_tx.send(ready.listen[0]);
    }));
    let device_addr: SocketAddr = ready_rx.await.context("the device did not start")?;
    println!("3. Device listening on udp/{device_addr}");
    if via_relay {
        wait_attached(&ready_file).await?;
        println!("   attached to the relay");
    }

    // 4. Pair a fresh client key with the owner invitation's pairing string: it pins the device's
    //    key from the first packet and proves the one-time password with a channel-bound PAKE.
    let mut pairing = admin::pairing_string(
        &device_home,
        Some("owner"),
        vec![device_addr.to_string().parse::<HostPort>()?],
    )?;
    if via_relay {
        // As from anywhere: the client knows the device only through the relay.
        pairing.addresses.clear();
    }
    let paired = pair::pair_with_string(
        &client_home,
        &pairing,
        Some("demo"),
        None,
        Some("demo client".into()),
        &ConnectOptions::default(),
    )
    .await?;
    let client_fp = client_home.identity()?.fingerprint();
    println!(
        "4. Client key {} paired as user '{}' (role {})",
        client_fp.fmt_short(),
        paired.user.username,
        paired.user.role
    );

    // 5. Open a tunnel on an ephemeral local port.
    let forward: ForwardSpec = "0:demo".parse().map_err(anyhow::Error::msg)?;
    let opener = Opener::bind(OpenOptions::new(client_home.clone(), "demo", vec![forward])).await?;
    let local = opener.status().services[0].local;
    let mut link = opener.status().link.clone();
    let client_shutdown = CancellationToken::new();
    let client_task = tokio::spawn(opener.run(client_shutdown.clone()));
    let path = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let LinkState::Connected { path, .. } = &*link.borrow_and_update() {
                return Ok::<_, tokio::sync::watch::error::RecvError>(path.clone());
            }
            link.changed().await?;
        }
    })
    .await
    .context("the client did not reach the device within 10 s")?
    .context("the client stopped")?;
    println!(
        "5. Tunnel open ({path}): {local} -> device 'demo' -> service 'demo' -> {target_addr}"
    );

    // 6. Push data through it and check it arrived intact.
    let total = size_mib * 1024 * 1024;
    println!("6. Sending {size_mib} MiB through the tunnel…");
    let (elapsed, sent_hash, reply) = push(local, total).await?;
    let (n, hash) = reply
        .trim()
        .split_once(' ')
        .context("malformed reply from the target")?;
    if n != total.to_string() || hash != sent_hash {
        bail!("data corrupted: sent {total} bytes {sent_hash}, target got {n} bytes {hash}");
    }
    let gbit = total as f64 * 8.0 / elapsed.as_secs_f64() / 1e9;
    println!(
        "   verified: {total} bytes, SHA-256 {}…, in {:.2} s = {gbit:.2} Gbit/s",
        &hash[..16],
        elapsed.as_secs_f64()
    );

    client_shutdown.cancel();
    client_task.await??;
    shutdown.cancel();
    device_task.await??;
    if let Some(task) = relay_task {
        task.await??;
    }

    println!();
    println!("The same with the binaries (two machines, or two terminals):");
    if via_relay {
        println!("  relay$  tunnel-relay init          # prints RELAY_FP");
        println!(
            "  relay$  tunnel-relay device add demo-device --fingerprint {}",
            report.fingerprint
        );
        println!("  relay$  tunnel-relay run");
    }
    println!(
        "  device$ tunnel-device init --device-id demo-device --service demo={target_addr}   # prints a pairing string"
    );
    if via_relay {
        println!("  device$ tunnel-device relay add RELAY_HOST:5593 --fingerprint RELAY_FP");
        println!(
            "  device$ tunnel-device pairing string owner   # the string again, now with r=RELAY"
        );
    }
    println!("  device$ tunnel-device run");
    println!("  client$ tunnel-client pair - --name demo               # paste the pairing string");
    println!("  client$ tunnel-client open demo -L 2222:demo");
    println!("  client$ your-tcp-client 127.0.0.1 2222");
    Ok(())
}

fn parse_args() -> anyhow::Result<(u64, bool)> {
    let mut args = std::env::args().skip(1);
    let mut size = 512;
    let mut relay = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size" => {
                size = args
                    .next()
                    .context("--size needs a value in MiB")?
                    .parse()
                    .context("--size takes a whole number of MiB")?;
            }
            "--relay" => relay = true,
            "-h" | "--help" => {
                println!("usage: demo [--size MIB] [--relay]");
                std::process::exit(0);
            }
            other => bail!("unknown argument '{other}' (usage: demo [--size MIB] [--relay])"),
        }
    }
    if size == 0 {
        bail!("--size must be at least 1 MiB");
    }
    Ok((size, relay))
}

type RelayTask = tokio::task::JoinHandle<Result<(), tunnel_relay::server::RelayError>>;

/// Starts a relay on loopback that serves `device` (by its fingerprint).
async fn start_relay(
    dir: &tempfile::TempDir,
    device: &Fingerprint,
    shutdown: CancellationToken,
) -> anyhow::Result<(RelayTask, RelayRef)> {
    let home = RelayHome::new(dir.path().join("relay"));
    let fingerprint = home.init(&["127.0.0.1:0".parse()?], false)?;
    home.add_device("demo-device", device)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(tunnel_relay::server::run(
        tunnel_relay::server::RunOptions::new(home.dir()),
        shutdown,
        move |ready| {
            let _ = tx.send(ready.listen[0]);
        },
    ));
    let addr: SocketAddr = rx.await.context("the relay did not start")?;
    let relay = RelayRef {
        addr: addr.to_string().parse()?,
        fingerprint,
    };
    Ok((task, relay))
}

/// Waits until the device's ready file says it is attached to its relay.
async fn wait_attached(ready_file: &std::path::Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(ready_file).unwrap_or_default();
        let attached = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| {
                v["relays"][0]["state"]
                    .as_str()
                    .map(|s| s.starts_with("attached"))
            })
            .unwrap_or(false);
        if attached {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the device did not attach to the relay within 10 s (ready file: {text})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn push(addr: SocketAddr, total: u64) -> anyhow::Result<(Duration, String, String)> {
    let mut block = vec![0u8; CHUNK];
    rand::thread_rng().fill_bytes(&mut block);
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "   [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )?
        .progress_chars("=> "),
    );
    let conn = TcpStream::connect(addr).await?;
    let (mut rd, mut wr) = conn.into_split();
    let reply = tokio::spawn(async move {
        let mut s = String::new();
        rd.read_to_string(&mut s).await.map(|_| s)
    });
    let started = Instant::now();
    let mut hasher = Sha256::new();
    let mut sent = 0u64;
    let mut i = 0u64;
    while sent < total {
        // Each block carries its index, so lost or reordered blocks change the hash.
        block[..8].copy_from_slice(&i.to_le_bytes());
        let n = usize::try_from((total - sent).min(CHUNK as u64))?;
        hasher.update(&block[..n]);
        wr.write_all(&block[..n]).await?;
        sent += n as u64;
        i += 1;
        bar.set_position(sent);
    }
    wr.shutdown().await?;
    let reply = reply.await??;
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    Ok((elapsed, hex(&hasher.finalize()), reply))
}

fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}
