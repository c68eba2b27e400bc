//! Network namespaces for tests that need a second host: a namespace joined to this one by a
//! veth pair on a TEST-NET address (198.51.100.0/24 or 203.0.113.0/24, neither private nor
//! loopback, so the device counts connections from it as remote). Removed on drop.

use std::process::{Command, Stdio};

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
