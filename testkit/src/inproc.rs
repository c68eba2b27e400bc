//! Devices and clients in this process, for the library's in-process tests: a device running
//! [`tunnel_shared::device::run`] in a temporary home, clients with fresh keys bound to a chosen
//! local address (127.0.0.1 is local to the test device, 127.0.0.2 remote), an async echo server,
//! and a raw tunnel stream that skips the client's own checks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tunnel_shared::client::{ConnectError, ConnectOptions, Session, Target, connect_to};
use tunnel_shared::config::{HostPort, TransportSettings};
use tunnel_shared::device::admin::{self, InitOptions};
use tunnel_shared::device::{self, DeviceHome, RunOptions};
use tunnel_shared::identity::{Fingerprint, SecretKey};
use tunnel_shared::proto::StreamCode;
use tunnel_shared::secret::Secret;
use tunnel_shared::state::DeviceState;
use tunnel_shared::transport::{self, Identity};
use tunnel_shared::wire;

/// A client address the test device counts as local.
pub const LOCAL: &str = "127.0.0.1";
/// A client address the test device counts as remote (its `local_networks` is 127.0.0.1/32).
pub const REMOTE: &str = "127.0.0.2";

/// A device running in this process.
#[derive(Debug)]
pub struct TestDevice {
    /// Its home.
    pub home: DeviceHome,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its key.
    pub fingerprint: Fingerprint,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), device::DeviceError>>,
    _dir: tempfile::TempDir,
}

impl TestDevice {
    /// Starts a device with services `ssh` and `cam` on `echo`, after `prepare` edits its state.
    pub async fn start(echo: SocketAddr, prepare: impl FnOnce(&mut DeviceState)) -> Self {
        Self::start_with(echo, prepare, "", None).await
    }

    /// A device with password-invite pairing on and an invitation for a `Guest` user `guest`;
    /// returns it with the invitation's password.
    pub async fn with_guest_invite(echo: SocketAddr) -> (Self, Secret) {
        let dev = Self::start(echo, |s| {
            s.pairing
                .set(tunnel_shared::pairing::PairingMode::PasswordInvite, true);
            s.invite_user("guest", "Guest").unwrap();
        })
        .await;
        let pw = dev.state().user("guest").unwrap().password.clone().unwrap();
        (dev, pw)
    }

    /// As [`Self::start`], with extra `device.toml` text and an optional `iam.toml`.
    pub async fn start_with(
        echo: SocketAddr,
        prepare: impl FnOnce(&mut DeviceState),
        extra_toml: &str,
        iam_toml: Option<&str>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let home = DeviceHome::new(dir.path().join("device"));
        let report = admin::init(
            &home,
            InitOptions {
                device_id: Some("dev".into()),
                name: Some("Test".into()),
                services: vec![
                    format!("ssh={echo},type=ssh")
                        .parse::<tunnel_shared::config::ServiceSpec>()
                        .unwrap()
                        .0,
                    format!("cam={echo},type=rtsp")
                        .parse::<tunnel_shared::config::ServiceSpec>()
                        .unwrap()
                        .0,
                ],
                listen: vec!["127.0.0.1:0".parse().unwrap()],
                owner_invite: None,
                ..InitOptions::default()
            },
        )
        .unwrap();
        let mut doc: toml_edit::DocumentMut = std::fs::read_to_string(home.config_path())
            .unwrap()
            .parse()
            .unwrap();
        let extra: toml_edit::DocumentMut = format!(
            "[network]\ntrust_private_networks = false\nlocal_networks = [\"127.0.0.1/32\"]\nmdns = false\n{extra_toml}"
        )
        .parse()
        .unwrap();
        for (table, item) in extra.iter() {
            for (k, v) in item.as_table().unwrap().iter() {
                doc[table][k] = v.clone();
            }
        }
        std::fs::write(home.config_path(), doc.to_string()).unwrap();
        if let Some(iam) = iam_toml {
            std::fs::write(home.iam_path(), iam).unwrap();
        }
        home.state_store()
            .update(|s| {
                prepare(s);
                Ok(())
            })
            .unwrap();
        let shutdown = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut opts = RunOptions::new(home.dir());
        opts.reload_interval = Duration::from_millis(100);
        let task = tokio::spawn(device::run(opts, shutdown.clone(), move |r| {
            let _ = tx.send(r.listen[0]);
        }));
        let addr = rx.await.expect("device started");
        Self {
            home,
            addr,
            fingerprint: report.fingerprint,
            shutdown,
            task,
            _dir: dir,
        }
    }

    /// Its `state.json`.
    pub fn state_path(&self) -> PathBuf {
        self.home.state_path()
    }

    /// Its state, read from the file.
    pub fn state(&self) -> DeviceState {
        self.home.state_store().load().unwrap()
    }

    /// Its `state.json` bytes (denied requests must leave them identical).
    pub fn state_bytes(&self) -> Vec<u8> {
        std::fs::read(self.state_path()).unwrap()
    }

    /// Shuts it down and checks that `run` ended without error.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// A client key bound to one local address.
#[derive(Debug)]
pub struct TestClient {
    /// Its key and certificate.
    pub identity: Identity,
    /// Its endpoint.
    pub endpoint: quinn::Endpoint,
}

impl TestClient {
    /// A fresh key on `on` (an IP address).
    pub fn new(on: &str) -> Self {
        Self::with_key(on, SecretKey::generate())
    }

    /// `key` on `on`.
    pub fn with_key(on: &str, key: SecretKey) -> Self {
        let settings = TransportSettings::default();
        let endpoint =
            transport::client_endpoint_on(format!("{on}:0").parse().unwrap(), &settings).unwrap();
        Self {
            identity: Identity::new(key).unwrap(),
            endpoint,
        }
    }

    /// Its key's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.identity.fingerprint()
    }

    /// Connects to `dev`, pinned, presenting `sct`.
    ///
    /// # Errors
    /// The connection error.
    pub async fn connect(
        &self,
        dev: &TestDevice,
        sct: Option<&Secret>,
    ) -> Result<Session, ConnectError> {
        let addrs = [HostPort {
            host: tunnel_shared::config::Host::Ip(dev.addr.ip()),
            port: dev.addr.port(),
        }];
        let opts = ConnectOptions {
            timeout: Duration::from_secs(10),
            ..ConnectOptions::default()
        };
        connect_to(
            &self.endpoint,
            &self.identity,
            &Target {
                name: "dev",
                addresses: &addrs,
                pin: Some(dev.fingerprint),
                sct,
                relays: &[],
                device_id: None,
            },
            &opts,
        )
        .await
    }
}

/// An echo server on 127.0.0.1:0, on the current runtime.
pub async fn echo_server() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(serve_echo(l));
    addr
}

/// Echoes every connection `listener` accepts until the listener fails.
pub async fn serve_echo(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            // EMFILE and friends: back off briefly instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            let mut b = [0u8; 4096];
            while let Ok(n) = s.read(&mut b).await {
                if n == 0 || s.write_all(&b[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Opens a tunnel stream to `service`, sends a byte and waits for the echo.
/// `Ok(())` when it echoed, `Err(code)` when the device reset the stream, and
/// `Err(StreamCode::LIMIT_REACHED)` when the device gives this connection no stream credit (a key
/// on no user may open the control stream only).
pub async fn tunnel(session: &Session, service: &str) -> Result<(), StreamCode> {
    let header = wire::tunnel_header(service).unwrap();
    let opened = tokio::time::timeout(
        Duration::from_secs(2),
        wire::open_tunnel(&session.conn, header),
    )
    .await
    .map_err(|_| StreamCode::LIMIT_REACHED)?;
    let (mut send, mut recv) = opened.map_err(|_| StreamCode::CANCELLED)?;
    let _ = send.write_all(b"x").await;
    let mut b = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut b)).await {
        Ok(Ok(())) => {
            let _ = send.finish();
            Ok(())
        }
        Ok(Err(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(_)))) => {
            Err(StreamCode::CANCELLED)
        }
        Ok(Err(quinn::ReadExactError::ReadError(quinn::ReadError::Reset(code)))) => {
            Err(StreamCode::from_varint(code))
        }
        other => panic!("unexpected tunnel outcome {other:?}"),
    }
}

/// A user with a key, for `prepare` closures: returns its token.
///
/// # Panics
/// When the name or key is taken.
pub fn add_user(s: &mut DeviceState, name: &str, role: &str, fp: Fingerprint) -> Secret {
    s.add_user(name, role, fp, None).unwrap().sct.clone()
}
