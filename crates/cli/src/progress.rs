//! A one-line progress bar on stderr, drawn only when stderr is a terminal.

use std::io::{IsTerminal, Write};

pub struct Progress {
    label: &'static str,
    enabled: bool,
}

impl Progress {
    pub fn new(label: &'static str) -> Self {
        Progress {
            label,
            enabled: std::io::stderr().is_terminal(),
        }
    }

    pub fn update(&mut self, done: usize, total: usize) {
        if !self.enabled || total == 0 {
            return;
        }
        let width = 30;
        let filled = done * width / total;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{} [{}{}] {done}/{total}",
            self.label,
            "#".repeat(filled),
            " ".repeat(width - filled)
        );
        if done == total {
            let _ = writeln!(err);
        }
        let _ = err.flush();
    }
}
