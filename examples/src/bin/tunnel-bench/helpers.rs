//! Helper processes: an echo server and a delaying UDP relay.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Echo server on 127.0.0.1:0; writes its port to `port_file`; runs until killed.
pub(crate) async fn echo_server(port_file: PathBuf) -> anyhow::Result<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    std::fs::write(&port_file, listener.local_addr()?.port().to_string())?;
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if conn.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// Largest datagram the relay forwards: an Ethernet path (1500 - 20 - 8).
const PATH_MAX_UDP: usize = 1472;

/// UDP relay: datagrams from the first sender are forwarded to `upstream` and the answers back,
/// each delayed by `delay`; datagrams above an Ethernet MTU are dropped, like on a real path.
/// Writes its port to `port_file`; runs until killed.
pub(crate) async fn relay(
    upstream: SocketAddr,
    delay: Duration,
    port_file: PathBuf,
) -> anyhow::Result<()> {
    let front = Arc::new(bind_big("127.0.0.1:0".parse()?)?);
    let back = Arc::new(bind_big("127.0.0.1:0".parse()?)?);
    back.connect(upstream).await?;
    std::fs::write(&port_file, front.local_addr()?.port().to_string())?;
    let client: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();

    let (tx_up, mut rx_up) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let (tx_down, mut rx_down) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    {
        let front = front.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                if n > PATH_MAX_UDP {
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
                if n > PATH_MAX_UDP {
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

fn bind_big(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(UdpSocket::from_std(s.into())?)
}
