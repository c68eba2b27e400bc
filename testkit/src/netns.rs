//! Network namespaces for tests that need other hosts: [`NetNs`], a namespace joined to this one
//! by a veth pair on a TEST-NET address (198.51.100.0/24 or 203.0.113.0/24, neither private nor
//! loopback, so the device counts connections from it as remote); and [`Homes`], two homes behind
//! NAT routers joined by an "internet" namespace where loss, rate limits and link faults are
//! applied. Everything is removed on drop.

use std::process::{Command, Stdio};

/// Runs `f` on a thread that has joined namespace `name` (as `ip netns add` made it): sockets it
/// creates belong to that namespace for good (a listener keeps accepting there whichever thread
/// accepts), and so do threads and processes it starts. So any server of this kit can run inside
/// a namespace (`in_ns(&ns.name, TestServer::echo)`), and any client too.
///
/// # Panics
/// When the namespace does not exist or cannot be joined (needs root), or `f` panics.
pub fn in_ns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::os::fd::AsFd;
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap_or_else(|e| panic!("cannot join namespace {path}: {e}"));
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// A namespace and its link to the host.
#[derive(Debug)]
pub struct NetNs {
    /// Namespace name.
    pub name: String,
    /// This host's address on the link.
    pub host_ip: String,
    /// The namespace's address on the link.
    pub ns_ip: String,
    host_if: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl NetNs {
    /// Creates one. Panics with a clear message where namespaces cannot be created (CI runs as
    /// root and `.ci/run` installs iproute2).
    pub fn create() -> Self {
        for _ in 0..20 {
            let tag = format!("{:08x}", rand::random::<u32>());
            let (net, k) = if rand::random::<bool>() {
                ("198.51.100", rand::random::<u8>() % 64)
            } else {
                ("203.0.113", rand::random::<u8>() % 64)
            };
            let host_ip = format!("{net}.{}", u32::from(k) * 4 + 1);
            let ns_ip = format!("{net}.{}", u32::from(k) * 4 + 2);
            let ns = Self {
                name: format!("tnl-{tag}"),
                host_if: format!("th{tag}"),
                host_ip,
                ns_ip,
            };
            let peer = format!("tn{tag}");
            assert!(
                ip(&["netns", "add", &ns.name]),
                "cannot create a network namespace (`ip netns add` needs root and iproute2; \
                 bash .ci/run installs it and CI runs as root)"
            );
            let ok = ip(&["link", "add", &ns.host_if, "type", "veth", "peer", "name", &peer])
                && ip(&["link", "set", &peer, "netns", &ns.name])
                && ip(&["addr", "add", &format!("{}/30", ns.host_ip), "dev", &ns.host_if])
                && ip(&["link", "set", &ns.host_if, "up"])
                && ip(&["-n", &ns.name, "addr", "add", &format!("{}/30", ns.ns_ip), "dev", &peer])
                && ip(&["-n", &ns.name, "link", "set", &peer, "up"])
                && ip(&["-n", &ns.name, "link", "set", "lo", "up"])
                // Multicast (mDNS) leaves through the link.
                && ip(&["-n", &ns.name, "route", "add", "224.0.0.0/4", "dev", &peer]);
            if ok {
                return ns;
            }
            // Most likely an address another test process took: try another block.
            drop(ns);
        }
        panic!("could not set up a network namespace after 20 attempts");
    }

    /// `program` run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys its end of the veth pair, and with it ours.
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Something that can run a program inside it (a namespace of this module).
pub trait Namespace {
    /// `program` run inside it.
    fn command(&self, program: &std::ffi::OsStr) -> Command;
}

impl Namespace for NetNs {
    fn command(&self, program: &std::ffi::OsStr) -> Command {
        Self::command(self, program)
    }
}

/// One network namespace of a [`Homes`] topology (or any other), deleted on drop.
#[derive(Debug)]
pub struct Ns {
    /// Its name.
    pub name: String,
}

impl Ns {
    /// A new, empty namespace with `lo` up.
    pub fn new(role: &str) -> Self {
        let name = format!("tn{role}{:08x}", rand::random::<u32>());
        assert!(
            ip(&["netns", "add", &name]),
            "cannot create a network namespace (`ip netns add` needs root and iproute2; bash \
             .ci/run installs it and CI runs as root)"
        );
        let ns = Self { name };
        assert!(ip(&["-n", &ns.name, "link", "set", "lo", "up"]));
        ns
    }

    /// Runs `sh -c script` inside; panics with its output when it fails.
    pub fn sh(&self, script: &str) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", script])
            .output()
            .expect("ip netns exec");
        assert!(
            out.status.success(),
            "in {}: `{script}` failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Loads an nftables ruleset inside.
    pub fn nft(&self, ruleset: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft");
        std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), ruleset.as_bytes())
            .expect("nft input");
        let out = child.wait_with_output().expect("nft");
        assert!(
            out.status.success(),
            "nft in {} refused:\n{ruleset}\n{}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Namespace for Ns {
    fn command(&self, program: &std::ffi::OsStr) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Joins `a` and `b` with a veth pair: `a_if` with `a_cidr` in `a`, `b_if` with `b_cidr` in `b`.
pub fn link(a: &Ns, a_if: &str, a_cidr: &str, b: &Ns, b_if: &str, b_cidr: &str) {
    let tmp_a = format!("v{:08x}", rand::random::<u32>());
    let tmp_b = format!("v{:08x}", rand::random::<u32>());
    assert!(
        ip(&[
            "link", "add", &tmp_a, "type", "veth", "peer", "name", &tmp_b
        ]) && ip(&["link", "set", &tmp_a, "netns", &a.name])
            && ip(&["link", "set", &tmp_b, "netns", &b.name])
            && ip(&["-n", &a.name, "link", "set", &tmp_a, "name", a_if])
            && ip(&["-n", &b.name, "link", "set", &tmp_b, "name", b_if])
            && ip(&["-n", &a.name, "addr", "add", a_cidr, "dev", a_if])
            && ip(&["-n", &b.name, "addr", "add", b_cidr, "dev", b_if])
            && ip(&["-n", &a.name, "link", "set", a_if, "up"])
            && ip(&["-n", &b.name, "link", "set", b_if, "up"]),
        "cannot link {} and {}",
        a.name,
        b.name
    );
}

/// How a home router translates addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// `masquerade`: one outside port per inside socket, whoever it talks to (endpoint-independent
    /// mapping, as most home routers).
    Cone,
    /// `masquerade fully-random`: a new random outside port per destination (symmetric).
    Symmetric,
}

/// Two homes behind NAT routers, joined by an "internet" namespace:
///
/// ```text
///  a (10.1.0.2) ─ ra [NAT, 203.0.113.2] ─┐                ┌─ rb [NAT, 198.51.100.2] ─ b (10.2.0.2)
///                                         └─ wan (router) ─┘
/// ```
///
/// Each router is modelled on a home router: masquerade on its WAN side, forwarding only what its
/// LAN started (and configured port forwards), and an input chain that drops unsolicited packets
/// to its own WAN address. Loss, rate limits and link faults are applied in `wan`.
#[derive(Debug)]
pub struct Homes {
    /// Home A's host.
    pub a: Ns,
    /// Home A's router.
    pub ra: Ns,
    /// The internet between them.
    pub wan: Ns,
    /// Home B's router.
    pub rb: Ns,
    /// Home B's host.
    pub b: Ns,
}

/// Home A's host address.
pub const A_HOST: &str = "10.1.0.2";
/// Home A's router's public address.
pub const A_PUBLIC: &str = "203.0.113.2";
/// Home B's host address.
pub const B_HOST: &str = "10.2.0.2";
/// Home B's router's public address.
pub const B_PUBLIC: &str = "198.51.100.2";

impl Homes {
    /// Builds the topology; `forwards` are `(proto, port)` forwarded from A's public address to
    /// A's host (a port forward on the home router).
    pub fn new(nat_a: NatKind, nat_b: NatKind, forwards: &[(&str, u16)]) -> Self {
        let t = Self {
            a: Ns::new("a"),
            ra: Ns::new("ra"),
            wan: Ns::new("w"),
            rb: Ns::new("rb"),
            b: Ns::new("b"),
        };
        link(
            &t.wan,
            "wa",
            "203.0.113.1/30",
            &t.ra,
            "wan",
            "203.0.113.2/30",
        );
        link(
            &t.wan,
            "wb",
            "198.51.100.1/30",
            &t.rb,
            "wan",
            "198.51.100.2/30",
        );
        link(&t.ra, "lan", "10.1.0.1/24", &t.a, "eth0", "10.1.0.2/24");
        link(&t.rb, "lan", "10.2.0.1/24", &t.b, "eth0", "10.2.0.2/24");
        t.ra.sh("ip route add default via 203.0.113.1 && sysctl -qw net.ipv4.ip_forward=1");
        t.rb.sh("ip route add default via 198.51.100.1 && sysctl -qw net.ipv4.ip_forward=1");
        t.wan.sh("sysctl -qw net.ipv4.ip_forward=1");
        t.a.sh("ip route add default via 10.1.0.1");
        t.b.sh("ip route add default via 10.2.0.1");
        t.ra.nft(&home_router(nat_a, A_HOST, forwards));
        t.rb.nft(&home_router(nat_b, B_HOST, &[]));
        t
    }

    /// Drops `percent` % of UDP and TCP packets crossing the internet, each way (`nft numgen`).
    /// 0 removes the rule.
    pub fn set_loss(&self, percent: u32) {
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.wan.name,
                "nft",
                "delete",
                "table",
                "ip",
                "loss",
            ])
            .stderr(Stdio::null())
            .status();
        if percent > 0 {
            self.wan.nft(&format!(
                "table ip loss {{\n  chain forward {{\n    type filter hook forward priority 0;\n    \
                 meta l4proto {{ udp, tcp }} numgen random mod 100 < {percent} drop\n  }}\n}}\n"
            ));
        }
    }

    /// Blocks (or unblocks) all traffic across the internet, as a link going down.
    pub fn set_link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        self.wan
            .sh(&format!("ip link set wa {state} && ip link set wb {state}"));
    }

    /// Limits each direction across the internet to `mbit` Mbit/s (`tc tbf`); 0 removes the
    /// limit.
    pub fn set_rate(&self, mbit: u32) {
        for dev in ["wa", "wb"] {
            if mbit == 0 {
                self.wan
                    .sh(&format!("tc qdisc del dev {dev} root 2>/dev/null || true"));
            } else {
                self.wan.sh(&format!(
                    "tc qdisc replace dev {dev} root tbf rate {mbit}mbit burst 64kbit latency 50ms"
                ));
            }
        }
    }

    /// Sets both routers' UDP conntrack timeout (their NAT mappings for idle flows expire after
    /// `secs`).
    pub fn set_udp_timeout(&self, secs: u32) {
        for r in [&self.ra, &self.rb] {
            r.sh(&format!(
                "sysctl -qw net.netfilter.nf_conntrack_udp_timeout={secs} \
                 net.netfilter.nf_conntrack_udp_timeout_stream={secs}"
            ));
        }
    }
}

fn home_router(nat: NatKind, host: &str, forwards: &[(&str, u16)]) -> String {
    let masq = match nat {
        NatKind::Cone => "masquerade",
        NatKind::Symmetric => "masquerade fully-random",
    };
    let dnat: String = forwards
        .iter()
        .map(|(proto, port)| format!("    iifname \"wan\" {proto} dport {port} dnat to {host}\n"))
        .collect();
    format!(
        "table ip home {{\n\
         \x20 chain prerouting {{\n    type nat hook prerouting priority -100;\n{dnat}  }}\n\
         \x20 chain postrouting {{\n    type nat hook postrouting priority 100;\n    oifname \"wan\" {masq}\n  }}\n\
         \x20 chain forward {{\n    type filter hook forward priority 0; policy drop;\n    \
         ct state established,related accept\n    iifname \"lan\" accept\n    ct status dnat accept\n  }}\n\
         \x20 chain input {{\n    type filter hook input priority 0; policy accept;\n    \
         iifname \"wan\" ct state established,related accept\n    iifname \"wan\" drop\n  }}\n\
         }}\n"
    )
}
