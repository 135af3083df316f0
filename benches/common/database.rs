//! A PostgreSQL server for the benches: the one `DATABASE_URL` names, or a
//! throwaway one with PostgreSQL's default durability (`fsync` and
//! `synchronous_commit` on), started from the installed binaries.

/// The PostgreSQL server a bench runs against: a server of its own, not
/// the tests' (they turn `fsync` off, which would make every commit free).
pub enum Database {
    External(String),
    /// A throwaway server: its data directory and port; stopped and removed
    /// on drop.
    Throwaway(std::path::PathBuf, u16),
}

impl Database {
    /// The server `DATABASE_URL` names, else a throwaway one in `directory`.
    pub fn from_env_or_start(directory: &std::path::Path) -> Database {
        match std::env::var("DATABASE_URL") {
            Ok(url) => Database::External(url),
            Err(_) => Database::start(directory),
        }
    }

    /// Starts a throwaway server in `directory`, as the `postgres` user when
    /// run as root (PostgreSQL refuses to run as root).
    pub fn start(directory: &std::path::Path) -> Database {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free loopback port")
            .port();
        std::fs::create_dir_all(directory).expect("a server directory");
        let owner = server_owner();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(directory, Some(uid), Some(gid)).expect("the directory given");
        }
        let data = directory.join("data");
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1",
            directory.display()
        );
        let data_arg = data.display().to_string();
        let log_arg = directory.join("log").display().to_string();
        run_as(
            owner,
            "initdb",
            &[
                "-D",
                &data_arg,
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        run_as(
            owner,
            "pg_ctl",
            &[
                "-D", &data_arg, "-o", &options, "-l", &log_arg, "-w", "start",
            ],
        );
        Database::Throwaway(data, port)
    }

    pub fn url(&self) -> String {
        match self {
            Database::External(url) => url.clone(),
            Database::Throwaway(_, port) => {
                format!("postgres://postgres@127.0.0.1:{port}/postgres")
            }
        }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Database::Throwaway(data, _) = self {
            let data_arg = data.display().to_string();
            run_as(
                server_owner(),
                "pg_ctl",
                &["-D", &data_arg, "-m", "immediate", "stop"],
            );
            if let Some(directory) = data.parent() {
                let _ = std::fs::remove_dir_all(directory);
            }
        }
    }
}

/// The `postgres` user's ids when run as root, else `None` (run as is).
fn server_owner() -> Option<(u32, u32)> {
    let id = |args: &[&str]| -> u32 {
        let out = std::process::Command::new("id")
            .args(args)
            .output()
            .expect("the user's ids");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a numeric id")
    };
    (id(&["-u"]) == 0).then(|| (id(&["-u", "postgres"]), id(&["-g", "postgres"])))
}

fn run_as(owner: Option<(u32, u32)>, program: &str, args: &[&str]) {
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new(program);
    command.args(args).stdout(std::process::Stdio::null());
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid);
    }
    let status = command
        .status()
        .unwrap_or_else(|error| panic!("{program}: {error}"));
    assert!(status.success(), "{program} failed: {status}");
}
