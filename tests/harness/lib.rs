//! Test harness for the cluster: a throw-away etcd, the service binaries as real processes,
//! and a synthetic model. Everything is killed and removed on drop.
//!
//! The binaries are those `cargo test --workspace` builds next to this test executable
//! (`target/<profile>/`); each service crate has integration tests, so cargo builds its binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub mod cluster;
pub mod http;
pub mod up;

pub use cluster::{Cluster, ClusterSpec, Running, load_of, reflected_services};
pub use up::Up;

/// Path of a binary of this workspace built alongside the running test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo test --workspace` does)",
        path.display()
    );
    path
}

/// Runs `sluice load` with `args` and `--json`; the parsed report (panics with its stderr
/// when it fails).
pub fn load_report<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> serde_json::Value {
    let out = std::process::Command::new(bin("sluice"))
        .arg("load")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sluice load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A port nothing listens on now, never the same twice in this process: the kernel may hand
/// a just-released port out again before the child it was meant for has bound it.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
}

fn wait_for_port(port: u16, timeout: Duration, what: &str) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < timeout,
            "{what} did not open port {port} within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed on drop; its stderr goes to a log file shown on failure.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, logs: &Path) -> Proc {
        let log = logs.join(format!("{name}.log"));
        let file = File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no graceful deregistration, the lease has to expire.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM: what Kubernetes sends; the process drains and exits by itself.
    pub fn term(&mut self) {
        self.signal("TERM");
    }

    /// Sends the signal named `name` (`TERM`, `STOP`, `CONT`, ...).
    pub fn signal(&mut self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} {}", self.name);
    }

    /// Waits up to `timeout` for the process to exit; its exit code (`None`: still running,
    /// or ended by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- {} log ----\n{}", self.name, self.log());
        }
    }
}

/// etcd on free loopback ports with a temporary data dir.
pub struct Etcd {
    pub url: String,
    proc: Proc,
    _dir: TempDir,
}

impl Etcd {
    pub fn start(logs: &Path) -> Etcd {
        let etcd = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect(
                "etcd is not installed: run `scripts/deps.sh --test` (Debian package etcd-server)",
            );
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let proc = Proc::spawn(
            "etcd",
            Command::new(etcd)
                .arg("--name=test")
                .arg(format!("--data-dir={}", dir.path().display()))
                .arg(format!("--listen-client-urls={url}"))
                .arg(format!("--advertise-client-urls={url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=test={peer_url}")),
            logs,
        );
        wait_for_port(client, Duration::from_secs(20), "etcd");
        Etcd {
            url,
            proc,
            _dir: dir,
        }
    }

    /// SIGSTOP: etcd stops answering (connections stay open, nothing replies), as in a long
    /// GC pause, a frozen VM or a partition.
    pub fn pause(&mut self) {
        self.proc.signal("STOP");
    }

    /// SIGCONT after [`Etcd::pause`].
    pub fn resume(&mut self) {
        self.proc.signal("CONT");
    }
}

/// A synthetic checkpoint written by `sluice synth`.
pub fn synth(preset: &str, dir: &Path) {
    let status = Command::new(bin("sluice"))
        .args(["synth", "--preset", preset, "--out"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success(), "sluice synth failed");
}

/// Greedy token ids from `sluice generate --model` in one process: the reference.
pub fn local_greedy(model: &Path, prompt: &[u32], max_tokens: usize, ignore_eos: bool) -> Vec<u32> {
    let tokens: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let mut cmd = Command::new(bin("sluice"));
    cmd.arg("generate")
        .arg("--model")
        .arg(model)
        .arg("--tokens")
        .arg(tokens.join(","))
        .arg("--max-tokens")
        .arg(max_tokens.to_string())
        .arg("--json");
    if ignore_eos {
        cmd.arg("--ignore-eos");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

/// Common flags of a service process.
pub fn service(binary: &str, etcd: &str, model: &Path, port: u16, ttl: u64) -> Command {
    let mut cmd = Command::new(bin(binary));
    cmd.arg("--etcd")
        .arg(etcd)
        .arg("--cluster")
        .arg("e2e")
        .arg("--model")
        .arg(model)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--lease-ttl")
        .arg(ttl.to_string())
        .env("RUST_LOG", "info");
    cmd
}

/// Polls `check` every 100 ms until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A service binary started without `--etcd` exits with an error that says how to get one.
pub fn assert_refuses_to_start_without_etcd(binary: &Path) {
    let out = Command::new(binary)
        .args(["--model", "/nonexistent"])
        .env_remove("SLUICE_ETCD")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{} started without etcd",
        binary.display()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--etcd") && err.contains("etcd-server") && err.contains("sluice up"),
        "{err}"
    );
}

/// Logits of a model that knows nothing: seeded noise in [0, 8), a fresh row per `step`
/// (guided-decoding tests: whatever the logits, the output must satisfy the constraint).
pub fn noise_logits(seed: u64, step: usize, vocab: usize) -> Vec<f32> {
    let mut x = seed ^ (step as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..vocab)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 8.0
        })
        .collect()
}
