//! A user-space UDP impairment relay (this kernel has no netem): datagrams from the first sender
//! are forwarded to an upstream address and the answers back, each delayed, and datagrams larger
//! than a path's MTU are dropped, as on a real path.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What the relay does to each datagram.
#[derive(Debug, Clone, Copy)]
pub struct Impairment {
    /// Added to each datagram, each way.
    pub delay: Duration,
    /// Larger datagrams are dropped (1472: an Ethernet path, 1500 − 20 − 8).
    pub max_datagram: usize,
}

impl Impairment {
    /// `delay` each way on an Ethernet path.
    pub fn delay(delay: Duration) -> Self {
        Self {
            delay,
            max_datagram: 1472,
        }
    }
}

/// Runs the relay on `127.0.0.1:0` toward `upstream`; writes its port to `port_file` once bound.
/// Runs until the process ends.
///
/// # Errors
/// Binding the sockets or writing the port file.
pub async fn relay(
    upstream: SocketAddr,
    impairment: Impairment,
    port_file: &Path,
) -> std::io::Result<()> {
    let front = Arc::new(bind_big(
        "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
    )?);
    let back = Arc::new(bind_big(
        "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
    )?);
    back.connect(upstream).await?;
    std::fs::write(port_file, front.local_addr()?.port().to_string())?;
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
    let Impairment {
        delay,
        max_datagram,
    } = impairment;

    let (tx_up, mut rx_up) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let (tx_down, mut rx_down) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    {
        let front = front.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                if n > max_datagram {
                    continue;
                }
                if let Ok(mut c) = client.lock() {
                    *c = Some(from);
                }
                let _ = tx_up.send((Instant::now() + delay, buf[..n].to_vec()));
            }
        });
    }
    {
        let back = back.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = back.recv(&mut buf).await {
                if n > max_datagram {
                    continue;
                }
                let _ = tx_down.send((Instant::now() + delay, buf[..n].to_vec()));
            }
        });
    }
    {
        let back = back.clone();
        tokio::spawn(async move {
            while let Some((due, pkt)) = rx_up.recv().await {
                tokio::time::sleep_until(due).await;
                let _ = back.send(&pkt).await;
            }
        });
    }
    while let Some((due, pkt)) = rx_down.recv().await {
        tokio::time::sleep_until(due).await;
        let to = client.lock().ok().and_then(|c| *c);
        if let Some(to) = to {
            let _ = front.send_to(&pkt, to).await;
        }
    }
    Ok(())
}

fn bind_big(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}
