//! Membership against a real etcd: registration, watch, a lost lease and its re-registration,
//! graceful revoke.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use sluice_harness::{Etcd, eventually};
use sluice_runtime::{
    EtcdMembership, ExpertPlacement, Membership, Role, TransportKind, WorkerDirectory, WorkerEvent,
    WorkerId, WorkerInfo,
};
use tokio_util::sync::CancellationToken;

fn info(id: &str) -> WorkerInfo {
    WorkerInfo {
        worker_id: WorkerId::new(id).unwrap(),
        role: Role::Decode,
        address: "http://127.0.0.1:1".into(),
        model_fingerprint: WorkerInfo::fingerprint_hex(7),
        model: "m".into(),
        capacity: 4,
        transports: vec![TransportKind::Tcp],
        node: String::new(),
        expert_shard: None,
    }
}

async fn next_event(events: &mut tokio::sync::mpsc::UnboundedReceiver<WorkerEvent>) -> WorkerEvent {
    tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("a membership event")
        .expect("the watch stays open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_kept_lost_re_registered_and_revoked() {
    let logs = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(logs.path());
    let endpoints = vec![etcd.url.clone()];
    let ttl = Duration::from_secs(3);
    let membership: Arc<dyn Membership> = Arc::new(
        EtcdMembership::connect(&endpoints, "lease-test", ttl)
            .await
            .unwrap(),
    );
    let stop = CancellationToken::new();
    let directory = WorkerDirectory::start(membership.clone(), stop.clone())
        .await
        .unwrap();

    let shutdown = CancellationToken::new();
    let registration = membership
        .register(info("d1"), shutdown.clone())
        .await
        .unwrap();
    assert!(registration.is_registered());
    let present = || {
        directory
            .workers(Role::Decode)
            .iter()
            .any(|w| w.worker_id.as_str() == "d1")
    };
    eventually(Duration::from_secs(5), "the watch to see d1", || async {
        present().then_some(())
    })
    .await;

    // Kept alive well past its TTL.
    tokio::time::sleep(ttl * 2).await;
    assert!(present() && registration.is_registered());

    // Someone revokes the lease (as an expiry would): the key is deleted, the worker notices it
    // is not registered, then puts itself back on a new lease. The gap can be shorter than any
    // poll, so the watch's events are the witness.
    let (_, mut events) = membership.watch_workers().await.unwrap();
    let mut admin = etcd_client::Client::connect(&endpoints, None)
        .await
        .unwrap();
    for lease in admin.leases().await.unwrap().leases() {
        admin.lease_revoke(lease.id()).await.unwrap();
    }
    match next_event(&mut events).await {
        WorkerEvent::Down(key) => assert_eq!(key.worker.as_str(), "d1"),
        other => panic!("expected d1 to go down, got {other:?}"),
    }
    match next_event(&mut events).await {
        WorkerEvent::Up(info) => assert_eq!(info.worker_id.as_str(), "d1"),
        other => panic!("expected d1 to come back, got {other:?}"),
    }
    eventually(
        Duration::from_secs(5),
        "the keeper to count the lost lease",
        || async { (registration.losses() == 1 && registration.is_registered()).then_some(()) },
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "d1 back in the directory",
        || async { present().then_some(()) },
    )
    .await;
    assert_eq!(registration.losses(), 1);

    // Graceful shutdown revokes at once: gone well before the TTL.
    shutdown.cancel();
    eventually(
        Duration::from_millis(1500), // well under the TTL: a revoke, not an expiry
        "the key to go on shutdown",
        || async { (!present()).then_some(()) },
    )
    .await;

    // The placement round-trips.
    let mut placement = ExpertPlacement {
        shards: 2,
        ..Default::default()
    };
    placement
        .assignments
        .insert(WorkerId::new("e0").unwrap(), 1);
    membership.put_placement(&placement).await.unwrap();
    assert_eq!(membership.placement().await.unwrap(), Some(placement));
    stop.cancel();
}

#[tokio::test]
async fn an_unreachable_etcd_is_a_clear_error() {
    let port = sluice_harness::free_port();
    let err = EtcdMembership::connect(
        &[format!("http://127.0.0.1:{port}")],
        "c",
        Duration::from_secs(2),
    )
    .await
    .err()
    .expect("no etcd listens there");
    assert!(err.to_string().contains(&port.to_string()), "{err}");
}
