#!/usr/bin/env python3
# New-connection latency and idle RSS, two builds side by side (an A/B check that a change costs
# nothing per connection). For each build: a device and `tunnel-client open` on loopback in front
# of one echo server; then 8 rounds of 100 samples (connect, 1-byte echo, close), alternating which
# build goes first. Prints the median and p99 per build and the idle RSS of both processes.
#
#   python3 bench/latency-ab.py OLD_BIN_DIR NEW_BIN_DIR
#   e.g. git worktree add /tmp/old 36409f8 && (cd /tmp/old && cargo build --release --bins)
#        python3 bench/latency-ab.py /tmp/old/target/release target/release
import json, os, socket, statistics, subprocess, sys, tempfile, threading, time

def echo_server():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0)); s.listen(512)
    def serve(c):
        try:
            while True:
                d = c.recv(65536)
                if not d: break
                c.sendall(d)
        finally: c.close()
    def loop():
        while True:
            c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=serve, args=(c,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
    return s.getsockname()[1]

def wait_file(p):
    for _ in range(300):
        try:
            return json.load(open(p))
        except Exception:
            time.sleep(0.05)
    raise SystemExit("no ready file " + p)

def setup(bindir, port, tmp):
    dev, cli = f"{tmp}/dev", f"{tmp}/cli"
    subprocess.run([f"{bindir}/tunnel-device", "--home", dev, "init", "--no-invite", "--listen", "127.0.0.1:0", "--service", f"echo=127.0.0.1:{port}"], check=True, capture_output=True)
    fp = subprocess.run([f"{bindir}/tunnel-client", "--home", cli, "fingerprint"], check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([f"{bindir}/tunnel-device", "--home", dev, "user", "add", "a", "--fingerprint", fp, "--role", "Owner"], check=True, capture_output=True)
    d = subprocess.Popen([f"{bindir}/tunnel-device", "--home", dev, "run", "--ready-file", f"{tmp}/d.ready"], stderr=subprocess.DEVNULL)
    r = wait_file(f"{tmp}/d.ready")
    subprocess.run([f"{bindir}/tunnel-client", "--home", cli, "device", "add", "cam", "--addr", r["listen"][0], "--fingerprint", r["fingerprint"]], check=True, capture_output=True)
    c = subprocess.Popen([f"{bindir}/tunnel-client", "--home", cli, "open", "cam", "-L", "0:echo", "--ready-file", f"{tmp}/c.ready"], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    for _ in range(300):
        j = wait_file(f"{tmp}/c.ready")
        if j.get("path"): break
        time.sleep(0.05)
    host, p = j["services"][0]["local"].rsplit(":", 1)
    return (d, c), (host, int(p))

def sample(addr, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        s = socket.create_connection(addr); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"x"); assert s.recv(1) == b"x"
        out.append((time.perf_counter() - t) * 1000); s.close()
    return out

def rss(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) / 1024

port = echo_server()
builds = {"old": sys.argv[1], "new": sys.argv[2]}
procs, addrs = {}, {}
for k, b in builds.items():
    procs[k], addrs[k] = setup(b, port, tempfile.mkdtemp())
time.sleep(1)
res = {k: [] for k in builds}
for r in range(8):
    for k in (["old", "new"] if r % 2 == 0 else ["new", "old"]):
        res[k] += sample(addrs[k], 100)
for k in builds:
    v = sorted(res[k])
    print(f"{k}: median {statistics.median(v):.3f} ms  p99 {v[int(len(v)*0.99)]:.3f}  n={len(v)}  idle RSS client {rss(procs[k][1].pid):.1f} MiB device {rss(procs[k][0].pid):.1f} MiB")
for k in builds:
    for p in procs[k]: p.terminate()
