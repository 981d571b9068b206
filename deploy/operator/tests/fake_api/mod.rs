//! A small in-process Kubernetes API server for the reconciler's tests: objects by path, server-side
//! apply (stored as sent, generation bumped when the spec changes), JSON merge patches with
//! resourceVersion preconditions (also on `/status`), GET and DELETE, 404/409 as `Status`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    version: u64,
    /// (method, path) of every request, in order.
    log: Vec<(String, String)>,
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    respond(code, &body)
}

fn respond(code: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

impl FakeApi {
    pub fn client(&self) -> kube::Client {
        let fake = self.clone();
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let fake = fake.clone();
            async move { Ok::<_, std::convert::Infallible>(fake.handle(req).await) }
        });
        kube::Client::new(service, "default")
    }

    /// Stores `object` at `path` as if created by a user: uid, generation 1, a resourceVersion.
    pub fn create(&self, path: &str, mut object: Value) {
        let mut s = self.state.lock().unwrap();
        s.version += 1;
        object["metadata"]["uid"] = json!(format!("uid-{}", s.version));
        object["metadata"]["generation"] = json!(1);
        object["metadata"]["resourceVersion"] = json!(s.version.to_string());
        object["metadata"]["creationTimestamp"] = json!("2026-11-23T00:00:00Z");
        s.objects.insert(path.to_string(), object);
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }

    /// Changes a stored object as another actor would (a user editing the spec, a controller
    /// writing status): merges `patch`, bumps the version, and the generation if the spec moved.
    pub fn edit(&self, path: &str, patch: Value) {
        let mut s = self.state.lock().unwrap();
        s.version += 1;
        let version = s.version;
        let o = s.objects.get_mut(path).expect("object to edit");
        let before = o["spec"].clone();
        merge(o, &patch);
        o["metadata"]["resourceVersion"] = json!(version.to_string());
        if o["spec"] != before {
            let g = o["metadata"]["generation"].as_i64().unwrap_or(0);
            o["metadata"]["generation"] = json!(g + 1);
        }
    }

    pub fn remove(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.remove(path)
    }

    /// Paths of every stored object under `prefix`.
    pub fn paths(&self, prefix: &str) -> Vec<String> {
        let s = self.state.lock().unwrap();
        s.objects
            .keys()
            .filter(|p| p.starts_with(prefix))
            .cloned()
            .collect()
    }

    pub fn requests(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().log.clone()
    }

    async fn handle(&self, req: Request<kube::client::Body>) -> Response<Full<Bytes>> {
        let method = req.method().as_str().to_string();
        let path = req.uri().path().to_string();
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let mut s = self.state.lock().unwrap();
        s.log.push((method.clone(), path.clone()));
        let (key, subresource_status) = match path.strip_suffix("/status") {
            Some(k) => (k.to_string(), true),
            None => (path.clone(), false),
        };
        match method.as_str() {
            "GET" => match s.objects.get(&key) {
                Some(o) => respond(StatusCode::OK, o),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{key} not found"),
                ),
            },
            "DELETE" => match s.objects.remove(&key) {
                Some(o) => respond(StatusCode::OK, &o),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{key} not found"),
                ),
            },
            "PATCH" => {
                let patch: Value = serde_json::from_slice(&body).unwrap();
                s.version += 1;
                let version = s.version;
                if content_type.starts_with("application/apply-patch") {
                    let mut object = patch;
                    let previous = s.objects.get(&key).cloned();
                    let generation = match &previous {
                        Some(p) if p["spec"] == object["spec"] => {
                            p["metadata"]["generation"].clone()
                        }
                        Some(p) => json!(p["metadata"]["generation"].as_i64().unwrap_or(0) + 1),
                        None => json!(1),
                    };
                    let uid = previous
                        .as_ref()
                        .map_or(json!(format!("uid-{version}")), |p| {
                            p["metadata"]["uid"].clone()
                        });
                    object["metadata"]["uid"] = uid;
                    object["metadata"]["generation"] = generation;
                    object["metadata"]["resourceVersion"] = json!(version.to_string());
                    if let Some(p) = previous
                        && !p["status"].is_null()
                    {
                        object["status"] = p["status"].clone();
                    }
                    s.objects.insert(key, object.clone());
                    return respond(StatusCode::OK, &object);
                }
                let Some(object) = s.objects.get_mut(&key) else {
                    return status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        &format!("{key} not found"),
                    );
                };
                if let Some(rv) = patch["metadata"]["resourceVersion"].as_str()
                    && Some(rv) != object["metadata"]["resourceVersion"].as_str()
                {
                    return status(
                        StatusCode::CONFLICT,
                        "Conflict",
                        "the object has been modified",
                    );
                }
                if subresource_status {
                    merge(&mut object["status"], &patch["status"]);
                } else {
                    let mut patch = patch;
                    if let Some(m) = patch["metadata"].as_object_mut() {
                        m.remove("resourceVersion");
                    }
                    merge(object, &patch);
                }
                object["metadata"]["resourceVersion"] = json!(version.to_string());
                let out = object.clone();
                // A deleted object whose last finalizer is gone goes away.
                if !out["metadata"]["deletionTimestamp"].is_null()
                    && out["metadata"]["finalizers"]
                        .as_array()
                        .is_none_or(|f| f.is_empty())
                {
                    s.objects.remove(&key);
                }
                respond(StatusCode::OK, &out)
            }
            other => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", other),
        }
    }
}
