//! A real PostgreSQL for the tests of the shared outbox: a throwaway server
//! started from the installed binaries (`initdb`, `pg_ctl`) on a directory
//! of its own and a free loopback port, one per test binary, shared by its
//! tests; or the server `DATABASE_URL` names, when it is set.
//!
//! Each test takes a queue of its own ([`Postgres::queue`]), so that tests
//! running at once (or several runs against one `DATABASE_URL`) never see
//! each other's records. A test that restarts the server has it to itself
//! ([`postgres_alone`]): the others wait, and are not cut off mid-run.

#![allow(dead_code)] // Each test file uses its own share of them.

use std::{
    net::{Ipv4Addr, TcpListener},
    ops::Deref,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
};

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use tower_terminal_retry::outbox::Outbox;

use crate::outbox_support::wait_every;

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
    local: Option<Local>,
}

/// A server this process started, and how to run its binaries.
struct Local {
    directory: PathBuf,
    port: u16,
    /// Whether the binaries run as the `postgres` user (we are root, which
    /// PostgreSQL refuses to run as).
    as_postgres: bool,
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
        if find_on_path("initdb").is_none() || find_on_path("pg_ctl").is_none() {
            return None;
        }
        Some(Local::start())
    });
    if server.is_none() {
        let under_ci = std::env::var("CI").is_ok_and(|value| value == "true");
        assert!(
            !under_ci,
            "no PostgreSQL installed (initdb and pg_ctl not on PATH) and DATABASE_URL not set"
        );
        println!("skipped: no PostgreSQL installed (initdb, pg_ctl) and DATABASE_URL not set");
    }
    server.as_ref()
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
        self.local.as_ref().map(Local::data)
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
}

impl Local {
    /// Creates a cluster in a fresh directory and starts it on a free
    /// loopback port, with a watchdog that stops it and removes the
    /// directory once this process is gone, however it ended.
    fn start() -> Postgres {
        let directory =
            std::env::temp_dir().join(format!("terminal-retry-postgres-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        std::fs::create_dir_all(&directory).unwrap();
        // Private: it holds the server's socket, which trusts whoever connects.
        std::fs::set_permissions(&directory, std::fs::Permissions::from_mode(0o700)).unwrap();
        let local = Local {
            directory,
            port: free_port(),
            as_postgres: is_root(),
        };
        local.watch();
        if local.as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(&local.directory)
                .status()
                .unwrap();
            assert!(status.success(), "chown of the test server's directory");
        }
        let data = local.data();
        local.check(
            local
                .command("initdb")
                .args(["--auth=trust", "--username=postgres", "--encoding=UTF8"])
                .arg("--no-sync")
                .arg("-D")
                .arg(&data),
        );
        // Trust, on loopback TCP and the socket in the private directory only.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhost all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        local.pg_ctl_start();
        let url = format!("postgresql://postgres@127.0.0.1:{}/{DATABASE}", local.port);
        Postgres {
            url,
            local: Some(local),
        }
    }

    fn data(&self) -> PathBuf {
        self.directory.join("data")
    }

    /// Starts the server and waits until it takes connections. A test
    /// server need not survive a power cut: no fsync.
    fn pg_ctl_start(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c full_page_writes=off",
            self.port,
            self.directory.display()
        );
        let log = self.directory.join("server.log");
        self.pg_ctl(&["start", "-w", "-o", &options, "-l", log.to_str().unwrap()]);
    }

    fn pg_ctl(&self, arguments: &[&str]) {
        let data = self.data();
        self.check(self.command("pg_ctl").arg("-D").arg(&data).args(arguments));
    }

    /// The installed `program` (found on `PATH`, as `runuser` may reset
    /// it), run as the `postgres` user when we are root.
    fn command(&self, program: &str) -> Command {
        let program = find_on_path(program).expect("installed beside initdb");
        if !self.as_postgres {
            return Command::new(program);
        }
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    }

    /// Runs `command`; panics, with the server's log, unless it succeeds.
    fn check(&self, command: &mut Command) {
        let output = command.stdout(Stdio::null()).output().unwrap();
        let log = std::fs::read_to_string(self.directory.join("server.log")).unwrap_or_default();
        assert!(
            output.status.success(),
            "{command:?}: {}\n{}\n{log}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// A shell in a process group of its own (an interrupt of the test run
    /// does not reach it) that waits for this process to end, then stops
    /// the server at once and removes its directory.
    // Never waited for: it outlives this process, by design.
    #[allow(clippy::zombie_processes)]
    fn watch(&self) {
        let directory = self.directory.display().to_string();
        let as_postgres = if self.as_postgres {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let pg_ctl = find_on_path("pg_ctl").expect("installed beside initdb");
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.2; done; \
             {as_postgres}'{pg_ctl}' -D '{directory}/data' stop -m immediate >/dev/null 2>&1; \
             rm -rf '{directory}'",
            pid = std::process::id(),
            pg_ctl = pg_ctl.display(),
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
    }
}

/// A loopback port nothing listens on, as of now.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    listener.local_addr().unwrap().port()
}

/// Whether this process runs as root.
fn is_root() -> bool {
    let output = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&output.stdout).trim() == "0"
}

/// `program` in a directory of `PATH`, if any.
fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|directory| directory.join(program))
        .find(|candidate| Path::is_file(candidate))
}
