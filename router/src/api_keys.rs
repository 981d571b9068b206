//! API keys: `authorization: Bearer <key>` on the public gRPC and HTTP APIs. Keys come from a
//! file (`--api-keys-file`) or the environment (`SLUICE_API_KEYS`), one `ID:KEY` per line (or
//! comma); only their SHA-256 digests are kept, and a presented key's digest is compared with
//! every one in constant time. The key id — never the key — names the caller in logs and
//! metrics.

use std::path::Path;

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

/// The keys a router accepts.
#[derive(Clone)]
pub struct ApiKeys {
    keys: Vec<(KeyId, [u8; 32])>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
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
    /// `ID:KEY` entries, one per line or comma; blank lines and `#` comments are skipped.
    /// `source` names where they came from in errors (which never quote a key).
    pub fn parse(text: &str, source: &str) -> Result<Self, RouterError> {
        let mut keys: Vec<(KeyId, [u8; 32])> = Vec::new();
        let entries = text
            .lines()
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .filter(|e| !e.is_empty() && !e.starts_with('#'));
        for (n, entry) in entries.enumerate() {
            let bad =
                |why: &str| RouterError::Internal(format!("{source}: entry {}: {why}", n + 1));
            let (id, key) = entry
                .split_once(':')
                .ok_or_else(|| bad("expected `ID:KEY`"))?;
            let id = id.trim();
            let valid_id = !id.is_empty()
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
            if !valid_id {
                return Err(bad("the id must be letters, digits, `-`, `_` or `.`"));
            }
            if key.trim().len() < MIN_KEY_LEN {
                return Err(bad(&format!(
                    "key `{id}` is shorter than {MIN_KEY_LEN} characters"
                )));
            }
            if keys.iter().any(|(k, _)| k.0 == id) {
                return Err(bad(&format!("the id `{id}` is given twice")));
            }
            keys.push((KeyId(id.to_string()), sha256(key.trim().as_bytes())));
        }
        if keys.is_empty() {
            return Err(RouterError::Internal(format!("{source}: no keys")));
        }
        Ok(ApiKeys { keys })
    }

    /// The keys of `file` and of `inline` (the environment's) together; `None` when neither
    /// is given (no authentication).
    pub fn load(file: Option<&Path>, inline: Option<&str>) -> Result<Option<Self>, RouterError> {
        let mut all: Vec<(KeyId, [u8; 32])> = Vec::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                RouterError::Internal(format!("--api-keys-file {}: {e}", path.display()))
            })?;
            all.extend(Self::parse(&text, &path.display().to_string())?.keys);
        }
        if let Some(text) = inline.filter(|t| !t.trim().is_empty()) {
            for (id, hash) in Self::parse(text, "SLUICE_API_KEYS")?.keys {
                if all.iter().any(|(k, _)| *k == id) {
                    return Err(RouterError::Internal(format!(
                        "the key id `{id}` is in both --api-keys-file and SLUICE_API_KEYS"
                    )));
                }
                all.push((id, hash));
            }
        }
        Ok((!all.is_empty()).then_some(ApiKeys { keys: all }))
    }

    /// The id of the key an `authorization` header value carries, or `UNAUTHENTICATED`.
    pub fn check(&self, authorization: Option<&str>) -> Result<KeyId, RouterError> {
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
        let mut found: Option<&KeyId> = None;
        for (id, h) in &self.keys {
            if bool::from(h.ct_eq(&hash)) {
                found = Some(id);
            }
        }
        found
            .cloned()
            .ok_or_else(|| RouterError::Unauthenticated("invalid API key".into()))
    }
}

/// The check every public request passes: the keys (`None`: open) and where outcomes count.
#[derive(Clone)]
pub struct KeyGuard {
    pub keys: Option<std::sync::Arc<ApiKeys>>,
    pub metrics: std::sync::Arc<crate::metrics::RouterMetrics>,
}

impl KeyGuard {
    /// The caller's key id (`None` when no keys are configured), or the refusal, counted.
    pub fn admit(&self, authorization: Option<&str>) -> Result<Option<KeyId>, RouterError> {
        let Some(keys) = &self.keys else {
            return Ok(None);
        };
        match keys.check(authorization) {
            Ok(id) => {
                self.metrics.authenticated(id.as_str());
                tracing::debug!(key = %id, "authenticated");
                Ok(Some(id))
            }
            Err(e) => {
                self.metrics.outcome(e.outcome());
                tracing::info!("refused: {e}");
                Err(e)
            }
        }
    }

    /// As a gRPC interceptor: the key id goes into the request's extensions.
    pub fn intercept(
        &self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if let Some(id) = self.admit(header)? {
            request.extensions_mut().insert(id);
        }
        Ok(request)
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
            ("al ice:0123456789abcdef", "the id must be"),
            ("a:0123456789abcdef-1\na:0123456789abcdef-2", "given twice"),
            ("# nothing\n", "no keys"),
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
}
