//! A throwaway PostgreSQL for the store's own tests, as the integration
//! tests start theirs (`tests/postgres_support`, which a unit test cannot
//! reach): a cluster made by `initdb` in a fresh directory, started by
//! `pg_ctl` on a free loopback port (as the `postgres` user when run as
//! root), shared by the tests of the binary and stopped, its directory
//! removed, once the process is gone; or the server `DATABASE_URL` names.

use std::{
    net::{Ipv4Addr, TcpListener},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
};

/// The URL of the server, started on first use; `None` (after a line
/// saying so) where PostgreSQL is not installed and `DATABASE_URL` is not
/// set. Under CI (`CI=true`) that panics instead.
pub(super) fn url() -> Option<&'static str> {
    static URL: OnceLock<Option<String>> = OnceLock::new();
    let url = URL.get_or_init(|| {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            return Some(url);
        }
        let (initdb, pg_ctl) = (find_on_path("initdb")?, find_on_path("pg_ctl")?);
        Some(start(&initdb, &pg_ctl))
    });
    if url.is_none() {
        let why = "no PostgreSQL installed (initdb, pg_ctl) and DATABASE_URL not set";
        assert!(!is_ci(), "{why}");
        println!("skipped: {why}");
    }
    url.as_deref()
}

/// Whether this runs under CI, where every test must run.
fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true")
}

/// Makes and starts a cluster; its URL.
fn start(initdb: &Path, pg_ctl: &Path) -> String {
    let directory =
        std::env::temp_dir().join(format!("terminal-retry-store-tests-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).unwrap();
    // Private: it holds the server's socket, which trusts whoever connects.
    std::fs::set_permissions(&directory, std::fs::Permissions::from_mode(0o700)).unwrap();
    let as_postgres = is_root();
    if as_postgres {
        run(Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(&directory));
    }
    watch(&directory, pg_ctl, as_postgres);
    let data = directory.join("data");
    run(command(initdb, as_postgres)
        .args([
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--no-sync",
            "-D",
        ])
        .arg(&data));
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\nhost all all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    let port = free_port();
    let options = format!(
        "-p {port} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c full_page_writes=off",
        directory.display()
    );
    let log = directory.join("server.log");
    run(command(pg_ctl, as_postgres)
        .arg("-D")
        .arg(&data)
        .args(["start", "-w", "-o", &options, "-l"])
        .arg(&log));
    format!("postgresql://postgres@127.0.0.1:{port}/postgres")
}

/// `program`, run as the `postgres` user when `as_postgres`.
fn command(program: &Path, as_postgres: bool) -> Command {
    if !as_postgres {
        return Command::new(program);
    }
    let mut command = Command::new("runuser");
    command.args(["-u", "postgres", "--"]).arg(program);
    command
}

/// Runs `command`; panics with what it said unless it succeeds.
fn run(command: &mut Command) {
    let output = command.stdout(Stdio::null()).output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A shell in a process group of its own that waits for this process to
/// end, then stops the server at once and removes its directory.
// Never waited for: it outlives this process, by design.
#[allow(clippy::zombie_processes)]
fn watch(directory: &Path, pg_ctl: &Path, as_postgres: bool) {
    let as_postgres = if as_postgres {
        "runuser -u postgres -- "
    } else {
        ""
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.2; done; \
         {as_postgres}'{pg_ctl}' -D '{directory}/data' stop -m immediate >/dev/null 2>&1; \
         rm -rf '{directory}'",
        pid = std::process::id(),
        pg_ctl = pg_ctl.display(),
        directory = directory.display(),
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

/// A loopback port nothing listens on, as of now.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    listener.local_addr().unwrap().port()
}

/// Whether this process runs as root, which PostgreSQL refuses to run as.
fn is_root() -> bool {
    let output = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&output.stdout).trim() == "0"
}

/// `program` in a directory of `PATH`, if any.
fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|directory| directory.join(program))
        .find(|candidate| candidate.is_file())
}
