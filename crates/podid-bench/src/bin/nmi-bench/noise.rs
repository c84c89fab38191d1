//! The noisy pod of the last phase: idle connections held and a churn of distinct resources,
//! each a token-cache miss.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

use crate::load::read_response;

/// The noisy pod's source address (pod 1).
pub(crate) const NOISY_IP: [u8; 4] = [127, 0, 0, 2];
/// Idle connections the noisy pod tries to hold.
pub(crate) const NOISY_HELD: usize = 1024;
/// The noisy pod's concurrent requests for distinct resources.
pub(crate) const NOISY_CHURNERS: usize = 32;
/// Distinct resources the noisy pod asks for.
pub(crate) const NOISY_RESOURCES: u64 = 1000;

/// A connection to `addr` from the noisy pod's address.
async fn noisy_connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((NOISY_IP, 0)))?;
    socket.connect(addr).await
}

/// What the noisy pod got.
#[derive(Debug, Default)]
pub(crate) struct Noise {
    pub(crate) tokens: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) closed: AtomicU64,
}

/// The noisy pod until `stop`: one task keeps trying to hold [`NOISY_HELD`] idle connections
/// (topping up once a second), [`NOISY_CHURNERS`] tasks ask for distinct resources back to
/// back on keep-alive connections (reconnecting 10 ms after a connection closed at accept).
pub(crate) fn spawn_noise(
    addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    noise: Arc<Noise>,
) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    {
        let stop = Arc::clone(&stop);
        tasks.spawn(async move {
            // The churners connect first (keep-alive, one connection each), then the idle
            // connections take whatever the source may still hold.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut held: Vec<TcpStream> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                held.retain(|s| {
                    let mut byte = [0u8; 1];
                    matches!(s.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                });
                while held.len() < NOISY_HELD {
                    match noisy_connect(addr).await {
                        Ok(stream) => held.push(stream),
                        Err(_) => break,
                    }
                }
                // Top up once a second: a pod holding sockets, not a connect flood (that one
                // costs CPU, which the pod's own cgroup bounds on a real node).
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    let next = Arc::new(AtomicU64::new(0));
    for _ in 0..NOISY_CHURNERS {
        let (stop, noise, next) = (Arc::clone(&stop), Arc::clone(&noise), Arc::clone(&next));
        tasks.spawn(async move {
            let mut buf = Vec::new();
            let mut connection: Option<TcpStream> = None;
            while !stop.load(Ordering::Relaxed) {
                let mut stream = match connection.take() {
                    Some(stream) => stream,
                    None => match noisy_connect(addr).await {
                        Ok(stream) => stream,
                        Err(_) => {
                            noise.refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                let k = next.fetch_add(1, Ordering::Relaxed) % NOISY_RESOURCES;
                let request = format!(
                    "GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fnoisy{k}.example.com HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n"
                );
                buf.clear();
                let answered = async {
                    stream.write_all(request.as_bytes()).await?;
                    read_response(&mut stream, &mut buf).await
                }
                .await;
                match answered {
                    Ok((status, _)) => {
                        if status == 200 {
                            noise.tokens.fetch_add(1, Ordering::Relaxed);
                        }
                        connection = Some(stream);
                    }
                    Err(_) => {
                        // Closed at accept: the source held too many connections. Retry
                        // after 10 ms, as a client library would, not in a tight loop.
                        noise.closed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
    }
    tasks
}
