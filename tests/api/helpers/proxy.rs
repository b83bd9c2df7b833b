//! A TCP proxy between the service and PostgreSQL or Redis, to play outages and lost answers.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::{redis_url, Service, TestEnv};

/// A TCP proxy in front of PostgreSQL or Redis that a test can cut and
/// restore, to play an outage without touching the servers other tests use.
/// It can also fall silent: connections stay open and nothing passes, as
/// when a server's host is lost or the network drops packets; the sessions
/// of that spell stay silent for good, as the server has forgotten them.
pub struct TcpProxy {
    pub port: u16,
    mode: tokio::sync::watch::Sender<ProxyMode>,
    commits: Arc<CommitTrap>,
}

/// What the proxy does to the next `COMMIT` it sees, once.
#[derive(Default)]
struct CommitTrap {
    armed: Mutex<Option<CommitFate>>,
    sprung: AtomicUsize,
}

#[derive(Debug, Clone, Copy)]
enum CommitFate {
    /// It reaches the server, its answer is dropped with the connection:
    /// the commit lands and the client never knows.
    AnswerLost,
    /// It never reaches the server, and nothing more passes on that
    /// connection, open on both sides: the server keeps the transaction open,
    /// with its locks, as across a network partition.
    Withheld,
}

impl CommitTrap {
    fn arm(&self, fate: CommitFate) {
        *self.armed.lock().unwrap() = Some(fate);
    }

    /// The fate of a chunk on its way to the server, if it springs the trap.
    fn spring(&self, chunk: &[u8]) -> Option<CommitFate> {
        if !chunk.windows(7).any(|w| w == b"COMMIT\0") {
            return None;
        }
        let fate = self.armed.lock().unwrap().take()?;
        self.sprung.fetch_add(1, Ordering::SeqCst);
        Some(fate)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProxyMode {
    Up,
    Cut,
    Silent,
}

impl TcpProxy {
    pub async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (mode, watch) = tokio::sync::watch::channel(ProxyMode::Up);
        let commits = Arc::new(CommitTrap::default());
        let trap = commits.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                match *watch.borrow() {
                    ProxyMode::Up => {}
                    ProxyMode::Cut => {
                        drop(inbound);
                        continue;
                    }
                    ProxyMode::Silent => {
                        tokio::spawn(hold_silently(inbound));
                        continue;
                    }
                }
                let mut watch = watch.clone();
                let target = target.clone();
                let trap = trap.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        () = relay(&mut inbound, &mut outbound, &trap) => {}
                        _ = watch.wait_for(|m| *m != ProxyMode::Up) => {}
                    }
                    drop(outbound);
                    if *watch.borrow() == ProxyMode::Silent {
                        hold_silently(inbound).await;
                    }
                });
            }
        });
        Self {
            port,
            mode,
            commits,
        }
    }

    /// A proxy in front of the test Redis, and the `REDIS_URL` that goes through it.
    pub async fn to_redis() -> (Self, String) {
        let redis = url::Url::parse(&redis_url()).unwrap();
        let proxy = Self::start(format!(
            "{}:{}",
            redis.host_str().unwrap(),
            redis.port().unwrap_or(6379)
        ))
        .await;
        let url = format!("redis://127.0.0.1:{}/", proxy.port);
        (proxy, url)
    }

    pub fn cut(&self) {
        self.mode.send_replace(ProxyMode::Cut);
    }

    /// Nothing passes and nothing is closed, on open and new connections.
    pub fn silence(&self) {
        self.mode.send_replace(ProxyMode::Silent);
    }

    pub fn restore(&self) {
        self.mode.send_replace(ProxyMode::Up);
    }

    /// The next `COMMIT` lands on the server, its answer is lost (PostgreSQL only).
    pub fn lose_next_commit_answer(&self) {
        self.commits.arm(CommitFate::AnswerLost);
    }

    /// The next `COMMIT` never reaches the server, whose session stays open
    /// in its transaction (PostgreSQL only).
    pub fn withhold_next_commit(&self) {
        self.commits.arm(CommitFate::Withheld);
    }

    /// How many commits the trap has caught so far.
    pub fn commits_caught(&self) -> usize {
        self.commits.sprung.load(Ordering::SeqCst)
    }
}

/// Relays bytes both ways until either side closes, springing `trap` on the
/// first `COMMIT` (a simple query, as a transaction's commit is sent) while
/// it is armed.
async fn relay(
    inbound: &mut tokio::net::TcpStream,
    outbound: &mut tokio::net::TcpStream,
    trap: &CommitTrap,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let answer_lost = AtomicBool::new(false);
    let (mut client_read, mut client_write) = inbound.split();
    let (mut server_read, mut server_write) = outbound.split();
    let upstream = async {
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = client_read.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            let chunk = &buf[..n];
            match trap.spring(chunk) {
                Some(CommitFate::AnswerLost) => answer_lost.store(true, Ordering::SeqCst),
                Some(CommitFate::Withheld) => std::future::pending().await,
                None => {}
            }
            server_write.write_all(chunk).await?;
        }
    };
    let downstream = async {
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = server_read.read(&mut buf).await?;
            if n == 0 || answer_lost.load(Ordering::SeqCst) {
                return Ok(());
            }
            client_write.write_all(&buf[..n]).await?;
        }
    };
    let _: std::io::Result<()> = tokio::select! {
        r = upstream => r,
        r = downstream => r,
    };
}

/// Keeps a connection open, reading what comes and answering nothing.
async fn hold_silently(mut inbound: tokio::net::TcpStream) {
    let mut sink = tokio::io::sink();
    let _ = tokio::io::copy(&mut inbound, &mut sink).await;
}

impl TestEnv {
    /// The service URL routed through `proxy`, without TLS: the proxy's
    /// traps read the protocol (`sslmode=prefer`, the default, would encrypt
    /// it when the server offers TLS, as Debian's does).
    pub fn service_url_via(&self, proxy: &TcpProxy) -> String {
        let url = url::Url::parse(&self.service_url).unwrap();
        let mut via = url.clone();
        via.set_host(Some("127.0.0.1")).unwrap();
        via.set_port(Some(proxy.port)).unwrap();
        via.query_pairs_mut().append_pair("sslmode", "disable");
        via.to_string()
    }

    /// A service of this test connected to PostgreSQL through a proxy the
    /// test can cut, silence or set traps in; `extra` settings on top.
    pub async fn spawn_behind_proxy(&self, extra: &[(&str, &str)]) -> (TcpProxy, Service) {
        let proxy = TcpProxy::start(self.postgres_addr()).await;
        let url = self.service_url_via(&proxy);
        let mut settings = vec![("DATABASE_URL", url.as_str())];
        settings.extend_from_slice(extra);
        let service = self.spawn_with(&settings);
        (proxy, service)
    }
}
