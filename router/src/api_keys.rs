//! API keys: `authorization: Bearer <key>` on the public gRPC and HTTP APIs. Keys come from a
//! file (`--api-keys-file`) or the environment (`SLUICE_API_KEYS`), one `ID:KEY` per line (or
//! comma), optionally followed by per-key limits (`ID:KEY in_flight=8 rps=5`); only their
//! SHA-256 digests are kept, and a presented key's digest is compared with every one in
//! constant time. The key id — never the key — names the caller in logs and metrics.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ring::digest::{SHA256, digest};
use subtle::ConstantTimeEq;

use crate::error::RouterError;

/// Which configured key a request presented (its id, safe to log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyId(String);

impl KeyId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What one key may do at once: requests in flight, and requests per second (a bucket of
/// `max(rps, 1)` tokens refilled at `rps` per second). `None`: unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KeyLimits {
    pub in_flight: Option<usize>,
    pub rps: Option<f64>,
}

/// One accepted key: its id, its digest, its limits and their counters.
struct KeyEntry {
    id: KeyId,
    digest: [u8; 32],
    limits: KeyLimits,
    usage: Arc<KeyUsage>,
}

#[derive(Default)]
struct KeyUsage {
    in_flight: AtomicUsize,
    /// Tokens left and when they were counted (for `rps`).
    bucket: Mutex<Option<(f64, Instant)>>,
}

/// A request's hold on its key's in-flight limit: freed when the request ends (dropped).
pub struct KeyPermit {
    usage: Arc<KeyUsage>,
}

impl Drop for KeyPermit {
    fn drop(&mut self) {
        self.usage.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The keys a router accepts.
#[derive(Clone)]
pub struct ApiKeys {
    keys: Arc<Vec<KeyEntry>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        f.debug_struct("ApiKeys").field("ids", &ids).finish()
    }
}

/// Shorter keys are refused at load: a guessable key is no key.
const MIN_KEY_LEN: usize = 16;

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

impl ApiKeys {
    /// `ID:KEY [in_flight=N] [rps=R]` entries, one per line or comma; blank lines and `#`
    /// comments are skipped. `source` names where they came from in errors (which never
    /// quote a key).
    pub fn parse(text: &str, source: &str) -> Result<Self, RouterError> {
        Ok(ApiKeys {
            keys: Arc::new(Self::entries(text, source)?),
        })
    }

    fn entries(text: &str, source: &str) -> Result<Vec<KeyEntry>, RouterError> {
        let mut keys: Vec<KeyEntry> = Vec::new();
        let entries = text
            .lines()
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .filter(|e| !e.is_empty() && !e.starts_with('#'));
        for (n, entry) in entries.enumerate() {
            let bad =
                |why: &str| RouterError::Internal(format!("{source}: entry {}: {why}", n + 1));
            let mut fields = entry.split_whitespace();
            let (id, key) = fields
                .next()
                .and_then(|f| f.split_once(':'))
                .ok_or_else(|| bad("expected `ID:KEY`"))?;
            let valid_id = !id.is_empty()
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
            if !valid_id {
                return Err(bad("the id must be letters, digits, `-`, `_` or `.`"));
            }
            if key.len() < MIN_KEY_LEN {
                return Err(bad(&format!(
                    "key `{id}` is shorter than {MIN_KEY_LEN} characters"
                )));
            }
            if keys.iter().any(|k| k.id.0 == id) {
                return Err(bad(&format!("the id `{id}` is given twice")));
            }
            let mut limits = KeyLimits::default();
            for field in fields {
                match field.split_once('=') {
                    Some(("in_flight", v)) => {
                        let n = v.parse::<usize>().ok().filter(|&n| n > 0);
                        limits.in_flight =
                            Some(n.ok_or_else(|| bad(&format!("`{id}`: in_flight must be ≥ 1")))?);
                    }
                    Some(("rps", v)) => {
                        let r = v.parse::<f64>().ok().filter(|r| *r > 0.0 && r.is_finite());
                        limits.rps =
                            Some(r.ok_or_else(|| bad(&format!("`{id}`: rps must be > 0")))?);
                    }
                    _ => {
                        return Err(bad(&format!(
                            "`{id}`: unknown field (expected in_flight=N or rps=R)"
                        )));
                    }
                }
            }
            keys.push(KeyEntry {
                id: KeyId(id.to_string()),
                digest: sha256(key.as_bytes()),
                limits,
                usage: Arc::default(),
            });
        }
        if keys.is_empty() {
            return Err(RouterError::Internal(format!("{source}: no keys")));
        }
        Ok(keys)
    }

    /// The keys of `file` and of `inline` (the environment's) together; `None` when neither
    /// is given (no authentication).
    pub fn load(file: Option<&Path>, inline: Option<&str>) -> Result<Option<Self>, RouterError> {
        let mut all: Vec<KeyEntry> = Vec::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                RouterError::Internal(format!("--api-keys-file {}: {e}", path.display()))
            })?;
            all.extend(Self::entries(&text, &path.display().to_string())?);
        }
        if let Some(text) = inline.filter(|t| !t.trim().is_empty()) {
            for entry in Self::entries(text, "SLUICE_API_KEYS")? {
                if all.iter().any(|k| k.id == entry.id) {
                    return Err(RouterError::Internal(format!(
                        "the key id `{}` is in both --api-keys-file and SLUICE_API_KEYS",
                        entry.id
                    )));
                }
                all.push(entry);
            }
        }
        Ok((!all.is_empty()).then(|| ApiKeys {
            keys: Arc::new(all),
        }))
    }

    /// The key an `authorization` header value carries, or `UNAUTHENTICATED`.
    fn find(&self, authorization: Option<&str>) -> Result<&KeyEntry, RouterError> {
        let presented = authorization
            .and_then(|v| {
                let (scheme, key) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
            })
            .ok_or_else(|| {
                RouterError::Unauthenticated(
                    "missing API key: send `authorization: Bearer <key>`".into(),
                )
            })?;
        let hash = sha256(presented.as_bytes());
        // Every key is compared, whichever matches: the time taken says nothing of which.
        let mut found: Option<&KeyEntry> = None;
        for entry in self.keys.iter() {
            if bool::from(entry.digest.ct_eq(&hash)) {
                found = Some(entry);
            }
        }
        found.ok_or_else(|| RouterError::Unauthenticated("invalid API key".into()))
    }

    /// The id of the key an `authorization` header value carries, or `UNAUTHENTICATED`.
    pub fn check(&self, authorization: Option<&str>) -> Result<KeyId, RouterError> {
        self.find(authorization).map(|e| e.id.clone())
    }

    /// As `check`, then the key's limits: a request over its rate or its in-flight limit is
    /// refused (`RESOURCE_EXHAUSTED` / 429, with when to retry); one within them holds a
    /// permit until it ends.
    pub fn admit(&self, authorization: Option<&str>) -> Result<(KeyId, KeyPermit), RouterError> {
        let entry = self.find(authorization)?;
        let over = |message: String, after: Duration| RouterError::Overloaded {
            message,
            retry_after: Some(after),
        };
        if let Some(rps) = entry.limits.rps {
            let mut bucket = entry
                .usage
                .bucket
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let burst = rps.max(1.0);
            let (tokens, at) = bucket.unwrap_or((burst, now));
            let tokens = (tokens + rps * (now - at).as_secs_f64()).min(burst);
            if tokens < 1.0 {
                *bucket = Some((tokens, now));
                let wait = Duration::from_secs_f64((1.0 - tokens) / rps);
                return Err(over(
                    format!("key `{}` is over its {rps} requests per second", entry.id),
                    wait,
                ));
            }
            *bucket = Some((tokens - 1.0, now));
        }
        let held = entry.usage.in_flight.fetch_add(1, Ordering::AcqRel);
        let permit = KeyPermit {
            usage: entry.usage.clone(),
        };
        if let Some(limit) = entry.limits.in_flight
            && held >= limit
        {
            drop(permit);
            return Err(over(
                format!("key `{}` has its {limit} requests in flight", entry.id),
                Duration::from_secs(1),
            ));
        }
        Ok((entry.id.clone(), permit))
    }
}

/// The check every public request passes: the keys (`None`: open) and where outcomes count.
#[derive(Clone)]
pub struct KeyGuard {
    pub keys: Option<Arc<ApiKeys>>,
    pub metrics: Arc<crate::metrics::RouterMetrics>,
}

impl KeyGuard {
    /// The caller's key and its permit (`None` when no keys are configured), or the refusal,
    /// counted.
    pub fn admit(&self, authorization: Option<&str>) -> Result<Option<HeldKey>, RouterError> {
        let Some(keys) = &self.keys else {
            return Ok(None);
        };
        match keys.admit(authorization) {
            Ok((id, permit)) => {
                self.metrics.authenticated(id.as_str());
                tracing::debug!(key = %id, "authenticated");
                Ok(Some(HeldKey::new(id, permit)))
            }
            Err(e) => {
                if matches!(e, RouterError::Overloaded { .. }) {
                    self.metrics.refused("key_limit");
                }
                self.metrics.outcome(e.outcome());
                tracing::info!("refused: {e}");
                Err(e)
            }
        }
    }

    /// As a gRPC interceptor: the key and its permit go into the request's extensions, for
    /// the request to hold until it ends.
    pub fn intercept(
        &self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if let Some(held) = self.admit(header)? {
            request.extensions_mut().insert(held);
        }
        Ok(request)
    }
}

/// A request's key and permit as request extensions carry them (extensions must be
/// cloneable; the permit is taken once, by the request that runs).
#[derive(Clone)]
pub struct HeldKey {
    pub id: KeyId,
    permit: Arc<Mutex<Option<KeyPermit>>>,
}

impl HeldKey {
    pub fn new(id: KeyId, permit: KeyPermit) -> Self {
        HeldKey {
            id,
            permit: Arc::new(Mutex::new(Some(permit))),
        }
    }

    /// The permit, for the request to hold while it runs.
    pub fn take(&self) -> Option<KeyPermit> {
        self.permit
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &str = "# operators\nalice:0123456789abcdef-alice\n\nbob:0123456789abcdef-bob, ci:ci-key-0123456789abcdef";

    #[test]
    fn a_listed_key_gives_its_id_and_anything_else_is_unauthenticated() {
        let keys = ApiKeys::parse(KEYS, "test").unwrap();
        let id = |h: &str| keys.check(Some(h)).map(|k| k.to_string());
        assert_eq!(id("Bearer 0123456789abcdef-alice").unwrap(), "alice");
        assert_eq!(id("bearer   0123456789abcdef-bob ").unwrap(), "bob");
        assert_eq!(id("Bearer ci-key-0123456789abcdef").unwrap(), "ci");
        for bad in [
            "Bearer 0123456789abcdef-alicf",
            "Bearer 0123456789abcdef-alice0",
            "Basic 0123456789abcdef-alice",
            "0123456789abcdef-alice",
            "Bearer ",
            "Bearer alice",
        ] {
            let e = keys.check(Some(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad}");
            assert!(!e.to_string().contains("0123456789"), "{e}");
        }
        assert_eq!(
            keys.check(None).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        // Only digests are kept: nothing of a key shows in the debug form.
        assert!(!format!("{keys:?}").contains("0123"));
    }

    #[test]
    fn malformed_key_lists_are_refused_without_quoting_a_key() {
        for (text, why) in [
            ("alice", "expected `ID:KEY`"),
            ("alice:short", "shorter than 16"),
            ("al ice:0123456789abcdef", "expected `ID:KEY`"),
            ("a/b:0123456789abcdef", "the id must be"),
            ("a:0123456789abcdef-1\na:0123456789abcdef-2", "given twice"),
            ("# nothing\n", "no keys"),
            ("a:0123456789abcdef in_flight=0", "in_flight must be"),
            ("a:0123456789abcdef rps=-1", "rps must be"),
            ("a:0123456789abcdef burst=3", "unknown field"),
        ] {
            let e = ApiKeys::parse(text, "keys.txt").unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("keys.txt"), "{text}: {e}");
            assert!(!e.contains("0123456789abcdef"), "{e}");
        }
        assert!(ApiKeys::load(None, None).unwrap().is_none());
        assert!(ApiKeys::load(None, Some(" ")).unwrap().is_none());
        let both = ApiKeys::load(None, Some("x:0123456789abcdef-x"))
            .unwrap()
            .unwrap();
        assert!(both.check(Some("Bearer 0123456789abcdef-x")).is_ok());
    }

    #[test]
    fn a_key_over_its_limits_is_refused_and_its_permits_free_on_drop() {
        let keys = ApiKeys::parse(
            "a:0123456789abcdef-a in_flight=2\nb:0123456789abcdef-b rps=2\nc:0123456789abcdef-c",
            "test",
        )
        .unwrap();
        let a = || keys.admit(Some("Bearer 0123456789abcdef-a"));
        let (first, second) = (a().unwrap(), a().unwrap());
        let third = a().map(|_| ()).unwrap_err();
        assert_eq!(third.code(), tonic::Code::ResourceExhausted);
        assert!(third.retry_after().is_some());
        drop(first);
        let again = a().unwrap();
        drop((second, again));
        assert_eq!(keys.keys[0].usage.in_flight.load(Ordering::Acquire), 0);
        // rps 2: a burst of two, then refused with the wait until the next token.
        let b = || keys.admit(Some("Bearer 0123456789abcdef-b")).map(|_| ());
        b().unwrap();
        b().unwrap();
        let over = b().unwrap_err();
        assert_eq!(over.code(), tonic::Code::ResourceExhausted);
        let wait = over.retry_after().unwrap();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        // One key's limits are not another's, and a key without limits has none.
        for _ in 0..10 {
            keys.admit(Some("Bearer 0123456789abcdef-c")).unwrap();
        }
    }
}
