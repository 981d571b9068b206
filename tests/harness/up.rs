//! `sluice up` as a child process: every role in one process, on loopback ports.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{Proc, bin, free_port};

pub struct Up {
    /// The gRPC endpoint, `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The HTTP address, `127.0.0.1:PORT`.
    pub http: String,
    pub proc: Proc,
    _logs: tempfile::TempDir,
}

impl Up {
    /// Starts `sluice up --model DIR` with `extra` flags; returns once it announces its
    /// endpoint.
    pub fn start(model: &Path, extra: &[&str]) -> Up {
        Up::start_on(free_port(), model, extra)
    }

    /// As [`Up::start`], on a given gRPC port.
    pub fn start_on(port: u16, model: &Path, extra: &[&str]) -> Up {
        let logs = tempfile::tempdir().unwrap();
        let http = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(bin("sluice"));
        cmd.arg("up")
            .arg("--model")
            .arg(model)
            .args(["--threads", "1", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--http-listen")
            .arg(&http)
            .args(extra);
        let mut proc = Proc::spawn("up", &mut cmd, logs.path());
        let start = Instant::now();
        while !proc.log().contains("sluice up: serving") {
            assert!(proc.is_running(), "sluice up exited:\n{}", proc.log());
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "sluice up did not announce its endpoint:\n{}",
                proc.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Up {
            endpoint: format!("http://127.0.0.1:{port}"),
            http,
            proc,
            _logs: logs,
        }
    }
}
