//! Qwen3.5 hybrid model, top-down: spec → decoder layers → model.
//!
//! Each decoder layer is `x += mixer(norm(x)); x += ffn(norm(x))`, where the mixer is gated
//! full attention or Gated DeltaNet and the FFN is a sparse MoE or a dense SwiGLU MLP.
//! `forward` runs a packed batch of sequences of different lengths: prefill chunks of some
//! sequences and decode tokens of others in one call.

use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;

use super::layers::attention::Attention;
use super::layers::gated_delta::GatedDeltaNet;
use super::layers::mlp::Mlp;
use super::layers::moe::{ExpertExecutor, ExpertResidency, SparseMoe};
use super::layers::norm::RmsNorm;
use super::{LanguageModel, plan_batch};
use crate::backend::{Backend, CpuBackend, Segment, scratch};
use crate::cache::{CacheConfig, ModelCache, SeqId};
use crate::config::{FfnKind, MixerKind, ModelSpec, load_spec};
use crate::error::Result;
use crate::tensor::{DType, Weight, WeightFormat};
use crate::weights::WeightStore;

enum Mixer {
    Attention(Attention),
    Linear(GatedDeltaNet),
}

enum Ffn {
    Dense(Mlp),
    Moe(SparseMoe),
}

struct DecoderLayer {
    input_norm: RmsNorm,
    mixer: Mixer,
    post_norm: RmsNorm,
    ffn: Ffn,
}

/// The model on backend `B`, which runs all its kernels.
pub struct Model<B: Backend = CpuBackend> {
    backend: B,
    spec: ModelSpec,
    /// `[vocab, hidden]`.
    embed: Weight,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `[vocab, hidden]`; `None` when tied to `embed`.
    lm_head: Option<Weight>,
    dtype: DType,
    fingerprint: u64,
    /// Runs the routed experts when they are not loaded here.
    remote_experts: Option<Arc<dyn ExpertExecutor>>,
}

/// One sequence's new tokens in a batch.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    pub seq: SeqId,
    pub tokens: &'a [u32],
}

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// One row per chunk: its last token (what sampling needs).
    LastPerSequence,
    /// One row per token of the batch, in packed order.
    AllTokens,
}

impl Model<CpuBackend> {
    /// Loads `config.json` and all the safetensors weights of `dir` onto the default CPU
    /// backend. `progress(done, total)` is called after each layer.
    pub fn load(dir: &Path, progress: impl FnMut(usize, usize)) -> Result<Model> {
        Model::load_with(dir, &ExpertResidency::All, progress)
    }

    /// As `load`, with the routed experts loaded or left to expert workers per `experts`.
    pub fn load_with(
        dir: &Path,
        experts: &ExpertResidency,
        progress: impl FnMut(usize, usize),
    ) -> Result<Model> {
        Model::load_on(CpuBackend::default(), dir, experts, progress)
    }
}

impl<B: Backend> Model<B> {
    /// As `load_with`, on `backend`.
    pub fn load_on(
        backend: B,
        dir: &Path,
        experts: &ExpertResidency,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Model<B>> {
        let spec = load_spec(dir)?;
        let store = WeightStore::open(dir)?;
        let prefix = tensor_prefix(&store);
        let (h, v, eps) = (spec.hidden, spec.vocab, spec.eps);
        let embed = store.matrix(&format!("{prefix}.embed_tokens.weight"), v, h)?;
        let total = spec.layers.len();
        let mut layers = Vec::with_capacity(total);
        for (i, layer) in spec.layers.iter().enumerate() {
            let p = format!("{prefix}.layers.{i}");
            let mixer = match layer.mixer {
                MixerKind::FullAttention => Mixer::Attention(Attention::load(
                    &store,
                    &format!("{p}.self_attn"),
                    i,
                    &spec.attention,
                    h,
                    eps,
                )?),
                MixerKind::LinearAttention => Mixer::Linear(GatedDeltaNet::load(
                    &store,
                    &format!("{p}.linear_attn"),
                    i,
                    &spec.linear,
                    h,
                    eps,
                )?),
            };
            let ffn = match (layer.ffn, &spec.moe) {
                (FfnKind::Moe, Some(moe)) => Ffn::Moe(SparseMoe::load(
                    &store,
                    &format!("{p}.mlp"),
                    moe,
                    h,
                    experts,
                )?),
                _ => Ffn::Dense(Mlp::load(
                    &store,
                    &format!("{p}.mlp"),
                    h,
                    spec.dense_intermediate,
                )?),
            };
            layers.push(DecoderLayer {
                input_norm: RmsNorm::load(&store, &format!("{p}.input_layernorm.weight"), h, eps)?,
                mixer,
                post_norm: RmsNorm::load(
                    &store,
                    &format!("{p}.post_attention_layernorm.weight"),
                    h,
                    eps,
                )?,
                ffn,
            });
            progress(i + 1, total);
        }
        let lm_head = if spec.tie_embeddings && !store.contains("lm_head.weight") {
            None
        } else {
            Some(store.matrix("lm_head.weight", v, h)?)
        };
        let norm = RmsNorm::load(&store, &format!("{prefix}.norm.weight"), h, eps)?;
        let dtype = embed.dtype();
        let fingerprint = fingerprint(&spec, dtype);
        Ok(Model {
            backend,
            spec,
            embed,
            layers,
            norm,
            lm_head,
            dtype,
            fingerprint,
            remote_experts: None,
        })
    }

    /// Where the routed experts run when this model was loaded without them.
    pub fn set_expert_executor(&mut self, executor: Arc<dyn ExpertExecutor>) {
        self.remote_experts = Some(executor);
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The backend that runs this model's kernels.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Dtype of the large matrices (the checkpoint's, or int8 after `set_weight_format`; a
    /// few small tensors may differ).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Converts the large matrices — attention and DeltaNet projections, MLPs, local and
    /// shared experts, the output head — to `format`. The embedding (read one row per token)
    /// and the MoE routers stay as stored. Changes the fingerprint: caches and expert rows are
    /// exchanged only between workers whose weights are in the same format.
    pub fn set_weight_format(&mut self, format: WeightFormat) {
        if format != WeightFormat::Int8 || self.dtype == DType::I8 {
            return;
        }
        self.layers.par_iter_mut().for_each(|l| {
            match &mut l.mixer {
                Mixer::Attention(a) => a.quantize_int8(),
                Mixer::Linear(g) => g.quantize_int8(),
            }
            match &mut l.ffn {
                Ffn::Dense(m) => m.quantize_int8(),
                Ffn::Moe(m) => m.quantize_int8(),
            }
        });
        // A tied head keeps its f32 rows: the embedding is also the input lookup.
        if let Some(head) = &mut self.lm_head {
            *head = head.quantize_int8();
        }
        self.dtype = DType::I8;
        self.fingerprint = fingerprint(&self.spec, DType::I8);
    }

    /// Identifies the architecture and weight dtype: two workers may exchange cache snapshots
    /// only when their fingerprints match.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// A cache for this model.
    pub fn new_cache(&self, config: CacheConfig) -> Result<ModelCache> {
        ModelCache::new(&self.spec, config)
    }

    /// Bytes of weights read to decode one token (active experts only).
    pub fn active_weight_bytes(&self) -> usize {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed).bytes();
        let row = self.embed.bytes() / self.spec.vocab;
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let mixer = match &l.mixer {
                    Mixer::Attention(a) => a.weight_bytes(),
                    Mixer::Linear(g) => g.weight_bytes(),
                };
                let ffn = match &l.ffn {
                    Ffn::Dense(m) => m.weight_bytes(),
                    Ffn::Moe(m) => m.active_weight_bytes(),
                };
                mixer + ffn
            })
            .sum();
        head + row + layers
    }

    /// Runs one step over a packed batch and writes logits `[rows, vocab]` (rows per `mode`)
    /// into `logits`. Every chunk's tokens are appended to its sequence's cache. Temporaries
    /// come from per-thread scratch pools: once warmed up, a decode step allocates nothing.
    pub fn forward_into(
        &self,
        cache: &mut ModelCache,
        batch: &[SeqChunk<'_>],
        mode: LogitsMode,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        let mut segments = SEGMENTS.take();
        let out = self.run_step(cache, batch, mode, &mut segments, logits);
        SEGMENTS.set(segments);
        out
    }

    /// As `forward_into`, returning new logits.
    pub fn forward(
        &self,
        cache: &mut ModelCache,
        batch: &[SeqChunk<'_>],
        mode: LogitsMode,
    ) -> Result<Vec<f32>> {
        let mut logits = Vec::new();
        self.forward_into(cache, batch, mode, &mut logits)?;
        Ok(logits)
    }

    fn run_step(
        &self,
        cache: &mut ModelCache,
        batch: &[SeqChunk<'_>],
        mode: LogitsMode,
        segments: &mut Vec<Segment>,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        plan_batch(&self.spec, cache, batch, segments)?;
        let b = &self.backend;
        let hidden = self.spec.hidden;
        let t: usize = segments.iter().map(|s| s.len).sum();

        let mut h = scratch::for_overwrite::<f32>(t * hidden); // [t, hidden]
        for (chunk, seg) in batch.iter().zip(segments.iter()) {
            let rows = &mut h[seg.offset * hidden..(seg.offset + seg.len) * hidden];
            b.embed(&self.embed, chunk.tokens, rows);
        }
        let mut x = scratch::for_overwrite::<f32>(t * hidden); // normed input of a sublayer
        let mut y = scratch::for_overwrite::<f32>(t * hidden); // sublayer output
        for (i, layer) in self.layers.iter().enumerate() {
            x.copy_from_slice(&h);
            layer.input_norm.forward(b, &mut x);
            match &layer.mixer {
                Mixer::Attention(a) => a.forward(b, &x, segments, cache, &mut y)?,
                Mixer::Linear(g) => g.forward(b, &x, segments, cache, &mut y)?,
            }
            b.add(&mut h, &y);
            x.copy_from_slice(&h);
            layer.post_norm.forward(b, &mut x);
            match &layer.ffn {
                Ffn::Dense(m) => m.forward(b, &x, &mut y),
                Ffn::Moe(m) => m.forward(b, &x, &mut y, i, self.remote_experts.as_deref())?,
            }
            b.add(&mut h, &y);
        }
        for seg in segments.iter() {
            cache.advance(seg.seq, seg.len)?;
        }

        // The rows that get logits, normed: [rows, hidden].
        let rows = match mode {
            LogitsMode::AllTokens => t,
            LogitsMode::LastPerSequence => segments.len(),
        };
        let mut last = scratch::for_overwrite::<f32>(rows * hidden);
        match mode {
            LogitsMode::AllTokens => last.copy_from_slice(&h),
            LogitsMode::LastPerSequence => {
                for (seg, dst) in segments.iter().zip(last.chunks_exact_mut(hidden)) {
                    let r = seg.offset + seg.len - 1;
                    dst.copy_from_slice(&h[r * hidden..(r + 1) * hidden]);
                }
            }
        }
        self.norm.forward(b, &mut last);
        // Every value is written by the product: only the length needs setting.
        logits.resize(rows * self.spec.vocab, 0.0); // [rows, vocab]
        b.matmul(&last, self.lm_head.as_ref().unwrap_or(&self.embed), logits);
        Ok(())
    }
}

thread_local! {
    /// The step's segments, kept between steps (a thread runs one step at a time).
    static SEGMENTS: std::cell::Cell<Vec<Segment>> = const { std::cell::Cell::new(Vec::new()) };
}

impl<B: Backend> LanguageModel for Model<B> {
    fn spec(&self) -> &ModelSpec {
        Model::spec(self)
    }

    fn fingerprint(&self) -> u64 {
        Model::fingerprint(self)
    }

    fn new_cache(&self, config: CacheConfig) -> Result<ModelCache> {
        Model::new_cache(self, config)
    }

    fn forward_into(
        &self,
        cache: &mut ModelCache,
        batch: &[SeqChunk<'_>],
        mode: LogitsMode,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        Model::forward_into(self, cache, batch, mode, logits)
    }
}

/// `model.language_model` (Qwen3.5 release layout) or `model` (text-only save).
pub(crate) fn tensor_prefix(store: &WeightStore) -> &'static str {
    if store.contains("model.language_model.embed_tokens.weight") {
        "model.language_model"
    } else {
        "model"
    }
}

/// FNV-1a over the architecture and weight dtype.
pub(crate) fn fingerprint(spec: &ModelSpec, dtype: DType) -> u64 {
    let text = format!("{spec:?}/{dtype}");
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}
