//! A real PostgreSQL for the tests of the shared outbox: a throwaway server
//! started from the installed binaries (`initdb`, `pg_ctl`) on a directory
//! of its own and a free loopback port, one per test binary, shared by its
//! tests; or the server `DATABASE_URL` names, when it is set.
//!
//! Each test takes a queue of its own ([`Postgres::queue`]), so that tests
//! running at once (or several runs against one `DATABASE_URL`) never see
//! each other's records. A test that restarts the server has it to itself
//! ([`postgres_alone`]): the others wait, and are not cut off mid-run.
//!
//! For the tests of TLS, a second throwaway server ([`postgres_tls`]),
//! started with `ssl=on` and a certificate from a test CA made here. For
//! the tests of a database that stops answering, a TCP proxy to the server
//! that can be frozen ([`Postgres::freezing_proxy`]).

#![allow(dead_code)] // Each test file uses its own share of them.

use std::{
    net::{Ipv4Addr, SocketAddr},
    ops::Deref,
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, OnceLock,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{tcp::OwnedReadHalf, tcp::OwnedWriteHalf, TcpStream},
    sync::{watch, RwLock, RwLockReadGuard, RwLockWriteGuard},
    task::{JoinHandle, JoinSet},
};
use tower_terminal_retry::outbox::Outbox;

use crate::outbox_support::wait_every;

// The cluster itself, from the file the store's own unit tests start theirs
// with.
#[path = "../../src/outbox/store/postgres/test_server.rs"]
mod cluster;

use cluster::{installed, skipped, Cluster, ClusterTls};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A plain HTTP client, for the dispatchers of the tests.
pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Waits on the real clock, 20 ms at a time, until `done` or `limit`.
pub async fn wait_for(limit: Duration, done: impl FnMut() -> bool) -> bool {
    wait_every(Duration::from_millis(20), limit, done).await
}

/// Waits until `outbox` holds nothing, pending or quarantined.
pub async fn emptied(outbox: &Outbox, limit: Duration) -> bool {
    wait_for(limit, || {
        outbox.pending().unwrap().is_empty() && outbox.quarantined().unwrap().is_empty()
    })
    .await
}

/// The outbox of `queue` on the test server.
pub async fn connect(postgres: &Postgres, queue: &str) -> Outbox {
    Outbox::connect(postgres.url(), queue).await.unwrap()
}

/// The database the throwaway server's tests connect to.
const DATABASE: &str = "postgres";

/// The server the tests of this binary share.
pub struct Postgres {
    url: String,
    /// `None` for a server named by `DATABASE_URL`: not ours to restart.
    local: Option<Cluster>,
}

/// Taken to read by each test while it uses the server, to write by one
/// that restarts it.
static TURN: RwLock<()> = RwLock::const_new(());

/// The server, shared with the other tests of this binary while this lives.
pub struct Shared {
    server: &'static Postgres,
    _turn: RwLockReadGuard<'static, ()>,
}

/// The server, to this test alone while this lives: it may restart it.
pub struct Alone {
    server: &'static Postgres,
    _turn: RwLockWriteGuard<'static, ()>,
}

/// The server, shared with the other tests of this binary, started on first
/// use. `None` (after one line saying so) where no PostgreSQL is installed
/// and `DATABASE_URL` is not set; under CI (`CI=true`) that panics instead,
/// as does a server that fails to start.
pub async fn postgres() -> Option<Shared> {
    let server = server()?;
    Some(Shared {
        server,
        _turn: TURN.read().await,
    })
}

/// As [`postgres`], once no other test of this binary uses the server.
pub async fn postgres_alone() -> Option<Alone> {
    let server = server()?;
    Some(Alone {
        server,
        _turn: TURN.write().await,
    })
}

impl Deref for Shared {
    type Target = Postgres;

    fn deref(&self) -> &Postgres {
        self.server
    }
}

impl Deref for Alone {
    type Target = Postgres;

    fn deref(&self) -> &Postgres {
        self.server
    }
}

impl Alone {
    /// Stops the server (fast shutdown: connections are cut) and starts it
    /// again on the same data directory and port. `false`, doing nothing,
    /// for a server named by `DATABASE_URL`.
    pub fn restart(&self) -> bool {
        let Some(local) = &self.server.local else {
            return false;
        };
        local.pg_ctl(&["stop", "-m", "fast", "-w"]);
        local.pg_ctl_start();
        true
    }
}

/// The server of this binary, started on first use.
fn server() -> Option<&'static Postgres> {
    static SERVER: OnceLock<Option<Postgres>> = OnceLock::new();
    let server = SERVER.get_or_init(|| {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            return Some(Postgres { url, local: None });
        }
        if !installed() {
            return None;
        }
        let local = Cluster::start("postgres", None);
        let url = format!("postgresql://postgres@127.0.0.1:{}/{DATABASE}", local.port);
        Some(Postgres {
            url,
            local: Some(local),
        })
    });
    if server.is_none() {
        skipped("no PostgreSQL installed (initdb, pg_ctl) and DATABASE_URL not set");
    }
    server.as_ref()
}

/// A throwaway server of its own started with `ssl=on`, its certificate
/// issued by a test CA to `localhost` and `127.0.0.1`, and taking TCP
/// connections over TLS only (`hostssl` in its `pg_hba.conf`): a client
/// that does not use TLS is refused. Shared by the tests of the binary,
/// none of which restarts it.
pub struct TlsPostgres {
    local: Cluster,
    ca: PathBuf,
    other_ca: PathBuf,
}

/// The TLS server of this binary, started on first use. `None` (after one
/// line saying so) where no PostgreSQL is installed (a server named by
/// `DATABASE_URL` is not ours to configure); under CI that panics instead.
pub fn postgres_tls() -> Option<&'static TlsPostgres> {
    static SERVER: OnceLock<Option<TlsPostgres>> = OnceLock::new();
    let server = SERVER.get_or_init(|| {
        if !installed() {
            return None;
        }
        let certificates = issue_certificates(&["localhost", "127.0.0.1"]);
        let local = Cluster::start("postgres-tls", Some(&certificates));
        Some(TlsPostgres {
            ca: local.directory.join("ca.pem"),
            other_ca: local.directory.join("other-ca.pem"),
            local,
        })
    });
    if server.is_none() {
        skipped("no PostgreSQL installed (initdb, pg_ctl) to start a server with TLS");
    }
    server.as_ref()
}

impl TlsPostgres {
    /// A URL of the server by `host` (`localhost` or `127.0.0.1`, the names
    /// its certificate carries, or any other name with
    /// `hostaddr=127.0.0.1` among the `parameters`), with `parameters`
    /// (`key=value&...`, maybe empty) as its query.
    pub fn url(&self, host: &str, parameters: &str) -> String {
        let port = self.local.port;
        let query = if parameters.is_empty() { "" } else { "?" };
        format!("postgresql://postgres@{host}:{port}/{DATABASE}{query}{parameters}")
    }

    /// The test CA's certificate, a PEM file: it issued the server's.
    pub fn ca_file(&self) -> &str {
        self.ca.to_str().unwrap()
    }

    /// Another CA's certificate, a PEM file: it issued nothing the server
    /// shows.
    pub fn other_ca_file(&self) -> &str {
        self.other_ca.to_str().unwrap()
    }
}

/// Certificates for a server known by `names` (host names or IP
/// addresses), from a test CA made here, and another CA's.
fn issue_certificates(names: &[&str]) -> ClusterTls {
    let ca_key = KeyPair::generate().unwrap();
    let ca = authority("terminal-retry test CA")
        .self_signed(&ca_key)
        .unwrap();
    let other_key = KeyPair::generate().unwrap();
    let other_ca = authority("another CA").self_signed(&other_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(
        names
            .iter()
            .map(|name| (*name).to_owned())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    server
        .distinguished_name
        .push(DnType::CommonName, "terminal-retry test server");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = server.signed_by(&server_key, &ca, &ca_key).unwrap();
    ClusterTls {
        ca: ca.pem(),
        server_certificate: server.pem(),
        server_key: server_key.serialize_pem(),
        other_ca: other_ca.pem(),
    }
}

/// A CA's parameters, named `name`.
fn authority(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

impl Postgres {
    /// The connection string, for [`Outbox::connect`](tower_terminal_retry::outbox::Outbox::connect).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A queue name of its own for the test `name`, in this process.
    pub fn queue(&self, name: &str) -> String {
        format!("{name}-{}", std::process::id())
    }

    /// The server's data directory, when this process started it.
    pub fn data_directory(&self) -> Option<PathBuf> {
        self.local.as_ref().map(Cluster::data)
    }

    /// A plain client of the server, its connection driven on the current
    /// runtime: for the tests' own transactions and reads.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("a connection to the test server");
        tokio::spawn(connection);
        client
    }

    /// The connection string with `parameters` (`key=value&...`) added to
    /// its query.
    pub fn url_with(&self, parameters: &str) -> String {
        let separator = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{separator}{parameters}", self.url)
    }

    /// A [`FreezingProxy`] to this server, started on the current runtime;
    /// its [`url`](FreezingProxy::url) connects through it.
    pub async fn freezing_proxy(&self) -> FreezingProxy {
        let config: tokio_postgres::Config = self.url.parse().unwrap();
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            _ => panic!("a proxy goes to a server on TCP"),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let server = tokio::net::lookup_host((host.as_str(), port))
            .await
            .unwrap()
            .next()
            .unwrap();
        let encode = |text: &[u8]| {
            utf8_percent_encode(std::str::from_utf8(text).unwrap(), NON_ALPHANUMERIC).to_string()
        };
        let user = config.get_user().unwrap_or("postgres");
        let password = config
            .get_password()
            .map_or(String::new(), |password| format!(":{}", encode(password)));
        let database = config.get_dbname().unwrap_or(user);
        FreezingProxy::start(server, |address| {
            format!(
                "postgresql://{}{password}@{address}/{}",
                encode(user.as_bytes()),
                encode(database.as_bytes())
            )
        })
        .await
    }
}

/// A TCP proxy on a loopback port to a server, which a test can freeze:
/// while frozen it forwards nothing, in either direction, and closes
/// nothing, as a network that stopped delivering does (or a server stopped
/// by `SIGSTOP`). The connections through it stay open and resume once it
/// thaws, with no byte lost; connections made while frozen are accepted,
/// and forward nothing until it thaws. Stopped, with every connection
/// through it cut, when dropped.
///
/// ```ignore
/// let proxy = postgres.freezing_proxy().await;
/// let outbox = Outbox::connect(proxy.url(), &queue).await.unwrap();
/// proxy.freeze();
/// // ... the database no longer answers the outbox ...
/// proxy.thaw();
/// ```
pub struct FreezingProxy {
    address: SocketAddr,
    url: String,
    frozen: Arc<watch::Sender<bool>>,
    connections: Arc<AtomicUsize>,
    /// Bytes forwarded from the clients to the server.
    sent: Arc<AtomicUsize>,
    accepting: JoinHandle<()>,
}

impl FreezingProxy {
    /// A proxy to `server`, forwarding, listening on a free loopback port;
    /// `url` makes its [`url`](FreezingProxy::url) from its address.
    pub async fn start(
        server: SocketAddr,
        url: impl FnOnce(SocketAddr) -> String,
    ) -> FreezingProxy {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let address = listener.local_addr().unwrap();
        let frozen = Arc::new(watch::Sender::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let sent = Arc::new(AtomicUsize::new(0));
        let accepting = tokio::spawn({
            let frozen = frozen.clone();
            let connections = connections.clone();
            let sent = sent.clone();
            async move {
                // Owned here: aborting this task cuts every connection.
                let mut forwarding = JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    connections.fetch_add(1, Ordering::SeqCst);
                    let Ok(upstream) = TcpStream::connect(server).await else {
                        continue;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = upstream.into_split();
                    let (to_server, to_client) = (Some(sent.clone()), None);
                    forwarding.spawn(forward(
                        client_read,
                        server_write,
                        frozen.subscribe(),
                        to_server,
                    ));
                    forwarding.spawn(forward(
                        server_read,
                        client_write,
                        frozen.subscribe(),
                        to_client,
                    ));
                }
            }
        });
        FreezingProxy {
            address,
            url: url(address),
            frozen,
            connections,
            sent,
            accepting,
        }
    }

    /// The proxy's address, on loopback.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The server's connection string, through the proxy: its user,
    /// password and database, without the parameters of its query.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops forwarding, in both directions, at once: a byte read from one
    /// side and not yet written to the other is held until [`thaw`](Self::thaw).
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Forwards again, what was held first.
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    /// Whether the proxy is frozen.
    pub fn is_frozen(&self) -> bool {
        *self.frozen.borrow()
    }

    /// How many bytes the clients sent the server through the proxy so
    /// far: what their statements cost.
    pub fn bytes_to_server(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    /// How many connections the proxy accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FreezingProxy {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// Copies `from` to `to` while not `frozen`, counting the bytes in
/// `counted`, if given; passes the end of `from` on as the end of `to`.
async fn forward(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
    counted: Option<Arc<AtomicUsize>>,
) {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        if frozen.wait_for(|frozen| !frozen).await.is_err() {
            return;
        }
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        // Frozen while reading: what was read waits.
        if frozen.wait_for(|frozen| !frozen).await.is_err() {
            return;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
        if let Some(counted) = &counted {
            counted.fetch_add(read, Ordering::SeqCst);
        }
    }
    let _ = to.shutdown().await;
}
