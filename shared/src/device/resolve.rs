//! Connecting to a service's target, the one place a DNS name is resolved.
//!
//! Kind: IO (the system resolver, TCP connects).
//!
//! Policy: an IP address is used as is. A DNS name is resolved when a tunnel first needs it and
//! the answer is kept for [`TTL`] (the system resolver gives no TTL; 30 s bounds both the lookups
//! a busy service costs and how long a moved service is missed). When none of the kept addresses
//! accepts, the name is resolved again once before the tunnel is refused, so a service that moved
//! is found at once. Addresses are tried in the resolver's order.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::config::{Host, HostPort};

/// How long a resolved name is kept.
pub(crate) const TTL: Duration = Duration::from_secs(30);

/// Names kept at most (a device has few services).
const MAX_NAMES: usize = 256;

/// Resolved service names.
#[derive(Debug, Default)]
pub(crate) struct Resolver {
    cache: Mutex<HashMap<HostPort, (Vec<SocketAddr>, Instant)>>,
}

impl Resolver {
    fn cached(&self, target: &HostPort, now: Instant) -> Option<Vec<SocketAddr>> {
        let cache = self.cache.lock().ok()?;
        let (addrs, at) = cache.get(target)?;
        (now.saturating_duration_since(*at) < TTL).then(|| addrs.clone())
    }

    async fn resolve(&self, target: &HostPort) -> std::io::Result<Vec<SocketAddr>> {
        let addrs = target.resolve().await?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= MAX_NAMES {
                cache.clear();
            }
            cache.insert(target.clone(), (addrs.clone(), Instant::now()));
        }
        Ok(addrs)
    }

    /// Connects to `target` (see the module docs for how names are resolved).
    ///
    /// # Errors
    /// The resolver's error, or the last connect error.
    pub(crate) async fn connect(&self, target: &HostPort) -> std::io::Result<TcpStream> {
        if let Host::Ip(ip) = target.host {
            return connect_any(&[SocketAddr::new(ip, target.port)]).await;
        }
        if let Some(addrs) = self.cached(target, Instant::now())
            && let Ok(tcp) = connect_any(&addrs).await
        {
            return Ok(tcp);
        }
        let addrs = self.resolve(target).await?;
        connect_any(&addrs).await
    }
}

async fn connect_any(addrs: &[SocketAddr]) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no addresses")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_are_resolved_once_per_ttl_and_again_on_failure() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let r = Resolver::default();
        let target: HostPort = format!("localhost:{port}").parse().unwrap();
        assert!(r.cached(&target, Instant::now()).is_none());
        r.connect(&target).await.unwrap();
        let kept = r.cached(&target, Instant::now()).unwrap();
        assert!(kept.iter().any(|a| a.port() == port));
        assert!(r.cached(&target, Instant::now() + TTL).is_none(), "expires");
        // Kept addresses that no longer answer lead to a fresh lookup, not a failure.
        if let Ok(mut c) = r.cache.lock() {
            c.insert(
                target.clone(),
                (vec!["127.0.0.1:1".parse().unwrap()], Instant::now()),
            );
        }
        r.connect(&target).await.unwrap();
    }
}
