//! The router's view of the workers: the membership directory plus, per worker, a gRPC
//! channel, the requests this router has in flight on it, its latest load report (polled)
//! and whether it is ejected. Scheduling policies pick from the workers not ejected (all of
//! them when every one is); the default is least-loaded.
//!
//! Ejection is how a dead worker stops receiving requests before its lease expires: a call
//! that breaks at the connection ejects its worker at once; consecutive failed requests, or
//! load polls that cannot connect, eject it too (a poll that is only slow makes its report
//! stale instead). An ejected worker comes back once its back-off has passed and a load poll
//! has answered since; the back-off doubles with each ejection in a row, so a worker that
//! answers polls but fails every request is tried ever more rarely.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sluice_proto::worker::v1 as pb;
use sluice_proto::worker::v1::worker_status_client::WorkerStatusClient;
use sluice_runtime::serve::connect_lazy;
use sluice_runtime::{Role, TransportKind, WorkerDirectory, WorkerId, WorkerInfo};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::error::RouterError;

/// Consecutive failed requests that eject a worker.
const FAILURES_TO_EJECT: u32 = 3;
/// An ejected worker's first back-off; it doubles per ejection in a row, up to the maximum.
const EJECT_BACKOFF: Duration = Duration::from_secs(1);
const EJECT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How one call to a worker went, as far as routing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// It answered (a token, a prefill, a load report).
    Answered,
    /// The connection failed or broke: the process is gone or unreachable.
    Unreachable,
    /// It answered with a failure of its own (internal error, a stall, a broken stream).
    Failed,
}

#[derive(Debug, Default)]
struct Health {
    failed_requests: u32,
    failed_polls: u32,
    /// Ejections in a row (back-off exponent); reset by an answered request.
    ejections: u32,
    /// Since when, for how long at least, and why.
    ejected: Option<(Instant, Duration, &'static str)>,
    /// A load poll answered after the ejection.
    polled_since: bool,
}

impl Health {
    fn eject(&mut self, why: &'static str) -> bool {
        if self.ejected.is_some() {
            return false;
        }
        let backoff = EJECT_BACKOFF
            .saturating_mul(1 << self.ejections.min(5))
            .min(EJECT_BACKOFF_MAX);
        self.ejections += 1;
        self.ejected = Some((Instant::now(), backoff, why));
        self.polled_since = false;
        true
    }

    fn accepting(&mut self) -> bool {
        match self.ejected {
            None => true,
            Some((at, backoff, _)) if self.polled_since && at.elapsed() >= backoff => {
                self.ejected = None;
                self.failed_requests = 0;
                self.failed_polls = 0;
                true
            }
            Some(_) => false,
        }
    }
}

pub struct WorkerState {
    pub info: WorkerInfo,
    pub channel: Channel,
    in_flight: AtomicUsize,
    /// The latest load report, when it came, and when its poll was sent.
    load: Mutex<Option<Report>>,
    /// Requests this router sent here lately, with their work (tokens): those sent after
    /// the latest report's poll are not in it yet.
    sent: Mutex<VecDeque<(Instant, usize)>>,
    health: Mutex<Health>,
}

struct Report {
    report: pb::LoadReport,
    at: Instant,
    asked: Instant,
}

/// Requests sent to a worker since its latest load report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unreported {
    pub requests: usize,
    /// Their work: output tokens (decode) or prompt tokens (prefill).
    pub tokens: usize,
}

/// How one load poll went.
enum Poll {
    /// The report, and when its poll was sent.
    Answered(pb::LoadReport, Instant),
    /// No answer within [`POLL_TIMEOUT`]: the worker may just be busy.
    Slow,
    /// The connection failed.
    Unreachable,
}

/// A load report older than this is stale: the worker's load is unknown.
const STALE_REPORT: Duration = Duration::from_secs(3);
/// A load poll not answered within this is slow (the worker may just be busy).
const POLL_TIMEOUT: Duration = Duration::from_millis(500);

/// What a request asks of the workers it is sent to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Work {
    pub prompt_tokens: usize,
    pub output_tokens: usize,
}

impl WorkerState {
    fn new(info: WorkerInfo, channel: Channel) -> Self {
        WorkerState {
            info,
            channel,
            in_flight: AtomicUsize::new(0),
            load: Mutex::new(None),
            sent: Mutex::new(VecDeque::new()),
            health: Mutex::new(Health::default()),
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records how a request's call to this worker went; true when that ejected it.
    pub fn record(&self, outcome: CallOutcome) -> bool {
        let mut h = self.health();
        let ejected = match outcome {
            CallOutcome::Answered => {
                h.failed_requests = 0;
                h.ejections = 0;
                false
            }
            CallOutcome::Unreachable => h.eject("connection failed"),
            CallOutcome::Failed => {
                h.failed_requests += 1;
                h.failed_requests >= FAILURES_TO_EJECT && h.eject("consecutive failures")
            }
        };
        if ejected {
            tracing::warn!(worker = %self.info.worker_id, role = %self.info.role, ?outcome, "worker ejected from routing");
        }
        ejected
    }

    /// Records a load poll: an answer lets an ejected worker back after its back-off; two
    /// polls in a row whose connection failed eject it. A poll that only took too long (a
    /// busy or starved process) ejects nothing, but leaves the last report stale, and a
    /// stale report is never read as idle ([`WorkerState::reported_load`]).
    fn record_poll(&self, poll: Poll) -> bool {
        let mut h = self.health();
        match poll {
            Poll::Answered(report, asked) => {
                *self.load.lock().unwrap_or_else(PoisonError::into_inner) = Some(Report {
                    report,
                    at: Instant::now(),
                    asked,
                });
                // What was sent before this poll is in the report (or finished).
                self.sent
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .retain(|(at, _)| *at >= asked);
                h.failed_polls = 0;
                h.polled_since = true;
                false
            }
            Poll::Slow => false,
            Poll::Unreachable => {
                h.failed_polls += 1;
                let ejected = h.failed_polls >= 2 && h.eject("load polls cannot connect");
                if ejected {
                    tracing::warn!(worker = %self.info.worker_id, role = %self.info.role, "worker ejected from routing: load polls cannot connect");
                }
                ejected
            }
        }
    }

    /// Requests the worker last reported (running + waiting), or `None` when it has not
    /// answered a poll for [`STALE_REPORT`]: then nobody knows, and "least loaded" ranks it
    /// after every worker whose load is known.
    pub fn reported_load(&self) -> Option<usize> {
        let load = self.load.lock().unwrap_or_else(PoisonError::into_inner);
        match &*load {
            Some(r) if r.at.elapsed() <= STALE_REPORT => {
                Some((r.report.running + r.report.waiting) as usize)
            }
            Some(_) => None,
            // Not polled yet: a worker that just joined is idle.
            None => Some(0),
        }
    }

    /// The latest load report unless it is stale, and the requests sent here since its poll.
    pub fn fresh_report(&self) -> (Option<pb::LoadReport>, Unreported) {
        let report = self
            .load
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .filter(|r| r.at.elapsed() <= STALE_REPORT)
            .map(|r| (r.report.clone(), r.asked));
        let sent = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        let since = report.as_ref().map(|(_, asked)| *asked);
        let mut unreported = Unreported::default();
        for (at, tokens) in sent.iter() {
            if since.is_none_or(|asked| *at >= asked) {
                unreported.requests += 1;
                unreported.tokens += tokens;
            }
        }
        (report.map(|(r, _)| r), unreported)
    }

    /// Notes a request sent here with `tokens` of work.
    fn sent(&self, tokens: usize) {
        let mut sent = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        // Without answered polls nothing would ever leave: keep the last few seconds.
        while sent
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > STALE_REPORT)
        {
            sent.pop_front();
        }
        sent.push_back((now, tokens));
    }

    /// Why the worker is out of routing now, if it is.
    pub fn ejected(&self) -> Option<&'static str> {
        let mut h = self.health();
        if h.accepting() {
            None
        } else {
            h.ejected.map(|(_, _, why)| why)
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn load(&self) -> Option<pb::LoadReport> {
        self.load
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|r| r.report.clone())
    }

    /// False while the worker is ejected. (A worker whose lease is lost serves on: during an
    /// etcd outage the routers route on the membership they last saw.)
    pub fn accepting(&self) -> bool {
        self.health().accepting()
    }
}

/// Counts a request against a worker while alive.
pub struct Assignment(Arc<WorkerState>);

impl Assignment {
    /// A request of `tokens` work (output tokens to decode, or prompt tokens to prefill).
    pub fn new(state: Arc<WorkerState>, tokens: usize) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        state.sent(tokens);
        Assignment(state)
    }

    pub fn worker(&self) -> &Arc<WorkerState> {
        &self.0
    }
}

impl Drop for Assignment {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Picks one of `candidates` (all of the same role, all able to take the request).
pub trait SchedulingPolicy: Send + Sync {
    fn pick(&self, role: Role, candidates: &[Arc<WorkerState>]) -> Option<usize>;
}

/// Fewest requests: the larger of what this router has in flight there and what the worker
/// last reported (other routers' requests included), workers whose load is unknown (stale
/// report) after all others; ties go to the lower worker id.
pub struct LeastLoaded;

impl SchedulingPolicy for LeastLoaded {
    fn pick(&self, _role: Role, candidates: &[Arc<WorkerState>]) -> Option<usize> {
        // A worker whose load is unknown (stale report) comes after every worker whose load
        // is known.
        let score = |w: &Arc<WorkerState>| match w.reported_load() {
            Some(reported) => (false, w.in_flight().max(reported)),
            None => (true, w.in_flight()),
        };
        (0..candidates.len())
            .min_by_key(|&i| (score(&candidates[i]), candidates[i].info.worker_id.clone()))
    }
}

/// Cache transports in order of preference.
const TRANSPORT_PREFERENCE: [TransportKind; 4] = [
    TransportKind::InProcess,
    TransportKind::CudaIpc,
    TransportKind::Nccl,
    TransportKind::Tcp,
];

pub struct WorkerPool {
    directory: Arc<WorkerDirectory>,
    states: Mutex<HashMap<WorkerId, Arc<WorkerState>>>,
    policy: Box<dyn SchedulingPolicy>,
}

/// A prefill and a decode worker that can work together, and how the cache will move.
pub struct Pair {
    pub prefill: Assignment,
    pub decode: Assignment,
    pub transport: TransportKind,
}

impl WorkerPool {
    pub fn new(directory: Arc<WorkerDirectory>, policy: Box<dyn SchedulingPolicy>) -> Arc<Self> {
        Arc::new(WorkerPool {
            directory,
            states: Mutex::new(HashMap::new()),
            policy,
        })
    }

    /// Current workers of `role` (those whose key disappeared are gone from here at once).
    pub fn workers(&self, role: Role) -> Vec<Arc<WorkerState>> {
        let infos = self.directory.workers(role);
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        infos
            .into_iter()
            .filter_map(|info| {
                if let Some(s) = states.get(&info.worker_id)
                    && s.info == info
                {
                    return Some(s.clone());
                }
                let channel = match connect_lazy(&info.address) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(worker = %info.worker_id, "unusable address: {e}");
                        return None;
                    }
                };
                let state = Arc::new(WorkerState::new(info.clone(), channel));
                states.insert(info.worker_id, state.clone());
                Some(state)
            })
            .collect()
    }

    /// Chooses a decode worker alone (for prompts it prefills itself), none of `excluded`,
    /// for a request of `work`.
    pub fn pick_decode(
        &self,
        excluded: &[WorkerId],
        work: Work,
    ) -> Result<Assignment, RouterError> {
        self.choose_decode(excluded)
            .map(|d| Assignment::new(d, work.output_tokens))
    }

    /// The workers of `role` a request may use: not in `excluded` and matching `fits`; those
    /// not ejected if there are any, else the ejected ones too — ejection is a guess about a
    /// worker's health that steers requests elsewhere, never the reason one fails (a dead
    /// worker refuses the connection at once, and the request moves on).
    pub(crate) fn candidates(
        &self,
        role: Role,
        excluded: &[WorkerId],
        fits: impl Fn(&WorkerState) -> bool,
    ) -> Vec<Arc<WorkerState>> {
        let usable: Vec<_> = self
            .workers(role)
            .into_iter()
            .filter(|w| !excluded.contains(&w.info.worker_id) && fits(w))
            .collect();
        if usable.iter().any(|w| w.accepting()) {
            usable.into_iter().filter(|w| w.accepting()).collect()
        } else {
            usable
        }
    }

    fn choose_decode(&self, excluded: &[WorkerId]) -> Result<Arc<WorkerState>, RouterError> {
        let decodes = self.candidates(Role::Decode, excluded, |_| true);
        let d = self
            .policy
            .pick(Role::Decode, &decodes)
            .ok_or(RouterError::NoWorker("decode"))?;
        Ok(decodes[d].clone())
    }

    /// Chooses a decode worker, then a prefill worker of the same model sharing a transport;
    /// none of `excluded`; for a request of `work`.
    pub fn pick_pair(&self, excluded: &[WorkerId], work: Work) -> Result<Pair, RouterError> {
        let decode = self.choose_decode(excluded)?;
        let prefills = self.candidates(Role::Prefill, excluded, |p| {
            p.info.model_fingerprint == decode.info.model_fingerprint
                && shared_transport(&p.info, &decode.info).is_some()
        });
        let p = self
            .policy
            .pick(Role::Prefill, &prefills)
            .ok_or(RouterError::NoWorker(
                "prefill (of the decode worker's model, sharing a transport)",
            ))?;
        let prefill = prefills[p].clone();
        let transport = shared_transport(&prefill.info, &decode.info).unwrap_or(TransportKind::Tcp);
        Ok(Pair {
            prefill: Assignment::new(prefill, work.prompt_tokens),
            decode: Assignment::new(decode, work.output_tokens),
            transport,
        })
    }

    /// Polls every prefill and decode worker's load report every `period` until `shutdown`;
    /// `ejected` is called for each worker a poll ejects.
    pub fn poll_loads(
        self: &Arc<Self>,
        period: Duration,
        shutdown: CancellationToken,
        ejected: impl Fn(&WorkerState) + Send + Sync + 'static,
    ) {
        let pool = self.clone();
        tokio::spawn(async move {
            loop {
                let workers: Vec<_> = [Role::Prefill, Role::Decode]
                    .into_iter()
                    .flat_map(|r| pool.workers(r))
                    .collect();
                let ejected = &ejected;
                let polls = workers.iter().map(|w| async move {
                    let mut client = WorkerStatusClient::new(w.channel.clone());
                    let asked = Instant::now();
                    let report =
                        tokio::time::timeout(POLL_TIMEOUT, client.load(pb::LoadRequest {})).await;
                    let poll = match report {
                        Ok(Ok(r)) => Poll::Answered(r.into_inner(), asked),
                        Ok(Err(status)) if std::error::Error::source(&status).is_some() => {
                            Poll::Unreachable
                        }
                        _ => Poll::Slow,
                    };
                    if w.record_poll(poll) {
                        ejected(w);
                    }
                });
                futures::future::join_all(polls).await;
                pool.prune();
                tokio::select! {
                    () = tokio::time::sleep(period) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        });
    }

    /// Requests the decode workers can hold: each one's slots plus its waiting room, as
    /// reported (before its first report: twice the slots in its membership record).
    pub fn decode_room(&self) -> usize {
        self.workers(Role::Decode)
            .iter()
            .map(|w| match w.fresh_report().0 {
                Some(r) if r.capacity > 0 => (r.capacity + r.max_waiting) as usize,
                _ => 2 * w.info.capacity.max(1),
            })
            .sum::<usize>()
            .max(1)
    }

    /// Forgets workers no longer in the directory.
    fn prune(&self) {
        let live: Vec<WorkerId> = self
            .directory
            .all()
            .into_iter()
            .map(|w| w.worker_id)
            .collect();
        self.states
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|id, _| live.contains(id));
    }

    pub fn views(&self) -> Vec<pb::WorkerView> {
        Role::ALL
            .into_iter()
            .flat_map(|r| self.workers(r))
            .map(|w| pb::WorkerView {
                worker_id: w.info.worker_id.to_string(),
                role: w.info.role.to_string(),
                address: w.info.address.clone(),
                in_flight: w.in_flight() as u32,
                load: w.load(),
                ejected: w.ejected().unwrap_or_default().to_string(),
                model_fingerprint: w.info.model_fingerprint.clone(),
            })
            .collect()
    }

    pub fn directory(&self) -> &Arc<WorkerDirectory> {
        &self.directory
    }
}

fn shared_transport(prefill: &WorkerInfo, decode: &WorkerInfo) -> Option<TransportKind> {
    prefill.shared_transport(decode, &TRANSPORT_PREFERENCE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Moves an ejection's start `by` into the past, as if that much time had passed.
    fn age(h: &mut Health, by: Duration) {
        if let Some((at, backoff, why)) = h.ejected {
            h.ejected = Some((at - by, backoff, why));
        }
    }

    #[test]
    fn an_ejected_worker_comes_back_only_after_its_backoff_and_an_answered_poll() {
        let mut h = Health::default();
        assert!(h.accepting());
        assert!(h.eject("connection failed"));
        assert!(!h.eject("again"), "an ejected worker is not ejected twice");
        assert!(!h.accepting());
        // The back-off has passed, but no poll has answered since.
        age(&mut h, EJECT_BACKOFF);
        assert!(!h.accepting());
        h.polled_since = true;
        assert!(h.accepting());
        // The next ejection in a row waits twice as long.
        assert!(h.eject("connection failed"));
        h.polled_since = true;
        age(&mut h, EJECT_BACKOFF);
        assert!(!h.accepting());
        age(&mut h, EJECT_BACKOFF);
        assert!(h.accepting());
    }

    #[tokio::test]
    async fn requests_sent_after_a_reports_poll_count_until_the_next_report() {
        let info = WorkerInfo {
            worker_id: WorkerId::new("d0").unwrap(),
            role: Role::Decode,
            address: "http://127.0.0.1:1".into(),
            model_fingerprint: String::new(),
            model: "m".into(),
            capacity: 4,
            transports: vec![TransportKind::Tcp],
            node: "n".into(),
            expert_shard: None,
        };
        let w = WorkerState::new(info, connect_lazy("http://127.0.0.1:1").unwrap());
        // No report yet: everything sent counts.
        w.sent(5);
        let asked = Instant::now();
        w.sent(7);
        let (report, unreported) = w.fresh_report();
        assert!(report.is_none());
        assert_eq!(
            unreported,
            Unreported {
                requests: 2,
                tokens: 12
            }
        );
        // The report whose poll was sent at `asked` counts the first; the second is still
        // this router's to add.
        let load = pb::LoadReport {
            running: 1,
            ..Default::default()
        };
        w.record_poll(Poll::Answered(load, asked));
        let (report, unreported) = w.fresh_report();
        assert_eq!(report.map(|r| r.running), Some(1));
        assert_eq!(
            unreported,
            Unreported {
                requests: 1,
                tokens: 7
            }
        );
        w.record_poll(Poll::Answered(pb::LoadReport::default(), Instant::now()));
        assert_eq!(w.fresh_report().1, Unreported::default());
    }

    #[test]
    fn the_backoff_stops_growing_at_its_maximum() {
        let mut h = Health {
            ejections: 40,
            ..Health::default()
        };
        assert!(h.eject("consecutive failures"));
        assert_eq!(h.ejected.map(|(_, b, _)| b), Some(EJECT_BACKOFF_MAX));
    }
}
