//! A TCP proxy on loopback that a test can cut and restore: the way to take PostgreSQL or
//! Redis "down" for one service without stopping the server that other tests share.
//! Cutting closes every open connection and refuses new ones until restored.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    up: Arc<watch::Sender<bool>>,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot bind the proxy")?;
        let addr = listener.local_addr()?;
        let (tx, rx) = watch::channel(true);
        let up = Arc::new(tx);
        let accepted = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(accept(listener, target, rx, accepted.clone()));
        Ok(Self {
            addr,
            up,
            accepted,
            task,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    /// How many connections clients have made through the proxy so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(
    listener: TcpListener,
    target: SocketAddr,
    up: watch::Receiver<bool>,
    accepted: Arc<AtomicUsize>,
) {
    while let Ok((client, _)) = listener.accept().await {
        accepted.fetch_add(1, Ordering::Relaxed);
        if !*up.borrow() {
            drop(client);
            continue;
        }
        tokio::spawn(pipe(client, target, up.clone()));
    }
}

async fn pipe(mut client: TcpStream, target: SocketAddr, mut up: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = up.wait_for(|up| !*up) => {}
    }
}

/// The `host:port` of a URL like `postgres://user@127.0.0.1:5432/db`, and the URL with
/// that address replaced by `addr`.
pub fn reroute(url: &str, addr: SocketAddr) -> anyhow::Result<(SocketAddr, String)> {
    let mut parsed = url::Url::parse(url).context("not a URL")?;
    let host = parsed.host_str().context("the URL has no host")?.to_owned();
    let port = parsed.port().context("the URL has no port")?;
    let target: SocketAddr = format!("{host}:{port}")
        .parse()
        .with_context(|| format!("{host}:{port} is not an IP address and port"))?;
    parsed
        .set_ip_host(addr.ip())
        .map_err(|()| anyhow::anyhow!("cannot set the host"))?;
    parsed
        .set_port(Some(addr.port()))
        .map_err(|()| anyhow::anyhow!("cannot set the port"))?;
    Ok((target, parsed.to_string()))
}
