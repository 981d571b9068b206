//! The router's name for one attempt of a request inside the cluster. Workers key `Abort`, the
//! cache inbox and the handoff by it; the client's `request_id` is only echoed and logged, so
//! two clients that pick the same id never touch each other's sequences, and a request that
//! moves to other workers (retry, migration) never aborts its own new attempt.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// `{router:016x}-{request:x}.{attempt}`: unique across routers (a random 64-bit router id
/// drawn at start) and within one (a counter), and per attempt of the same request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttemptKey {
    router: u64,
    request: u64,
    attempt: u32,
}

/// This process's random router id (std's randomly seeded hasher: no RNG crate needed for
/// one number).
fn router_id() -> u64 {
    static ID: OnceLock<u64> = OnceLock::new();
    *ID.get_or_init(|| RandomState::new().hash_one(std::process::id()))
}

impl AttemptKey {
    /// The first attempt of a new request.
    pub fn first() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        AttemptKey {
            router: router_id(),
            request: NEXT.fetch_add(1, Ordering::Relaxed),
            attempt: 0,
        }
    }

    /// The same request's next attempt.
    pub fn next(self) -> Self {
        AttemptKey {
            attempt: self.attempt + 1,
            ..self
        }
    }

    pub fn attempt(self) -> u32 {
        self.attempt
    }
}

impl fmt::Display for AttemptKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:016x}-{:x}.{}",
            self.router, self.request, self.attempt
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_of_one_request_and_different_requests_never_share_a_key() {
        let a = AttemptKey::first();
        let b = AttemptKey::first();
        let a1 = a.next();
        let keys = [a, b, a1, a1.next(), b.next()].map(|k| k.to_string());
        for (i, x) in keys.iter().enumerate() {
            for y in &keys[i + 1..] {
                assert_ne!(x, y);
            }
        }
        assert_eq!(a1.attempt(), 1);
        assert!(keys[2].ends_with(".1"), "{}", keys[2]);
    }
}
