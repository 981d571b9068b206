//! The one name of a request inside the cluster: the router mints an [`AttemptKey`] per
//! attempt; the decode worker keys its sequences (and `Abort`) by it and the cache inbox takes
//! the transfer it names. The client's `request_id` is only echoed and logged, so two clients
//! that pick the same id never touch each other's sequences, and a request that moves to other
//! workers (retry, migration) never aborts its own new attempt. On the wire it travels as its
//! text (`DecodeRequest.request_id`, `transfer_id`), parsed back at each worker's edge.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::str::FromStr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::RuntimeError;

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

impl FromStr for AttemptKey {
    type Err = RuntimeError;

    fn from_str(s: &str) -> Result<Self, RuntimeError> {
        let invalid = || {
            RuntimeError::invalid(
                "request_id",
                format!("`{s}` is not a router's attempt key (ROUTER-REQUEST.ATTEMPT, hex)"),
            )
        };
        let (router, rest) = s.split_once('-').ok_or_else(invalid)?;
        let (request, attempt) = rest.split_once('.').ok_or_else(invalid)?;
        if router.len() != 16 {
            return Err(invalid());
        }
        Ok(AttemptKey {
            router: u64::from_str_radix(router, 16).map_err(|_| invalid())?,
            request: u64::from_str_radix(request, 16).map_err(|_| invalid())?,
            attempt: attempt.parse().map_err(|_| invalid())?,
        })
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

    #[test]
    fn keys_round_trip_through_their_text_and_strangers_are_refused() {
        for key in [AttemptKey::first(), AttemptKey::first().next().next()] {
            assert_eq!(key.to_string().parse::<AttemptKey>().unwrap(), key);
        }
        let edge = AttemptKey {
            router: u64::MAX,
            request: 0,
            attempt: u32::MAX,
        };
        assert_eq!(edge.to_string().parse::<AttemptKey>().unwrap(), edge);
        for bad in [
            "",
            "same-id",
            "0123456789abcdef-1",
            "0123-1.0",
            "0123456789abcdef-x.0",
        ] {
            let err = bad.parse::<AttemptKey>().unwrap_err().to_string();
            assert!(err.contains("request_id"), "{bad}: {err}");
        }
    }
}
