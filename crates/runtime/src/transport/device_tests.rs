//! The device transports' protocols over real gRPC, with host-memory fakes for the device
//! (`device::fake`), and the start-up transport decision.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sluice_engine::Device;
use sluice_engine::cache::{RegionKind, RegionLayout};
use sluice_engine::{CacheLayout, CacheSnapshot};
use sluice_proto::worker::v1::cache_transfer_server::CacheTransferServer;
use tokio_util::sync::CancellationToken;

use super::device::fake::{ChannelFactory, FileIpc};
use super::device::{CommunicatorFactory, DeviceTransports, IpcMemory};
use super::nccl::{CommunicatorPool, PairComm};
use super::select::{TransportChoice, plan_with};
use super::*;
use crate::serve::serve;

const FINGERPRINT: u64 = 0x5eed;

fn layout(tokens: usize) -> CacheLayout {
    CacheLayout {
        tokens,
        regions: vec![
            RegionLayout {
                layer: 0,
                kind: RegionKind::RecurrentState,
                elements: 10,
            },
            RegionLayout {
                layer: 1,
                kind: RegionKind::Keys,
                elements: 3 * tokens,
            },
        ],
    }
}

/// A snapshot whose bytes say which transfer they belong to.
fn snapshot(tokens: usize, seed: u8) -> CacheSnapshot {
    let layout = layout(tokens);
    let regions = layout
        .regions
        .iter()
        .enumerate()
        .map(|(r, l)| {
            (0..l.elements * 4)
                .map(|i| seed.wrapping_mul(31).wrapping_add((i * 7 + r) as u8))
                .collect()
        })
        .collect();
    CacheSnapshot { layout, regions }
}

fn header(id: &str, fingerprint: u64, tokens: usize) -> TransferHeader {
    TransferHeader {
        transfer_id: id.into(),
        fingerprint,
        layout: layout(tokens),
        handoff: Handoff {
            first_token: 3,
            rng_state: 4,
        },
    }
}

/// A decode worker's receiving end on a loopback port.
struct Receiver {
    inbox: Arc<CacheInbox>,
    dest: Destination,
    stop: CancellationToken,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn receiver(name: &str, device: &DeviceTransports, communicators: usize) -> Receiver {
    let inbox = Arc::new(CacheInbox::new(FINGERPRINT, layout));
    let service = CacheTransferService::new(inbox.clone()).with_device(device, communicators);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let routes = tonic::service::Routes::new(CacheTransferServer::new(service));
    tokio::spawn(serve(listener, routes, stop.clone()));
    Receiver {
        inbox,
        dest: Destination {
            worker_id: crate::WorkerId::new(name).unwrap(),
            address,
        },
        stop,
    }
}

async fn arrived(r: &Receiver, id: &str) -> Arrival {
    r.inbox.take(id, Duration::from_secs(10)).await.unwrap()
}

fn ipc_device(dir: &std::path::Path) -> (Arc<FileIpc>, DeviceTransports) {
    let ipc = Arc::new(FileIpc::new(dir.to_path_buf()));
    let device = DeviceTransports {
        ipc: Some(ipc.clone() as Arc<dyn IpcMemory>),
        nccl: None,
    };
    (ipc, device)
}

#[tokio::test]
async fn cuda_ipc_moves_the_cache_and_frees_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let (ipc, device) = ipc_device(dir.path());
    let decode = receiver("decode-0", &device, 1).await;
    let sender = CudaIpcTransport::new(ipc.clone());
    for (n, tokens) in [(0u8, 5usize), (1, 1), (2, 33)] {
        let id = format!("t{n}");
        let sent = snapshot(tokens, n);
        let bytes = sender
            .push(&decode.dest, header(&id, FINGERPRINT, tokens), sent.clone())
            .await
            .unwrap();
        assert_eq!(bytes, sent.total_bytes() as u64);
        let got = arrived(&decode, &id).await;
        assert_eq!(got.snapshot, sent);
        assert_eq!((got.handoff.first_token, got.handoff.rng_state), (3, 4));
        assert_eq!(
            ipc.live(),
            0,
            "the exported buffer is freed once acknowledged"
        );
    }
}

#[tokio::test]
async fn cuda_ipc_refusals_map_nothing_and_free_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let (ipc, device) = ipc_device(dir.path());
    let decode = receiver("decode-0", &device, 1).await;
    let sender = CudaIpcTransport::new(ipc.clone());
    let err = sender
        .push(&decode.dest, header("other", 0xbad, 4), snapshot(4, 1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("fingerprint"), "{err}");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(ipc.live(), 0);
    assert_eq!(decode.inbox.staged(), 0);

    // A receiver that does not offer cuda-ipc says so, naming what it would need.
    let tcp_only = receiver("decode-1", &DeviceTransports::default(), 1).await;
    let err = sender
        .push(&tcp_only.dest, header("x", FINGERPRINT, 4), snapshot(4, 1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cuda-ipc"), "{err}");
    assert!(err.to_string().contains("--features cuda"), "{err}");
    assert_eq!(ipc.live(), 0);
}

fn nccl_device(factory: &Arc<ChannelFactory>) -> DeviceTransports {
    DeviceTransports {
        ipc: None,
        nccl: Some(factory.clone() as Arc<dyn CommunicatorFactory>),
    }
}

#[tokio::test]
async fn nccl_sets_up_one_communicator_per_pair_and_reuses_it() {
    let factory = Arc::new(ChannelFactory::default());
    let decode = receiver("decode-0", &nccl_device(&factory), 4).await;
    let sender = Arc::new(NcclTransport::new("prefill-0", factory.clone(), 4));
    sender.handshake(&decode.dest).await.unwrap();
    for n in 0..3u8 {
        let id = format!("t{n}");
        let sent = snapshot(2 + n as usize, n);
        sender
            .push(
                &decode.dest,
                header(&id, FINGERPRINT, 2 + n as usize),
                sent.clone(),
            )
            .await
            .unwrap();
        assert_eq!(arrived(&decode, &id).await.snapshot, sent);
    }
    assert_eq!(
        factory.joins.load(Ordering::Relaxed),
        2,
        "one communicator, two ranks"
    );
    assert_eq!(sender.communicators(), 1);

    // Concurrent pushes over the one communicator take turns: every cache arrives whole.
    let pushes = (10..18u8).map(|n| {
        let (sender, dest) = (sender.clone(), decode.dest.clone());
        tokio::spawn(async move {
            let sent = snapshot(n as usize, n);
            sender
                .push(
                    &dest,
                    header(&format!("c{n}"), FINGERPRINT, n as usize),
                    sent.clone(),
                )
                .await
                .unwrap();
            sent
        })
    });
    for (n, push) in (10..18u8).zip(pushes.collect::<Vec<_>>()) {
        let sent = push.await.unwrap();
        assert_eq!(arrived(&decode, &format!("c{n}")).await.snapshot, sent);
    }
    assert_eq!(factory.joins.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn nccl_refusal_sends_nothing_and_the_communicator_stays_usable() {
    let factory = Arc::new(ChannelFactory::default());
    let decode = receiver("decode-0", &nccl_device(&factory), 4).await;
    let sender = NcclTransport::new("prefill-0", factory.clone(), 4);
    let err = sender
        .push(&decode.dest, header("bad", 0xbad, 3), snapshot(3, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    // Had the refused bytes been sent, this transfer would receive them instead of its own.
    let sent = snapshot(3, 2);
    sender
        .push(&decode.dest, header("good", FINGERPRINT, 3), sent.clone())
        .await
        .unwrap();
    assert_eq!(arrived(&decode, "good").await.snapshot, sent);
    assert_eq!(decode.inbox.staged(), 0);

    let tcp_only = receiver("decode-1", &DeviceTransports::default(), 1).await;
    let err = sender.handshake(&tcp_only.dest).await.unwrap_err();
    assert!(err.to_string().contains("nccl"), "{err}");
}

#[tokio::test]
async fn nccl_pools_are_bounded_and_a_dropped_receiver_end_is_set_up_again() {
    let factory = Arc::new(ChannelFactory::default());
    let device = nccl_device(&factory);
    // Sender keeps one communicator: alternating receivers evict each other.
    let a = receiver("decode-a", &device, 4).await;
    let b = receiver("decode-b", &device, 4).await;
    let sender = NcclTransport::new("prefill-0", factory.clone(), 1);
    for (n, dest) in [&a, &b, &a].into_iter().enumerate() {
        let id = format!("s{n}");
        let sent = snapshot(4, n as u8);
        sender
            .push(&dest.dest, header(&id, FINGERPRINT, 4), sent.clone())
            .await
            .unwrap();
        assert_eq!(arrived(dest, &id).await.snapshot, sent);
        assert_eq!(sender.communicators(), 1);
    }
    assert_eq!(
        factory.joins.load(Ordering::Relaxed),
        6,
        "three communicators made"
    );

    // Receiver keeps one: two senders evict each other's receiving end; each push still
    // arrives (the sender is told to set up again, once).
    let c = receiver("decode-c", &device, 1).await;
    let p1 = NcclTransport::new("prefill-1", factory.clone(), 4);
    let p2 = NcclTransport::new("prefill-2", factory.clone(), 4);
    for (n, sender) in [&p1, &p2, &p1, &p2].into_iter().enumerate() {
        let id = format!("r{n}");
        let sent = snapshot(2, 40 + n as u8);
        sender
            .push(&c.dest, header(&id, FINGERPRINT, 2), sent.clone())
            .await
            .unwrap();
        assert_eq!(arrived(&c, &id).await.snapshot, sent);
    }
    assert_eq!(factory.joins.load(Ordering::Relaxed), 6 + 8);
}

/// A communicator that is never used.
struct Idle;

impl super::device::Communicator for Idle {
    fn send(&self, _: &[u8]) -> crate::Result<()> {
        unreachable!()
    }
    fn recv(&self, _: &mut [u8]) -> crate::Result<()> {
        unreachable!()
    }
}

#[test]
fn communicator_pool_evicts_the_least_recently_used() {
    let comm = || PairComm::new(Arc::new(Idle));
    let pool = CommunicatorPool::new(2);
    assert_eq!(pool.insert("a", comm()), None);
    std::thread::sleep(Duration::from_millis(2));
    assert_eq!(pool.insert("b", comm()), None);
    std::thread::sleep(Duration::from_millis(2));
    assert!(pool.get(&"a").is_some(), "touches a");
    assert_eq!(pool.insert("c", comm()), Some("b"));
    assert!(pool.get(&"b").is_none());
    assert_eq!(pool.len(), 2);
    assert_eq!(pool.insert("a", comm()), None, "replacing needs no room");
    assert_eq!(pool.len(), 2);
}

fn fake_device(ipc: bool, nccl: bool) -> DeviceTransports {
    DeviceTransports {
        ipc: ipc.then(|| Arc::new(FileIpc::new(std::env::temp_dir())) as Arc<dyn IpcMemory>),
        nccl: nccl.then(|| Arc::new(ChannelFactory::default()) as Arc<dyn CommunicatorFactory>),
    }
}

#[test]
fn transports_are_chosen_from_the_flag_the_device_and_the_build() {
    use TransportChoice::*;
    let never = |_: usize, _: bool, _: bool| -> crate::Result<DeviceTransports> {
        panic!("the device is not opened for this choice")
    };
    let kinds =
        |choice,
         device,
         built,
         open: &dyn Fn(usize, bool, bool) -> crate::Result<DeviceTransports>| {
            plan_with(choice, device, built, open).map(|p| p.kinds)
        };
    use TransportKind as K;
    assert_eq!(kinds(Tcp, Device::Cuda(0), true, &never).unwrap(), [K::Tcp]);
    assert_eq!(kinds(Auto, Device::Cpu, true, &never).unwrap(), [K::Tcp]);
    assert_eq!(
        kinds(Auto, Device::Cuda(0), false, &never).unwrap(),
        [K::Tcp]
    );

    let err = kinds(Nccl, Device::Cuda(0), false, &never)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--features cuda"), "{err}");
    let err = kinds(CudaIpc, Device::Cpu, true, &never)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--device cuda:N"), "{err}");

    let full = |ordinal: usize, ipc: bool, nccl: bool| {
        assert_eq!(ordinal, 2);
        Ok(fake_device(ipc, nccl))
    };
    assert_eq!(
        kinds(Auto, Device::Cuda(2), true, &full).unwrap(),
        [K::CudaIpc, K::Nccl, K::Tcp]
    );
    assert_eq!(
        kinds(CudaIpc, Device::Cuda(2), true, &full).unwrap(),
        [K::CudaIpc]
    );
    assert_eq!(
        kinds(Nccl, Device::Cuda(2), true, &full).unwrap(),
        [K::Nccl]
    );

    // NCCL's library missing: auto goes on without it; asked for explicitly, it fails.
    let no_nccl = |_: usize, ipc: bool, nccl: bool| {
        if nccl {
            Err(crate::RuntimeError::Device(
                "NCCL (libnccl.so) could not be loaded".into(),
            ))
        } else {
            Ok(fake_device(ipc, false))
        }
    };
    assert_eq!(
        kinds(Auto, Device::Cuda(2), true, &no_nccl).unwrap(),
        [K::CudaIpc, K::Tcp]
    );
    let err = kinds(Nccl, Device::Cuda(2), true, &no_nccl)
        .unwrap_err()
        .to_string();
    assert!(err.contains("libnccl"), "{err}");
    // No driver at all: auto falls back to tcp.
    let no_driver = |_: usize, _: bool, _: bool| -> crate::Result<DeviceTransports> {
        Err(crate::RuntimeError::Device("no CUDA driver".into()))
    };
    assert_eq!(
        kinds(Auto, Device::Cuda(0), true, &no_driver).unwrap(),
        [K::Tcp]
    );

    // The senders a prefill worker gets follow the plan.
    let plan = plan_with(Auto, Device::Cuda(2), true, full).unwrap();
    let senders: Vec<_> = plan.senders("p").iter().map(|t| t.kind()).collect();
    assert_eq!(senders, [K::CudaIpc, K::Nccl, K::Tcp]);
}
