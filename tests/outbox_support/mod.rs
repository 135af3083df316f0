//! Helpers shared by the tests that keep an outbox on disk: a directory of
//! their own, and a child process (the test binary, run again) for what a
//! test cannot do in its own process.

#![allow(dead_code)] // Each test file uses its own share of them.

use std::{
    future::Future,
    path::PathBuf,
    process::Command,
    time::{Duration, SystemTime},
};

/// A directory of its own for one test, removed when dropped. Its path is
/// canonical, so that tests of links and moved files compare like with like.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh, empty directory named after `name` and this process.
    pub fn new(name: &str) -> Scratch {
        let path =
            std::env::temp_dir().join(format!("terminal-retry-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Scratch(path.canonicalize().unwrap())
    }

    /// `name` inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The outbox file of the test.
    pub fn file(&self) -> PathBuf {
        self.path("reports.redb")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// This test binary again, running only its test `child`, through bash with
/// SIGXFSZ ignored: a write past a file-size limit then fails with EFBIG
/// rather than killing the child. With `file_size_limit`, in KiB, the child
/// runs under that limit. The caller adds the child's orders and pipes.
pub fn child_command(file_size_limit: Option<u64>) -> Command {
    let limit = file_size_limit.map_or(String::new(), |kib| format!("ulimit -f {kib}; "));
    let mut command = Command::new("bash");
    command
        .arg("-c")
        .arg(format!("trap '' XFSZ; {limit}exec \"$0\" \"$@\""))
        .arg(std::env::current_exe().unwrap())
        .args(["child", "--exact", "--nocapture", "--test-threads=1"]);
    command
}

/// The body of a test `child`: runs `body` with the value of the variable
/// `role` on a runtime of its own when this process is a child that
/// [`child_command`] started with it; does nothing in a normal test run.
pub fn as_child<F: Future<Output = ()>>(role: &str, body: impl FnOnce(String) -> F) {
    let Ok(role) = std::env::var(role) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(body(role));
}

/// Waits on tokio's clock (the real one, unless the test paused it), `step`
/// at a time, until `done` or `limit`.
pub async fn wait_every(step: Duration, limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = tokio::time::Instant::now();
    while !done() {
        if start.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(step).await;
    }
    true
}

/// xorshift64*: enough randomness for kill instants, faults and answers.
pub struct Random(pub u64);

impl Random {
    pub fn seeded() -> Random {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        Random(u64::from(nanos) | 1)
    }

    pub fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % bound
    }
}
