//! etcd membership: each registration is a key on a lease kept alive by a dedicated OS thread
//! with its own runtime and etcd connection, so no amount of work on the service's runtime can
//! delay a keep-alive. A lost lease (expired, revoked, etcd unreachable past the TTL) flips the
//! registration to "not registered" until the key is back on a fresh lease.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{ExpertPlacement, Membership, Registration, WorkerEvent};
use crate::error::{Result, RuntimeError};
use crate::keys::{PlacementKey, WorkerKey};
use crate::worker_info::WorkerInfo;

#[derive(Clone)]
pub struct EtcdMembership {
    endpoints: Vec<String>,
    cluster: String,
    ttl: Duration,
    client: Client,
}

fn options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        // etcd refuses pings more often than every 5 s (it closes the connection).
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
}

impl EtcdMembership {
    /// Connects to `endpoints` (`http://host:port`; a bare `host:port` works too).
    pub async fn connect(endpoints: &[String], cluster: &str, ttl: Duration) -> Result<Self> {
        crate::keys::validate_cluster(cluster)?;
        if endpoints.is_empty() {
            return Err(RuntimeError::invalid("etcd", "no endpoints given"));
        }
        let client = Client::connect(endpoints, Some(options()))
            .await
            .map_err(|e| RuntimeError::Connect {
                address: endpoints.join(","),
                message: e.to_string(),
            })?;
        // Fail now, with the address in the message, rather than at the first registration.
        client
            .clone()
            .get(
                "/sluice/",
                Some(GetOptions::new().with_keys_only().with_limit(1)),
            )
            .await
            .map_err(|e| RuntimeError::Connect {
                address: endpoints.join(","),
                message: e.to_string(),
            })?;
        Ok(EtcdMembership {
            endpoints: endpoints.to_vec(),
            cluster: cluster.to_string(),
            ttl,
            client,
        })
    }
}

fn decode_worker(key: &str, value: &[u8]) -> Result<WorkerInfo> {
    serde_json::from_slice(value).map_err(|e| RuntimeError::MalformedRecord {
        key: key.to_string(),
        message: e.to_string(),
    })
}

#[async_trait]
impl Membership for EtcdMembership {
    async fn register(
        &self,
        info: WorkerInfo,
        shutdown: CancellationToken,
    ) -> Result<Registration> {
        let key = info.key(&self.cluster).to_string();
        let value = serde_json::to_vec(&info)
            .map_err(|e| RuntimeError::Internal(format!("encoding worker info: {e}")))?;
        let ttl = self.ttl;
        // Register once here so a worker that cannot reach etcd fails at start-up.
        let mut client = self.client.clone();
        let lease = grant_and_put(&mut client, &key, &value, ttl).await?;
        let (state_tx, state_rx) = watch::channel(true);
        let losses = Arc::new(AtomicU64::new(0));
        let lost = losses.clone();
        let endpoints = self.endpoints.clone();
        std::thread::Builder::new()
            .name("sluice-lease".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!("lease keeper cannot start a runtime: {e}");
                        let _ = state_tx.send(false);
                        return;
                    }
                };
                let keeper = LeaseKeeper {
                    endpoints,
                    key,
                    value,
                    ttl,
                    state: state_tx,
                    losses: lost,
                    shutdown,
                };
                runtime.block_on(keeper.keep_registered(lease));
            })?;
        Ok(Registration::new(state_rx, losses))
    }

    async fn watch_workers(
        &self,
    ) -> Result<(Vec<WorkerInfo>, mpsc::UnboundedReceiver<WorkerEvent>)> {
        let prefix = WorkerKey::prefix(&self.cluster);
        let mut client = self.client.clone();
        let resp = client
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut workers = Vec::new();
        for kv in resp.kvs() {
            let key = kv.key_str()?;
            match decode_worker(key, kv.value()) {
                Ok(info) => workers.push(info),
                Err(e) => tracing::warn!("ignoring {e}"),
            }
        }
        let mut stream = client
            .watch(
                prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let resp = tokio::select! {
                    r = stream.message() => r,
                    // Nobody listens any more.
                    () = tx.closed() => return,
                };
                let resp = match resp {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!("etcd watch broke: {e}");
                        return;
                    }
                };
                if resp.canceled() {
                    return;
                }
                for event in resp.events() {
                    let Some(kv) = event.kv() else { continue };
                    let Ok(key) = kv.key_str() else { continue };
                    let out = match event.event_type() {
                        EventType::Put => match decode_worker(key, kv.value()) {
                            Ok(info) => WorkerEvent::Up(info),
                            Err(e) => {
                                tracing::warn!("ignoring {e}");
                                continue;
                            }
                        },
                        EventType::Delete => match key.parse::<WorkerKey>() {
                            Ok(k) => WorkerEvent::Down(k),
                            Err(e) => {
                                tracing::warn!("ignoring {e}");
                                continue;
                            }
                        },
                    };
                    if tx.send(out).is_err() {
                        return;
                    }
                }
            }
        });
        Ok((workers, rx))
    }

    async fn placement(&self) -> Result<Option<ExpertPlacement>> {
        let key = PlacementKey {
            cluster: self.cluster.clone(),
        }
        .to_string();
        let resp = self.client.clone().get(key.as_str(), None).await?;
        resp.kvs()
            .first()
            .map(|kv| {
                serde_json::from_slice(kv.value()).map_err(|e| RuntimeError::MalformedRecord {
                    key: key.clone(),
                    message: e.to_string(),
                })
            })
            .transpose()
    }

    async fn put_placement(&self, placement: &ExpertPlacement) -> Result<()> {
        let key = PlacementKey {
            cluster: self.cluster.clone(),
        }
        .to_string();
        let value = serde_json::to_vec(placement)
            .map_err(|e| RuntimeError::Internal(format!("encoding placement: {e}")))?;
        self.client.clone().put(key, value, None).await?;
        Ok(())
    }
}

async fn grant_and_put(client: &mut Client, key: &str, value: &[u8], ttl: Duration) -> Result<i64> {
    let lease = client
        .lease_grant(ttl.as_secs().max(1) as i64, None)
        .await?
        .id();
    client
        .put(key, value, Some(PutOptions::new().with_lease(lease)))
        .await?;
    Ok(lease)
}

/// What the lease-keeper thread owns.
struct LeaseKeeper {
    endpoints: Vec<String>,
    key: String,
    value: Vec<u8>,
    ttl: Duration,
    state: watch::Sender<bool>,
    losses: Arc<AtomicU64>,
    shutdown: CancellationToken,
}

impl LeaseKeeper {
    /// Keeps `lease` alive every TTL/3; when it is lost, reports it and re-registers on a new
    /// lease (with a fresh connection) until that works; on shutdown revokes it.
    async fn keep_registered(self, mut lease: i64) {
        let LeaseKeeper {
            endpoints,
            key,
            value,
            ttl,
            state,
            losses,
            shutdown,
        } = self;
        let interval = (ttl / 3).max(Duration::from_millis(200));
        let mut client: Option<Client> = None;
        loop {
            // Connect (or reconnect) this thread's own client.
            let c = match &mut client {
                Some(c) => c,
                None => match Client::connect(&endpoints, Some(options())).await {
                    Ok(c) => client.insert(c),
                    Err(e) => {
                        tracing::warn!("lease keeper cannot reach etcd: {e}");
                        let _ = state.send(false);
                        if sleep_or_shutdown(interval, &shutdown).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            if lease == 0 {
                match grant_and_put(c, &key, &value, ttl).await {
                    Ok(id) => {
                        lease = id;
                        tracing::info!(%key, "re-registered on a new lease");
                    }
                    Err(e) => {
                        tracing::warn!(%key, "re-registration failed: {e}");
                        client = None;
                        if sleep_or_shutdown(interval, &shutdown).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            let _ = state.send(true);
            let outcome = keep_alive(c, lease, interval, &shutdown).await;
            match outcome {
                KeepAlive::Shutdown => {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(2), c.lease_revoke(lease)).await;
                    let _ = state.send(false);
                    return;
                }
                KeepAlive::Lost(reason) => {
                    tracing::warn!(%key, "membership lease lost ({reason}); serving on while re-registering");
                    losses.fetch_add(1, Ordering::Relaxed);
                    let _ = state.send(false);
                    lease = 0;
                    client = None;
                }
            }
        }
    }
}

enum KeepAlive {
    Shutdown,
    Lost(String),
}

async fn keep_alive(
    client: &mut Client,
    lease: i64,
    interval: Duration,
    shutdown: &CancellationToken,
) -> KeepAlive {
    let (mut keeper, mut responses) = match client.lease_keep_alive(lease).await {
        Ok(pair) => pair,
        Err(e) => return KeepAlive::Lost(e.to_string()),
    };
    loop {
        let round = async {
            keeper.keep_alive().await?;
            responses.message().await
        };
        match tokio::time::timeout(interval, round).await {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => {}
            Ok(Ok(Some(_))) => return KeepAlive::Lost("lease expired".into()),
            Ok(Ok(None)) => return KeepAlive::Lost("keep-alive stream closed".into()),
            Ok(Err(e)) => return KeepAlive::Lost(e.to_string()),
            Err(_) => return KeepAlive::Lost("keep-alive timed out".into()),
        }
        if sleep_or_shutdown(interval, shutdown).await {
            return KeepAlive::Shutdown;
        }
    }
}

/// True when `shutdown` fired first.
async fn sleep_or_shutdown(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        () = shutdown.cancelled() => true,
    }
}
