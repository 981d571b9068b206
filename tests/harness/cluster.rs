//! A whole cluster as separate processes against a real etcd: expert, prefill and decode
//! workers, and a router with its gRPC and HTTP ports.

use std::path::Path;
use std::time::Duration;

use sluice_client::Client;
use sluice_proto::worker::v1 as wpb;
use sluice_proto::worker::v1::router_status_client::RouterStatusClient;
use sluice_proto::worker::v1::worker_status_client::WorkerStatusClient;

use crate::{Etcd, Proc, eventually, free_port, service};

/// What to start; every flag list is appended to that role's command line.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub prefill: usize,
    pub decode: usize,
    pub experts: usize,
    /// Expert workers per shard.
    pub expert_replicas: usize,
    pub ttl: u64,
    /// Routers in front of the same workers (`router`, `router1`, ...).
    pub routers: usize,
    pub router_args: Vec<String>,
    pub decode_args: Vec<String>,
    pub prefill_args: Vec<String>,
    /// Appended to every process's command line.
    pub all_args: Vec<String>,
    /// Appended to one process's command line, by its name (`decode0`, `prefill1`, ...).
    pub process_args: Vec<(String, Vec<String>)>,
}

impl ClusterSpec {
    pub fn new(prefill: usize, decode: usize) -> Self {
        ClusterSpec {
            prefill,
            decode,
            experts: 0,
            expert_replicas: 1,
            ttl: 10,
            routers: 1,
            router_args: Vec::new(),
            decode_args: Vec::new(),
            prefill_args: Vec::new(),
            all_args: Vec::new(),
            process_args: Vec::new(),
        }
    }

    /// Flags for the one process called `name` (`decode0`, `prefill1`, ...).
    pub fn process_args(mut self, name: &str, args: &[&str]) -> Self {
        self.process_args.push((
            name.to_string(),
            args.iter().map(|s| s.to_string()).collect(),
        ));
        self
    }

    pub fn prefill_args(mut self, args: &[&str]) -> Self {
        self.prefill_args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    pub fn experts(mut self, n: usize) -> Self {
        self.experts = n;
        self
    }

    /// `replicas` expert workers for each of the shards: `expert{k}` hosts shard `k % shards`.
    pub fn expert_replicas(mut self, replicas: usize) -> Self {
        self.expert_replicas = replicas.max(1);
        self
    }

    pub fn ttl(mut self, ttl: u64) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn routers(mut self, n: usize) -> Self {
        self.routers = n.max(1);
        self
    }

    pub fn router_args(mut self, args: &[&str]) -> Self {
        self.router_args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    pub fn all_args(mut self, args: &[&str]) -> Self {
        self.all_args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    pub fn decode_args(mut self, args: &[&str]) -> Self {
        self.decode_args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Starts the processes (they register on their own; see [`Cluster::wait_ready`]).
    pub fn start(&self, model: &Path) -> Running {
        let logs = tempfile::tempdir().unwrap();
        let etcd = Etcd::start(logs.path());
        let mut procs = Vec::new();
        let mut metrics = Vec::new();
        let remote = if self.experts > 0 { "remote" } else { "local" };
        let mut spawn = |name: String, binary: &str, extra: &[String]| {
            let metrics_port = free_port();
            let mut cmd = service(binary, &etcd.url, model, free_port(), self.ttl);
            cmd.arg("--metrics-listen")
                .arg(format!("127.0.0.1:{metrics_port}"))
                .args(extra)
                .args(&self.all_args);
            for (_, args) in self.process_args.iter().filter(|(n, _)| *n == name) {
                cmd.args(args);
            }
            metrics.push((name.clone(), format!("http://127.0.0.1:{metrics_port}")));
            procs.push(Proc::spawn(&name, &mut cmd, logs.path()));
        };
        for i in 0..self.experts * self.expert_replicas {
            let args = vec![
                "--shard".to_string(),
                format!("{}/{}", i % self.experts, self.experts),
                "--threads".into(),
                "1".into(),
            ];
            spawn(format!("expert{i}"), "sluice-expert", &args);
        }
        let model_args = |extra: &[String]| {
            let mut a: Vec<String> = ["--experts", remote, "--threads", "1"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            a.extend(extra.iter().cloned());
            a
        };
        for i in 0..self.prefill {
            spawn(
                format!("prefill{i}"),
                "sluice-prefill",
                &model_args(&self.prefill_args),
            );
        }
        for i in 0..self.decode {
            spawn(
                format!("decode{i}"),
                "sluice-decode",
                &model_args(&self.decode_args),
            );
        }
        let mut routers = Vec::new();
        let mut https = Vec::new();
        let mut statuses = Vec::new();
        for i in 0..self.routers {
            let port = free_port();
            let http_port = free_port();
            let status_port = free_port();
            let mut cmd = service("sluice-router", &etcd.url, model, port, self.ttl);
            cmd.arg("--http-listen")
                .arg(format!("127.0.0.1:{http_port}"))
                .arg("--status-listen")
                .arg(format!("127.0.0.1:{status_port}"))
                .args(&self.router_args)
                .args(&self.all_args);
            let name = if i == 0 {
                "router".to_string()
            } else {
                format!("router{i}")
            };
            procs.push(Proc::spawn(&name, &mut cmd, logs.path()));
            routers.push(format!("http://127.0.0.1:{port}"));
            https.push(format!("127.0.0.1:{http_port}"));
            statuses.push(format!("http://127.0.0.1:{status_port}"));
        }
        Running {
            cluster: Cluster {
                router: routers[0].clone(),
                http: https[0].clone(),
                routers,
                router_status: statuses,
                metrics,
                procs,
            },
            _logs: logs,
            etcd,
        }
    }
}

pub struct Cluster {
    /// The router's gRPC endpoint.
    pub router: String,
    /// The router's HTTP address (host:port).
    pub http: String,
    /// Every router's gRPC endpoint (the first is `router`).
    pub routers: Vec<String>,
    /// Every router's internal `RouterStatus` endpoint, in the order of `routers`.
    pub router_status: Vec<String>,
    /// Each worker's `/metrics` base URL, by process name.
    pub metrics: Vec<(String, String)>,
    pub procs: Vec<Proc>,
}

/// etcd must outlive the processes; `etcd` is declared last so it drops last.
pub struct Running {
    pub cluster: Cluster,
    _logs: tempfile::TempDir,
    pub etcd: Etcd,
}

impl Cluster {
    /// The process called `name` (`router`, `decode0`, `prefill1`, `expert0`, ...).
    pub fn proc_mut(&mut self, name: &str) -> &mut Proc {
        self.procs
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process called {name}"))
    }

    pub async fn workers(&self) -> Option<Vec<wpb::WorkerView>> {
        Self::workers_at(&self.router_status[0]).await
    }

    /// The workers the router whose status service is at `endpoint` schedules on.
    pub async fn workers_at(endpoint: &str) -> Option<Vec<wpb::WorkerView>> {
        let mut c = RouterStatusClient::connect(endpoint.to_string())
            .await
            .ok()?;
        Some(
            c.workers(wpb::WorkersRequest {})
                .await
                .ok()?
                .into_inner()
                .workers,
        )
    }

    /// Waits until every router sees `n` workers, each with a load report where it has one;
    /// the first router's view.
    pub async fn wait_ready(&self, n: usize) -> Vec<wpb::WorkerView> {
        eventually(
            Duration::from_secs(60),
            "every worker registered",
            || async {
                let mut first = None;
                for endpoint in &self.router_status {
                    let w = Self::workers_at(endpoint).await?;
                    let reported = w
                        .iter()
                        .filter(|v| v.role == "expert" || v.load.is_some())
                        .count();
                    if w.len() != n || reported != n {
                        return None;
                    }
                    first.get_or_insert(w);
                }
                first
            },
        )
        .await
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.router).await.unwrap()
    }

    /// Waits until every prefill and decode worker reports no sequence and no KV block held.
    pub async fn wait_idle(&self) {
        eventually(
            Duration::from_secs(20),
            "every worker to report no sequence and no KV block",
            || async {
                let workers = self.workers().await?;
                for w in workers.iter().filter(|w| w.role != "expert") {
                    let l = load_of(&w.address).await;
                    if l.running + l.waiting + l.kv_blocks_used > 0 {
                        return None;
                    }
                }
                Some(())
            },
        )
        .await
    }
}

pub async fn load_of(address: &str) -> wpb::LoadReport {
    let mut c = WorkerStatusClient::connect(address.to_string())
        .await
        .unwrap();
    c.load(wpb::LoadRequest {}).await.unwrap().into_inner()
}

/// The services the server at `endpoint` lists through gRPC reflection (v1), sorted: what
/// `grpcurl list` shows.
pub async fn reflected_services(endpoint: &str) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = match c.server_reflection_info(tokio_stream::once(request)).await {
        Ok(r) => r.into_inner(),
        // `--no-reflection`: the server lists nothing.
        Err(s) if s.code() == tonic::Code::Unimplemented => return Vec::new(),
        Err(s) => panic!("{endpoint}: reflection: {s}"),
    };
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("{endpoint}: not a service list: {response:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    names
}
