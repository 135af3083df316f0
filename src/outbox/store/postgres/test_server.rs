//! A throwaway PostgreSQL for tests: a cluster made by `initdb` in a fresh
//! directory and started by `pg_ctl` on a free loopback port (as the
//! `postgres` user when run as root), with TLS if asked, and a watchdog that
//! stops it and removes its directory once the process is gone, however it
//! ended. The store's own unit tests share one ([`url`]); the integration
//! tests, which a unit test cannot reach, include this file for theirs
//! (`tests/postgres_support`).

// Each of the two includes uses its own share of it.
#![allow(dead_code)]

use std::{
    net::{Ipv4Addr, TcpListener},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
};

/// The URL of the server the store's unit tests share, started on first
/// use, or the one `DATABASE_URL` names; `None` (after a line saying so)
/// where PostgreSQL is not installed and `DATABASE_URL` is not set. Under CI
/// (`CI=true`) that panics instead.
pub(crate) fn url() -> Option<&'static str> {
    static URL: OnceLock<Option<String>> = OnceLock::new();
    let url = URL.get_or_init(|| {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            return Some(url);
        }
        if !installed() {
            return None;
        }
        let cluster = Cluster::start("store-tests", None);
        Some(format!(
            "postgresql://postgres@127.0.0.1:{}/postgres",
            cluster.port
        ))
    });
    if url.is_none() {
        skipped("no PostgreSQL installed (initdb, pg_ctl) and DATABASE_URL not set");
    }
    url.as_deref()
}

/// Whether PostgreSQL's binaries are on `PATH`.
pub(crate) fn installed() -> bool {
    find_on_path("initdb").is_some() && find_on_path("pg_ctl").is_some()
}

/// Says on one line why a test is skipped; under CI (`CI=true`), where
/// every test must run, panics instead.
pub(crate) fn skipped(why: &str) {
    let under_ci = std::env::var("CI").is_ok_and(|value| value == "true");
    assert!(!under_ci, "{why}");
    println!("skipped: {why}");
}

/// What a cluster with `ssl=on` shows and trusts, all PEM: a CA's
/// certificate, a server certificate it issued and its key, and another
/// CA's certificate (which issued nothing the server shows).
pub(crate) struct ClusterTls {
    pub(crate) ca: String,
    pub(crate) server_certificate: String,
    pub(crate) server_key: String,
    pub(crate) other_ca: String,
}

/// A server this process started, and how to run its binaries.
pub(crate) struct Cluster {
    pub(crate) directory: PathBuf,
    pub(crate) port: u16,
    /// Whether the binaries run as the `postgres` user (we are root, which
    /// PostgreSQL refuses to run as).
    as_postgres: bool,
    /// Whether it runs with `ssl=on`, its certificate and key in
    /// `server.crt` and `server.key` of the directory.
    tls: bool,
}

impl Cluster {
    /// Makes a cluster in a fresh directory named after `name` and starts
    /// it. With `tls`, the server runs with `ssl=on` and takes TCP
    /// connections over TLS only; its files are `ca.pem`, `other-ca.pem`,
    /// `server.crt` and `server.key` in the directory.
    pub(crate) fn start(name: &str, tls: Option<&ClusterTls>) -> Cluster {
        let directory =
            std::env::temp_dir().join(format!("terminal-retry-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        std::fs::create_dir_all(&directory).unwrap();
        // Private: it holds the server's socket, which trusts whoever connects.
        std::fs::set_permissions(&directory, std::fs::Permissions::from_mode(0o700)).unwrap();
        let cluster = Cluster {
            directory,
            port: free_port(),
            as_postgres: is_root(),
            tls: tls.is_some(),
        };
        cluster.watch();
        if let Some(tls) = tls {
            let write = |name: &str, text: &str, mode: u32| {
                let path = cluster.directory.join(name);
                std::fs::write(&path, text).unwrap();
                // PostgreSQL refuses a key others may read.
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            };
            write("ca.pem", &tls.ca, 0o644);
            write("other-ca.pem", &tls.other_ca, 0o644);
            write("server.crt", &tls.server_certificate, 0o644);
            write("server.key", &tls.server_key, 0o600);
        }
        if cluster.as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(&cluster.directory)
                .status()
                .unwrap();
            assert!(status.success(), "chown of the test server's directory");
        }
        let data = cluster.data();
        cluster.check(
            cluster
                .command("initdb")
                .args(["--auth=trust", "--username=postgres", "--encoding=UTF8"])
                .arg("--no-sync")
                .arg("-D")
                .arg(&data),
        );
        // Trust, on loopback TCP (over TLS only, for a TLS server) and the
        // socket in the private directory only.
        let tcp = if cluster.tls { "hostssl" } else { "host" };
        std::fs::write(
            data.join("pg_hba.conf"),
            format!("local all all trust\n{tcp} all all 127.0.0.1/32 trust\n"),
        )
        .unwrap();
        cluster.pg_ctl_start();
        cluster
    }

    /// The data directory.
    pub(crate) fn data(&self) -> PathBuf {
        self.directory.join("data")
    }

    /// Starts the server and waits until it takes connections. A test
    /// server need not survive a power cut: no fsync.
    pub(crate) fn pg_ctl_start(&self) {
        let mut options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c full_page_writes=off",
            self.port,
            self.directory.display()
        );
        if self.tls {
            let directory = self.directory.display();
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={directory}/server.crt \
                 -c ssl_key_file={directory}/server.key"
            ));
        }
        let log = self.directory.join("server.log");
        self.pg_ctl(&["start", "-w", "-o", &options, "-l", log.to_str().unwrap()]);
    }

    /// Runs `pg_ctl` on the data directory with `arguments`.
    pub(crate) fn pg_ctl(&self, arguments: &[&str]) {
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
