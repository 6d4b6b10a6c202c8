//! A TCP proxy on loopback that a test can cut and restore: the way to take PostgreSQL or
//! Redis "down" for one service without stopping the server that other tests share.
//! Cutting closes every open connection and refuses new ones until restored. Freezing
//! stops forwarding on every open connection but keeps it open, as a peer whose machine
//! vanished would (nothing answers, nothing closes), while new connections pass: the way
//! a Service's connections look when a node is lost and kube-proxy sends new ones to a
//! live replica.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    up: Arc<watch::Sender<bool>>,
    accepted: Arc<AtomicUsize>,
    /// Bumped by [`Proxy::freeze`]: connections made before stop forwarding.
    generation: Arc<watch::Sender<u64>>,
    /// The frozen connections' sockets, held open until the proxy is dropped.
    frozen: Frozen,
    task: tokio::task::JoinHandle<()>,
}

type Frozen = Arc<Mutex<Vec<(TcpStream, TcpStream)>>>;

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
        let (generation, _) = watch::channel(0);
        let generation = Arc::new(generation);
        let frozen = Frozen::default();
        let task = tokio::spawn(accept(
            listener,
            target,
            rx,
            accepted.clone(),
            (generation.clone(), frozen.clone()),
        ));
        Ok(Self {
            addr,
            up,
            accepted,
            generation,
            frozen,
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

    /// Stops forwarding on every open connection, keeping it open; new connections pass.
    pub fn freeze(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// How many connections are frozen (held open, nothing forwarded).
    pub fn frozen(&self) -> usize {
        self.frozen.lock().map_or(0, |f| f.len())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        if let Ok(mut frozen) = self.frozen.lock() {
            frozen.clear();
        }
    }
}

async fn accept(
    listener: TcpListener,
    target: SocketAddr,
    up: watch::Receiver<bool>,
    accepted: Arc<AtomicUsize>,
    (generation, frozen): (Arc<watch::Sender<u64>>, Frozen),
) {
    while let Ok((client, _)) = listener.accept().await {
        accepted.fetch_add(1, Ordering::Relaxed);
        if !*up.borrow() {
            drop(client);
            continue;
        }
        tokio::spawn(pipe(
            client,
            target,
            up.clone(),
            generation.subscribe(),
            frozen.clone(),
        ));
    }
}

async fn pipe(
    mut client: TcpStream,
    target: SocketAddr,
    mut up: watch::Receiver<bool>,
    mut generation: watch::Receiver<u64>,
    frozen: Frozen,
) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    let born = *generation.borrow_and_update();
    let freeze = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
        _ = up.wait_for(|up| !*up) => false,
        _ = generation.wait_for(|g| *g != born) => true,
    };
    if freeze && let Ok(mut held) = frozen.lock() {
        held.push((client, server));
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
