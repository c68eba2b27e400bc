//! Target servers the tunnel forwards to, and a deterministic data pattern.
//!
//! Each server listens on `127.0.0.1:0`, serves every connection on its own thread, and records
//! how each connection ended, so tests can tell a clean EOF from a reset on the far side.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

use crate::{Proc, SOON, have, wait_for};

/// Deterministic test data: 64 KiB blocks of random bytes, each stamped with its index, so lost,
/// duplicated or reordered blocks change the hash.
#[derive(Debug, Clone)]
pub struct Pattern {
    base: Vec<u8>,
}

impl Pattern {
    const BLOCK: usize = 64 * 1024;

    /// The pattern for `seed`.
    pub fn new(seed: u64) -> Self {
        let mut base = vec![0u8; Self::BLOCK];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut base);
        Self { base }
    }

    fn block(&self, index: u64, buf: &mut [u8]) {
        buf.copy_from_slice(&self.base);
        buf[..8].copy_from_slice(&index.to_le_bytes());
    }

    /// Writes the first `len` bytes to `w`.
    ///
    /// # Errors
    /// The writer's error.
    pub fn write_to(&self, w: &mut impl Write, len: u64) -> io::Result<()> {
        let mut buf = vec![0u8; Self::BLOCK];
        let mut left = len;
        let mut i = 0;
        while left > 0 {
            self.block(i, &mut buf);
            let n = usize::try_from(left.min(Self::BLOCK as u64)).unwrap_or(Self::BLOCK);
            w.write_all(&buf[..n])?;
            left -= n as u64;
            i += 1;
        }
        Ok(())
    }

    /// SHA-256 (hex) of the first `len` bytes.
    pub fn sha256(&self, len: u64) -> String {
        let mut h = HashWriter::default();
        self.write_to(&mut h, len).expect("hashing cannot fail");
        h.hex()
    }
}

/// A `Write` that hashes and counts.
#[derive(Default)]
pub struct HashWriter {
    hasher: Sha256,
    /// Bytes written.
    pub len: u64,
}

impl std::fmt::Debug for HashWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HashWriter({} bytes)", self.len)
    }
}

impl HashWriter {
    /// The hex digest so far.
    pub fn hex(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }
}

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads `r` to EOF, returning (bytes, sha256 hex), or the read error.
///
/// # Errors
/// The first read error (e.g. `ConnectionReset`).
pub fn hash_reader(r: &mut impl Read) -> io::Result<(u64, String)> {
    let mut h = HashWriter::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok((h.len, h.hex())),
            Ok(n) => {
                h.write_all(&buf[..n])?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// How a server-side connection ended.
pub type Outcome = Result<(u64, String), io::ErrorKind>;

/// Shared bookkeeping of a test server.
#[derive(Debug, Default)]
pub struct Record {
    accepted: AtomicUsize,
    outcomes: Mutex<Vec<Outcome>>,
}

impl Record {
    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits until `n` connections have ended and returns their outcomes.
    pub fn wait_outcomes(&self, n: usize, timeout: Duration) -> Vec<Outcome> {
        wait_for(
            &format!("{n} server-side connection(s) to end"),
            timeout,
            || {
                let o = self.outcomes.lock().unwrap();
                (o.len() >= n).then(|| o.clone())
            },
        )
    }

    fn push(&self, o: Outcome) {
        self.outcomes.lock().unwrap().push(o);
    }
}

/// A TCP server on `127.0.0.1:0` running `handler` per connection on a thread.
#[derive(Debug)]
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What happened to its connections.
    pub record: Arc<Record>,
}

impl TestServer {
    fn start(handler: impl Fn(TcpStream) -> Outcome + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let record = Arc::new(Record::default());
        let rec = record.clone();
        let handler = Arc::new(handler);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                rec.accepted.fetch_add(1, Ordering::SeqCst);
                let rec = rec.clone();
                let handler = handler.clone();
                std::thread::spawn(move || rec.push(handler(stream)));
            }
        });
        Self { addr, record }
    }

    /// Echoes every byte; shuts down its write side after the client's EOF.
    pub fn echo() -> Self {
        Self::start(|mut s| {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        let _ = s.shutdown(Shutdown::Write);
                        return Ok((total, String::new()));
                    }
                    Ok(n) => {
                        s.write_all(&buf[..n]).map_err(|e| e.kind())?;
                        total += n as u64;
                    }
                    Err(e) => return Err(e.kind()),
                }
            }
        })
    }

    /// Reads to EOF, then answers `"<bytes> <sha256>\n"` and closes: proves that the client's
    /// half-close arrived and that the reverse direction still works after it.
    pub fn hasher() -> Self {
        Self::start(|mut s| {
            let (n, hex) = hash_reader(&mut s).map_err(|e| e.kind())?;
            s.write_all(format!("{n} {hex}\n").as_bytes())
                .map_err(|e| e.kind())?;
            let _ = s.shutdown(Shutdown::Write);
            Ok((n, hex))
        })
    }

    /// Sends `len` bytes of `Pattern::new(seed)`, then closes its write side.
    pub fn source(len: u64, seed: u64) -> Self {
        let pattern = Pattern::new(seed);
        Self::start(move |mut s| {
            pattern.write_to(&mut s, len).map_err(|e| e.kind())?;
            let _ = s.shutdown(Shutdown::Write);
            // Wait for the client to close so the data is not cut by our close.
            let mut sink = [0u8; 1024];
            while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
            Ok((len, String::new()))
        })
    }
}

/// Sends `len` bytes of `pattern` to `addr`, half-closes, and returns the hasher's answer.
///
/// # Errors
/// Any IO error on the way.
pub fn send_and_hash(addr: SocketAddr, pattern: &Pattern, len: u64) -> io::Result<(u64, String)> {
    let mut s = TcpStream::connect(addr)?;
    let mut reader = s.try_clone()?;
    let reply = std::thread::spawn(move || {
        let mut out = String::new();
        reader.read_to_string(&mut out).map(|_| out)
    });
    pattern.write_to(&mut s, len)?;
    s.shutdown(Shutdown::Write)?;
    let out = reply
        .join()
        .map_err(|_| io::Error::other("reader panicked"))??;
    let (n, hex) = out
        .trim()
        .split_once(' ')
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad reply {out:?}")))?;
    let n = n
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad reply {out:?}")))?;
    Ok((n, hex.to_string()))
}

/// A private OpenSSH server in inetd mode: the harness accepts each TCP connection on
/// `127.0.0.1:0` and runs `sshd -i` on it, so no port is ever guessed.
#[derive(Debug)]
pub struct Sshd {
    /// Where it listens.
    pub addr: SocketAddr,
    dir: PathBuf,
    user: String,
    pids: Arc<Mutex<Vec<u32>>>,
}

impl Sshd {
    /// Starts one, or `None` when `sshd`/`ssh` are not installed.
    pub fn start(dir: &Path) -> Option<Self> {
        let sshd = Path::new("/usr/sbin/sshd");
        if !sshd.exists() || !have("ssh") || !have("ssh-keygen") {
            return None;
        }
        std::fs::create_dir_all(dir).expect("sshd dir");
        for key in ["host_key", "client_key"] {
            let ok = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(key))
                .status()
                .expect("ssh-keygen")
                .success();
            assert!(ok, "ssh-keygen failed");
        }
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))
            .expect("authorized_keys");
        let config = format!(
            "HostKey {dir}/host_key\nAuthorizedKeysFile {dir}/authorized_keys\nStrictModes no\n\
             UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nPidFile none\nLogLevel ERROR\n\
             AllowTcpForwarding yes\nSubsystem sftp internal-sftp\n",
            dir = dir.display()
        );
        std::fs::write(dir.join("sshd_config"), config).expect("sshd_config");
        // As root, sshd wants its privilege-separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let user = String::from_utf8(Command::new("id").arg("-un").output().expect("id").stdout)
            .expect("user")
            .trim()
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cfg = dir.join("sshd_config");
        let log = dir.join("sshd.log");
        let pids: Arc<Mutex<Vec<u32>>> = Arc::default();
        let started = pids.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let Ok(out) = stream.try_clone() else {
                    continue;
                };
                let err = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log);
                let mut cmd = Command::new("/usr/sbin/sshd");
                cmd.arg("-i").arg("-e").arg("-f").arg(&cfg);
                cmd.stdin(Stdio::from(std::os::fd::OwnedFd::from(stream)))
                    .stdout(Stdio::from(std::os::fd::OwnedFd::from(out)));
                if let Ok(err) = err {
                    cmd.stderr(err);
                }
                if let Ok(mut child) = cmd.spawn() {
                    if let Ok(mut p) = started.lock() {
                        p.push(child.id());
                    }
                    std::thread::spawn(move || child.wait());
                }
            }
        });
        Some(Self {
            addr,
            dir: dir.to_owned(),
            user,
            pids,
        })
    }

    /// Process ids of the `sshd -i` processes started so far, in order.
    pub fn pids(&self) -> Vec<u32> {
        self.pids.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// `user@127.0.0.1`, the destination argument for [`Self::ssh_options`].
    pub fn destination(&self) -> String {
        format!("{}@127.0.0.1", self.user)
    }

    /// An `ssh` command to `127.0.0.1:port` (the tunnel's local end) with this server's key.
    pub fn ssh(&self, port: u16) -> Command {
        let mut cmd = self.ssh_options(port);
        cmd.arg(self.destination());
        cmd
    }

    /// As [`Self::ssh`] without the destination, so options (`-N`, `-L`, `-c`) can follow; add
    /// [`Self::destination`] last.
    pub fn ssh_options(&self, port: u16) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-F")
            .arg("/dev/null")
            .arg("-i")
            .arg(self.dir.join("client_key"))
            .arg("-p")
            .arg(port.to_string())
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.dir.join("known_hosts").display()
            ))
            .args([
                "-o",
                "StrictHostKeyChecking=accept-new",
                "-o",
                "BatchMode=yes",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "ConnectTimeout=20",
            ]);
        cmd
    }

    /// Runs `command` over `ssh` to `127.0.0.1:port`, asserts that it succeeded and returns its
    /// standard output.
    pub fn exec(&self, port: u16, command: &str) -> String {
        let out = self.ssh(port).arg(command).output().unwrap();
        assert!(
            out.status.success(),
            "ssh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Python's `http.server` serving a directory on `127.0.0.1:0`.
#[derive(Debug)]
pub struct HttpServer {
    /// Where it listens.
    pub addr: SocketAddr,
    _proc: Proc,
}

impl HttpServer {
    /// Serves `root`; `None` without python3.
    pub fn start(root: &Path, log: &Path) -> Option<Self> {
        if !have("python3") {
            return None;
        }
        let script = "import functools, http.server, sys\n\
                      h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])\n\
                      s = http.server.ThreadingHTTPServer(('127.0.0.1', 0), h)\n\
                      open(sys.argv[2], 'w').write(str(s.server_address[1]))\n\
                      s.serve_forever()\n";
        let port_file = log.with_extension("port");
        let mut cmd = Command::new("python3");
        cmd.arg("-c").arg(script).arg(root).arg(&port_file);
        let mut proc = Proc::spawn("http.server", cmd, log);
        let port: u16 = wait_for("http.server port", SOON, || {
            if let Some(st) = proc.try_status() {
                panic!("http.server exited with {st}: {}", proc.log());
            }
            std::fs::read_to_string(&port_file)
                .ok()?
                .trim()
                .parse()
                .ok()
        });
        Some(Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _proc: proc,
        })
    }
}
