//! The decode worker's engine loop: continuous batching over a paged KV budget.
//!
//! Every step runs one forward over all running sequences: one token for each decoding
//! sequence and the next prompt chunk of each sequence prefilled here (conditional
//! disaggregation, or recomputation after preemption). Blocks are reserved before the step;
//! when they run out, the newest sequence is preempted — its cache lease dropped — and waits to
//! be recomputed. Recomputation feeds the prompt in the same chunks as a prefill worker and
//! the generated tokens one per step, as they were first computed, so a resumed sequence
//! continues with exactly the tokens it would have produced without preemption.

use std::sync::Arc;

use sluice_engine::{
    CacheSnapshot, EngineError, LanguageModel, LogitsMode, ModelCache, PrefillPlan, Sampled,
    SeqChunk, SeqLease,
};
use sluice_proto::v1::FinishReason;
use sluice_proto::worker::v1 as pb;
use sluice_runtime::AttemptKey;
use sluice_runtime::error::engine_status;
use sluice_runtime::estimate::{CostModel, DecodeQueue, StepCost};
use sluice_runtime::grammar::GuidedSampler;
use sluice_runtime::sampling::{FinishRule, token_logprobs};
use sluice_runtime::status::LoadCounters;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::metrics::DecodeMetrics;

pub type ChunkSender = mpsc::UnboundedSender<Result<pb::TokenChunk, Status>>;

/// A sequence handed to the engine: adopted from a pushed cache, or to prefill here.
pub struct NewSequence {
    /// The router's key for this attempt: what `Abort` names.
    pub key: AttemptKey,
    pub prompt: Vec<u32>,
    pub sampler: GuidedSampler,
    /// The prefill worker's first token and cache; `None` to prefill here.
    pub adopted: Option<(u32, CacheSnapshot)>,
    /// Prefilled here only: tokens generated before a migration, recomputed after the prompt
    /// one per step (as first computed) and never sent again.
    pub generated: Vec<u32>,
    pub max_new_tokens: usize,
    /// Where the sequence ends (stop tokens, end-of-sequence, its budget).
    pub finish: FinishRule,
    pub logprobs: bool,
    /// A sequence prefilled here that has sent nothing yet is shed unrun if it has not
    /// started by then.
    pub shed_at: Option<std::time::Instant>,
    pub tx: ChunkSender,
}

pub enum Command {
    Start(Box<NewSequence>),
    Abort {
        key: AttemptKey,
        reply: oneshot::Sender<bool>,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct SchedulerLimits {
    /// Tokens fed to one forward (decode tokens always fit; prompt chunks fill the rest).
    pub max_batch_tokens: usize,
    /// Prompt chunk size; equal to the prefill workers' so both paths compute alike.
    pub prefill_chunk: usize,
}

struct Sequence {
    key: AttemptKey,
    /// Admission order: the newest (largest) is preempted first, the oldest resumed first.
    order: u64,
    /// Prompt, then every generated token.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Leading tokens of `tokens` whose state is in the cache.
    cached: usize,
    /// `None` while waiting (not started, or preempted).
    lease: Option<SeqLease>,
    /// A pushed cache not imported yet (no room when it came).
    pending: Option<CacheSnapshot>,
    sampler: GuidedSampler,
    remaining: usize,
    finish: FinishRule,
    logprobs: bool,
    /// Until it first starts: when it is shed if still waiting.
    shed_at: Option<std::time::Instant>,
    tx: ChunkSender,
}

impl Sequence {
    /// Tokens this sequence feeds to the next step: the rest of its current prompt chunk, or
    /// the one token after its cached ones.
    fn feed(&self, plan: PrefillPlan) -> std::ops::Range<usize> {
        if self.cached < self.prompt_len {
            plan.next(self.cached, self.prompt_len)
        } else {
            self.cached..self.cached + 1
        }
    }

    /// Steps until this sequence finishes if nothing preempts it: prompt chunks and generated
    /// tokens still to (re)compute, then one step per token still to generate.
    fn steps_left(&self, plan: PrefillPlan) -> usize {
        if self.pending.is_some() {
            return self.remaining;
        }
        let prompt = plan.steps_left(self.cached, self.prompt_len);
        let recompute = self
            .tokens
            .len()
            .saturating_sub(self.cached.max(self.prompt_len))
            .saturating_sub(1);
        prompt + recompute + self.remaining
    }

    /// Tokens the cache holds once this sequence is running again.
    fn resume_tokens(&self) -> usize {
        self.pending
            .as_ref()
            .map_or(self.tokens.len(), |s| s.layout.tokens + 1)
    }
}

pub struct Scheduler {
    model: Arc<dyn LanguageModel>,
    cache: ModelCache,
    limits: SchedulerLimits,
    /// Running sequences, oldest first.
    running: Vec<Sequence>,
    /// Waiting sequences, oldest first.
    waiting: Vec<Sequence>,
    next_order: u64,
    counters: Arc<LoadCounters>,
    metrics: Arc<DecodeMetrics>,
    /// The last step's logits, `[sequences fed, vocab]`; kept so steps reuse the buffer.
    logits: Vec<f32>,
    /// Measured cost of a step, for the start-delay estimate in the load report.
    cost: StepCost,
    /// Sequences waiting outside the engine (calls whose cache has not come yet).
    extra_waiting: Box<dyn Fn() -> usize + Send>,
}

impl Scheduler {
    pub fn new(
        model: Arc<dyn LanguageModel>,
        cache: ModelCache,
        limits: SchedulerLimits,
        counters: Arc<LoadCounters>,
        metrics: Arc<DecodeMetrics>,
        extra_waiting: Box<dyn Fn() -> usize + Send>,
    ) -> Self {
        LoadCounters::set(&counters.kv_blocks_total, cache.config().num_blocks);
        Scheduler {
            model,
            cache,
            limits: SchedulerLimits {
                max_batch_tokens: limits.max_batch_tokens.max(1),
                prefill_chunk: limits.prefill_chunk.max(1),
            },
            running: Vec::new(),
            waiting: Vec::new(),
            next_order: 0,
            counters,
            metrics,
            logits: Vec::new(),
            cost: StepCost::default(),
            extra_waiting,
        }
    }

    pub fn run(&mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.blocking_recv() {
                    Some(cmd) => self.handle(cmd),
                    None => return,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.handle(cmd);
            }
            // Sequences whose caller went away are dropped (and so freed) before the step.
            for list in [&mut self.running, &mut self.waiting] {
                list.retain(|s| {
                    let open = !s.tx.is_closed();
                    if !open {
                        tracing::debug!(request = %s.key, "caller went away; sequence freed");
                    }
                    open
                });
            }
            self.cache.reclaim();
            self.shed_expired();
            self.admit_waiting();
            self.publish_load();
            if !self.running.is_empty() {
                self.step();
                self.cache.reclaim();
                self.publish_load();
            }
        }
    }

    fn publish_load(&self) {
        let c = &self.counters;
        LoadCounters::set(&c.running, self.running.len());
        LoadCounters::set(&c.waiting, self.waiting.len());
        let total = self.cache.config().num_blocks;
        LoadCounters::set(&c.kv_blocks_used, total - self.cache.free_blocks());
        self.metrics.publish(
            self.running.len(),
            self.waiting.len(),
            total - self.cache.free_blocks(),
            total,
        );
        c.set_start_delay(self.start_delay());
    }

    /// How long a sequence arriving now would wait for a slot: the running ones finish at
    /// their remaining steps, the waiting ones (and those whose cache is still on its way,
    /// counted at the mean length) take the slots first, each step at the measured cost of
    /// a full batch.
    fn start_delay(&self) -> std::time::Duration {
        let plan = PrefillPlan::new(self.limits.prefill_chunk);
        let capacity = self.cache.config().max_sequences;
        let mut queue = DecodeQueue {
            capacity,
            running_steps: self.running.iter().map(|s| s.steps_left(plan)).collect(),
            waiting_steps: self.waiting.iter().map(|s| s.steps_left(plan)).collect(),
        };
        let extra = (self.extra_waiting)();
        if extra > 0 {
            let hold = queue.mean_hold_steps().round() as usize;
            queue.waiting_steps.extend(std::iter::repeat_n(hold, extra));
        }
        let batch = (queue.running_steps.len() + queue.waiting_steps.len()).min(capacity);
        let step = CostModel::from(&self.cost).seconds(batch.max(1));
        std::time::Duration::from_secs_f64(queue.steps_to_start() as f64 * step)
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Start(s) => self.start(*s),
            Command::Abort { key, reply } => {
                let mut found = false;
                for list in [&mut self.running, &mut self.waiting] {
                    if let Some(i) = list.iter().position(|s| s.key == key) {
                        let s = list.remove(i);
                        let _ = s.tx.send(Ok(pb::TokenChunk {
                            token_ids: Vec::new(),
                            finish_reason: FinishReason::Cancelled as i32,
                            logprobs: Vec::new(),
                            rng_state: s.sampler.rng_state(),
                        }));
                        found = true;
                    }
                }
                let _ = reply.send(found);
            }
        }
    }

    fn start(&mut self, new: NewSequence) {
        let mut tokens = new.prompt;
        let prompt_len = tokens.len();
        let pending = match new.adopted {
            Some((first, snapshot)) => {
                tokens.push(first);
                Some(snapshot)
            }
            None => {
                tokens.extend_from_slice(&new.generated);
                None
            }
        };
        self.next_order += 1;
        let seq = Sequence {
            key: new.key,
            order: self.next_order,
            tokens,
            prompt_len,
            cached: 0,
            lease: None,
            pending,
            sampler: new.sampler,
            remaining: new.max_new_tokens,
            finish: new.finish,
            logprobs: new.logprobs,
            shed_at: new.shed_at,
            tx: new.tx,
        };
        let total = self.cache.config().num_blocks;
        let need = self.cache.blocks_for(seq.tokens.len() + seq.remaining);
        if need > total {
            // Never retryable: no load on this worker makes it fit.
            let _ = seq.tx.send(Err(Status::invalid_argument(format!(
                "{} tokens + {} new tokens need {need} KV blocks; this decode worker has {total}",
                seq.tokens.len(),
                seq.remaining
            ))));
            return;
        }
        self.waiting.push(seq);
    }

    /// Drops waiting sequences that never started and whose budget has passed: their time
    /// to first token is lost already, and starting them would only delay the rest.
    fn shed_expired(&mut self) {
        let now = std::time::Instant::now();
        self.waiting.retain(|s| match s.shed_at {
            Some(at) if now >= at => {
                let _ = s.tx.send(Err(Status::resource_exhausted(
                    "shed unrun: it waited on this decode worker past the request's time-to-first-token budget",
                )));
                false
            }
            _ => true,
        });
    }

    /// Starts waiting sequences, oldest first, while state slots and blocks allow.
    fn admit_waiting(&mut self) {
        while let Some(next) = self.waiting.first() {
            // Admitted when its cache fits now: sequences grow into the free blocks, and the
            // newest is preempted if they run out (as in vLLM), which keeps the batch full.
            let need = self.cache.blocks_for(next.resume_tokens() + 1);
            let fits = self.cache.free_blocks() >= need;
            // With nothing running, the oldest waiting sequence goes first regardless (it fits
            // the whole pool: `start` checked).
            if self.cache.free_slots() == 0 || !(fits || self.running.is_empty()) {
                return;
            }
            let mut seq = self.waiting.remove(0);
            // Started: from now on it is preempted and resumed, never shed.
            seq.shed_at = None;
            let leased = match seq.pending.take() {
                Some(snapshot) => {
                    seq.cached = snapshot.layout.tokens;
                    self.cache.import_leased(&snapshot)
                }
                None => {
                    seq.cached = 0;
                    self.cache.lease()
                }
            };
            match leased {
                Ok(lease) => {
                    seq.lease = Some(lease);
                    self.insert_running(seq);
                }
                Err(e) => {
                    let _ = seq.tx.send(Err(engine_status(&e)));
                }
            }
        }
    }

    fn insert_running(&mut self, seq: Sequence) {
        let at = self.running.partition_point(|s| s.order < seq.order);
        self.running.insert(at, seq);
    }

    /// Drops the newest running sequence's cache and puts it back in the waiting queue.
    fn preempt_newest(&mut self) {
        let Some(mut seq) = self.running.pop() else {
            return;
        };
        tracing::debug!(request = %seq.key, tokens = seq.tokens.len(), "preempted");
        self.metrics.preemptions.inc();
        seq.lease = None;
        seq.cached = 0;
        let at = self.waiting.partition_point(|s| s.order < seq.order);
        self.waiting.insert(at, seq);
    }

    /// Reserves blocks for every running sequence's next feed, preempting the newest when
    /// they run out. Returns the feeds, aligned with `running`.
    fn plan(&mut self) -> Vec<std::ops::Range<usize>> {
        let plan = PrefillPlan::new(self.limits.prefill_chunk);
        let mut feeds = Vec::with_capacity(self.running.len());
        let mut budget = self.limits.max_batch_tokens;
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            let mut feed = s.feed(plan);
            if feed.len() > 1 {
                // A prompt chunk waits when the step is full; decode tokens never do.
                if feed.len() > budget
                    && !feeds.iter().all(|f: &std::ops::Range<usize>| f.is_empty())
                {
                    feed = feed.start..feed.start;
                }
            }
            let Some(lease) = &s.lease else {
                i += 1;
                feeds.push(feed.start..feed.start);
                continue;
            };
            match self.cache.reserve(lease.id(), feed.end) {
                Ok(()) => {
                    budget = budget.saturating_sub(feed.len());
                    feeds.push(feed);
                    i += 1;
                }
                Err(EngineError::CacheFull { .. }) if self.running.len() > 1 => {
                    // The newest goes back to waiting (it may be this one); retry this one.
                    self.preempt_newest();
                    self.cache.reclaim();
                }
                Err(e) => {
                    let s = self.running.remove(i);
                    let _ = s.tx.send(Err(engine_status(&e)));
                }
            }
        }
        feeds
    }

    /// One forward over every running sequence, then sampling where a sequence is caught up.
    fn step(&mut self) {
        let feeds = self.plan();
        let mut batch: Vec<SeqChunk> = Vec::with_capacity(feeds.len());
        // Samplers that pick after this step under a grammar: their masks are made while
        // the forward runs.
        let mut guided: Vec<&mut GuidedSampler> = Vec::new();
        for (s, f) in self.running.iter_mut().zip(&feeds) {
            let Sequence {
                tokens,
                lease,
                sampler,
                ..
            } = s;
            let (Some(lease), false) = (lease.as_ref(), f.is_empty()) else {
                continue;
            };
            if f.end == tokens.len() && sampler.is_guided() {
                guided.push(sampler);
            }
            let tokens: &Vec<u32> = tokens;
            batch.push(SeqChunk {
                seq: lease.id(),
                tokens: &tokens[f.clone()],
            });
        }
        if batch.is_empty() {
            return;
        }
        let fed: usize = batch.iter().map(|c| c.tokens.len()).sum();
        let started = std::time::Instant::now();
        let (model, cache, logits) = (&self.model, &mut self.cache, &mut self.logits);
        let step = std::thread::scope(|scope| {
            let masks = (!guided.is_empty()).then(|| {
                scope.spawn(move || guided.into_iter().for_each(GuidedSampler::prepare_mask))
            });
            let step = model.forward_into(cache, &batch, LogitsMode::LastPerSequence, logits);
            // A panic there leaves the masks unmade: sampling makes them itself.
            if let Some(masks) = masks {
                let _ = masks.join();
            }
            step
        });
        let sequences = batch.len();
        drop(batch);
        if let Err(e) = step {
            tracing::warn!("decode step of {sequences} sequences failed: {e}");
            let status = engine_status(&e);
            for s in std::mem::take(&mut self.running) {
                let _ = s.tx.send(Err(status.clone()));
            }
            return;
        }
        let seconds = started.elapsed().as_secs_f64();
        self.metrics.step(fed, seconds);
        self.cost.observe(fed, seconds);
        self.counters.set_step_cost(CostModel::from(&self.cost));
        let vocab = self.model.spec().vocab;
        let mut row = 0;
        let mut finished = Vec::new();
        for (i, (s, f)) in self.running.iter_mut().zip(&feeds).enumerate() {
            if f.is_empty() {
                continue;
            }
            let logits = &self.logits[row * vocab..(row + 1) * vocab];
            row += 1;
            s.cached = f.end;
            if s.cached < s.tokens.len() {
                // Still prefilling or recomputing: these logits were computed before.
                continue;
            }
            match s.sampler.sample(logits) {
                Ok(sampled) => {
                    if emit(s, &sampled) {
                        finished.push(i);
                    }
                }
                Err(e) => {
                    // Its constraint failed (this sequence only): it ends with the error.
                    let _ = s.tx.send(Err(e.into()));
                    finished.push(i);
                }
            }
        }
        for i in finished.into_iter().rev() {
            // Dropping the sequence drops its lease: the blocks return before the next step.
            self.running.remove(i);
        }
    }
}

/// Records and sends `sampled`; true when the sequence is over.
fn emit(s: &mut Sequence, sampled: &Sampled) -> bool {
    let token = sampled.token;
    s.tokens.push(token);
    s.remaining = s.remaining.saturating_sub(1);
    let finish = s
        .finish
        .judge_guided(token, s.remaining, s.sampler.grammar_complete());
    let logprobs = if s.logprobs {
        vec![token_logprobs(sampled)]
    } else {
        Vec::new()
    };
    let _ = s.tx.send(Ok(pb::TokenChunk {
        token_ids: vec![token],
        finish_reason: finish as i32,
        logprobs,
        rng_state: s.sampler.rng_state(),
    }));
    finish != FinishReason::Unspecified
}
