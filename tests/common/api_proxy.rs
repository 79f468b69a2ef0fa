//! A TCP proxy in front of the API server that a test can cut: while cut, every new connection is
//! accepted and closed at once (the client's request fails at once, as behind a firewall's REJECT) and counted,
//! and open connections are dropped. Agents started with `Cluster::kubeconfig_via` reach the API
//! server only through it, so the count is the agents' connection attempts during an outage, and
//! the bytes it forwards are what they received from the API server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

use super::Cluster;

pub struct ApiProxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    open: Arc<Mutex<Vec<AbortHandle>>>,
    accept_task: AbortHandle,
}

impl ApiProxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> ApiProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let open: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accept_task = tokio::spawn({
            let (cut, accepted, refused, received, open) = (
                cut.clone(),
                accepted.clone(),
                refused.clone(),
                received.clone(),
                open.clone(),
            );
            async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    if cut.load(Ordering::Acquire) {
                        refused.fetch_add(1, Ordering::Relaxed);
                        drop(inbound); // closed before the TLS handshake: the client's request fails
                        continue;
                    }
                    let received = received.clone();
                    let task = tokio::spawn(async move {
                        if let Ok(outbound) = TcpStream::connect(target).await {
                            forward(inbound, outbound, &received).await;
                        }
                    });
                    let mut open = open.lock().unwrap();
                    open.retain(|t| !t.is_finished());
                    open.push(task.abort_handle());
                }
            }
        })
        .abort_handle();
        ApiProxy {
            addr,
            cut,
            accepted,
            refused,
            received,
            open,
            accept_task,
        }
    }

    /// From now on connections are refused; open ones are dropped.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        for task in self.open.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::Release);
    }

    /// Connections accepted so far (forwarded or refused).
    pub fn connections(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Bytes the API server sent through the proxy (TLS records: what the client received).
    pub fn received_bytes(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Connections refused while cut.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// Copies both ways until both sides are done, counting the bytes from the server.
async fn forward(inbound: TcpStream, outbound: TcpStream, received: &AtomicU64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut from_client, mut to_client) = inbound.into_split();
    let (mut from_server, mut to_server) = outbound.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut from_client, &mut to_server).await;
        let _ = to_server.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = from_server.read(&mut buf).await {
            if n == 0 || to_client.write_all(&buf[..n]).await.is_err() {
                break;
            }
            received.fetch_add(n as u64, Ordering::Relaxed);
        }
        let _ = to_client.shutdown().await;
    };
    tokio::join!(up, down);
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        for task in self.open.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

impl Cluster {
    /// A proxy to this cluster's API server (see `ApiProxy`).
    pub async fn api_proxy(&self) -> ApiProxy {
        let target: SocketAddr = self
            .server
            .strip_prefix("https://")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("API server address {}", self.server));
        ApiProxy::start(target).await
    }

    /// A copy of the agents' kubeconfig that reaches the API server through `proxy`.
    pub fn kubeconfig_via(&self, proxy: &ApiProxy, name: &str) -> PathBuf {
        let text = std::fs::read_to_string(&self.agent_kubeconfig).expect("agent kubeconfig");
        let path = self.path.join(format!("{name}.kubeconfig"));
        std::fs::write(
            &path,
            text.replace(&self.server, &format!("https://{}", proxy.addr)),
        )
        .expect("write kubeconfig");
        path
    }
}
