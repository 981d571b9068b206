//! Per-sequence model state: paged KV blocks for full-attention layers, state slots (conv +
//! recurrent) for Gated DeltaNet layers, and export/import of one sequence's whole state.

mod snapshot;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use snapshot::{CacheLayout, CacheSnapshot, RegionKind, RegionLayout};

use crate::backend::cpu::aligned::AlignedBuffer;
use crate::config::{MixerKind, ModelSpec};
use crate::error::{EngineError, Result};

/// Identifies a sequence inside one [`ModelCache`].
/// A sequence in one [`ModelCache`]: minted by the cache, meaningless outside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(u64);

impl std::fmt::Display for SeqId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Tokens per KV block in the services' caches.
pub const KV_BLOCK_TOKENS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the pool (shared by all sequences).
    pub num_blocks: usize,
    /// Sequences that can be live at once (one state slot each).
    pub max_sequences: usize,
}

impl CacheConfig {
    /// A pool sized for `sequences` sequences of up to `max_tokens` tokens each.
    pub fn for_sequences(sequences: usize, max_tokens: usize) -> Self {
        let block_size = 16;
        let per_seq = max_tokens.div_ceil(block_size).max(1);
        CacheConfig {
            block_size,
            num_blocks: per_seq * sequences,
            max_sequences: sequences,
        }
    }
}

/// KV storage of one full-attention layer: `[num_blocks, block_size, kv_heads, head_dim]`.
struct KvLayer {
    keys: AlignedBuffer,
    values: AlignedBuffer,
}

/// Gated DeltaNet state of one linear layer for every slot.
struct LinearState {
    /// `[slots, conv_dim, kernel - 1]`: the last pre-conv inputs, oldest first.
    conv: AlignedBuffer,
    /// `[slots, value_heads, key_dim, value_dim]`, f32.
    recurrent: AlignedBuffer,
}

#[derive(Debug, Clone)]
struct SeqState {
    blocks: Vec<u32>,
    len: usize,
    slot: usize,
}

pub struct ModelCache {
    config: CacheConfig,
    /// Row width of one cached token in one layer: kv_heads · head_dim.
    kv_width: usize,
    conv_len: usize,
    recurrent_len: usize,
    kinds: Vec<MixerKind>,
    /// For each model layer, its index among layers of the same kind.
    ordinal: Vec<usize>,
    kv: Vec<KvLayer>,
    linear: Vec<LinearState>,
    free_blocks: Vec<u32>,
    free_slots: Vec<usize>,
    seqs: HashMap<SeqId, SeqState>,
    next_id: SeqId,
    /// Sequences whose [`SeqLease`] was dropped, freed at the next allocation.
    returned: Arc<Mutex<Vec<SeqId>>>,
}

/// A sequence's hold on a [`ModelCache`]: dropping it hands the sequence back, and the cache
/// frees its blocks and slot before its next allocation. Whoever owns a lease cannot leak the
/// sequence on any path — finish, cancellation, error or preemption.
#[derive(Debug)]
pub struct SeqLease {
    id: SeqId,
    returned: Arc<Mutex<Vec<SeqId>>>,
}

impl SeqLease {
    pub fn id(&self) -> SeqId {
        self.id
    }
}

impl Drop for SeqLease {
    fn drop(&mut self) {
        // A poisoned lock still holds a valid list: a panic elsewhere must not leak blocks.
        let mut returned = self.returned.lock().unwrap_or_else(|e| e.into_inner());
        returned.push(self.id);
    }
}

impl ModelCache {
    pub fn new(spec: &ModelSpec, config: CacheConfig) -> Result<Self> {
        if config.block_size == 0 || config.max_sequences == 0 {
            return Err(EngineError::InvalidArgument {
                field: "cache",
                message: "block_size and max_sequences must be at least 1".into(),
            });
        }
        let a = &spec.attention;
        let l = &spec.linear;
        let kv_width = a.kv_heads * a.head_dim;
        let conv_len = l.conv_dim() * (l.conv_kernel - 1);
        let recurrent_len = l.value_heads * l.key_dim * l.value_dim;
        let kinds: Vec<MixerKind> = spec.layers.iter().map(|l| l.mixer).collect();
        let mut counts = [0usize; 2];
        let ordinal = kinds
            .iter()
            .map(|k| {
                let i = usize::from(*k == MixerKind::LinearAttention);
                counts[i] += 1;
                counts[i] - 1
            })
            .collect();
        let kv_size = config.num_blocks * config.block_size * kv_width;
        let kv = (0..counts[0])
            .map(|_| KvLayer {
                keys: AlignedBuffer::zeroed(kv_size),
                values: AlignedBuffer::zeroed(kv_size),
            })
            .collect();
        let linear = (0..counts[1])
            .map(|_| LinearState {
                conv: AlignedBuffer::zeroed(conv_len * config.max_sequences),
                recurrent: AlignedBuffer::zeroed(recurrent_len * config.max_sequences),
            })
            .collect();
        Ok(ModelCache {
            config,
            kv_width,
            conv_len,
            recurrent_len,
            kinds,
            ordinal,
            kv,
            linear,
            free_blocks: (0..config.num_blocks as u32).rev().collect(),
            free_slots: (0..config.max_sequences).rev().collect(),
            seqs: HashMap::new(),
            next_id: SeqId(1),
            returned: Arc::default(),
        })
    }

    pub fn config(&self) -> CacheConfig {
        self.config
    }

    /// Starts an empty sequence held by the returned lease.
    pub fn lease(&mut self) -> Result<SeqLease> {
        let id = self.add_sequence()?;
        Ok(self.lease_of(id))
    }

    /// Imports `snapshot` as a new sequence held by the returned lease.
    pub fn import_leased(&mut self, snapshot: &CacheSnapshot) -> Result<SeqLease> {
        let id = self.import(snapshot)?;
        Ok(self.lease_of(id))
    }

    fn lease_of(&self, id: SeqId) -> SeqLease {
        SeqLease {
            id,
            returned: self.returned.clone(),
        }
    }

    /// Frees the sequences whose leases were dropped.
    pub fn reclaim(&mut self) {
        let ids = std::mem::take(&mut *self.returned.lock().unwrap_or_else(|e| e.into_inner()));
        for id in ids {
            self.release(id);
        }
    }

    /// Blocks a sequence of `tokens` tokens occupies.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.config.block_size)
    }

    /// KV blocks held by `id`.
    pub fn blocks_of(&self, id: SeqId) -> Result<usize> {
        Ok(self.state(id)?.blocks.len())
    }

    /// Sequences that can still start (free state slots).
    pub fn free_slots(&self) -> usize {
        self.free_slots.len()
    }

    /// Starts an empty sequence (zeroed linear state, no KV blocks yet).
    pub fn add_sequence(&mut self) -> Result<SeqId> {
        self.reclaim();
        let slot = self
            .free_slots
            .pop()
            .ok_or(EngineError::NoFreeSlot(self.config.max_sequences))?;
        for state in &mut self.linear {
            state.conv[slot * self.conv_len..(slot + 1) * self.conv_len].fill(0.0);
            state.recurrent[slot * self.recurrent_len..(slot + 1) * self.recurrent_len].fill(0.0);
        }
        let id = self.next_id;
        self.next_id = SeqId(id.0 + 1);
        // Room for a fair share of the pool up front, so growing a sequence during decode
        // does not allocate.
        let share = self
            .config
            .num_blocks
            .div_ceil(self.config.max_sequences.max(1));
        self.seqs.insert(
            id,
            SeqState {
                blocks: Vec::with_capacity(share),
                len: 0,
                slot,
            },
        );
        Ok(id)
    }

    /// Frees a sequence's blocks and slot. Unknown ids are ignored (release is idempotent).
    pub fn release(&mut self, id: SeqId) {
        if let Some(state) = self.seqs.remove(&id) {
            self.free_blocks.extend(state.blocks);
            self.free_slots.push(state.slot);
        }
    }

    /// Tokens already in the cache for `id`.
    pub fn seq_len(&self, id: SeqId) -> Result<usize> {
        Ok(self.state(id)?.len)
    }

    pub fn free_blocks(&self) -> usize {
        self.free_blocks.len()
    }

    pub fn live_sequences(&self) -> usize {
        self.seqs.len()
    }

    fn state(&self, id: SeqId) -> Result<&SeqState> {
        self.seqs.get(&id).ok_or(EngineError::UnknownSequence(id))
    }

    /// Makes room for `id` to hold `tokens` tokens in total.
    pub fn reserve(&mut self, id: SeqId, tokens: usize) -> Result<()> {
        self.reclaim();
        let have = self.state(id)?.blocks.len();
        let need = tokens.div_ceil(self.config.block_size).saturating_sub(have);
        if need > self.free_blocks.len() {
            return Err(EngineError::CacheFull {
                needed: need,
                free: self.free_blocks.len(),
            });
        }
        let at = self.free_blocks.len() - need;
        let state = self
            .seqs
            .get_mut(&id)
            .ok_or(EngineError::UnknownSequence(id))?;
        state.blocks.extend(self.free_blocks.drain(at..));
        Ok(())
    }

    /// Records that `n` more tokens of `id` are now in the cache.
    pub fn advance(&mut self, id: SeqId, n: usize) -> Result<()> {
        let state = self
            .seqs
            .get_mut(&id)
            .ok_or(EngineError::UnknownSequence(id))?;
        state.len += n;
        Ok(())
    }

    /// Offset of token `pos` of `id` in a KV layer's storage.
    fn kv_offset(&self, state: &SeqState, pos: usize) -> usize {
        let block = state.blocks[pos / self.config.block_size] as usize;
        (block * self.config.block_size + pos % self.config.block_size) * self.kv_width
    }

    /// Writes the key and value rows (`[kv_heads · head_dim]` each) of token `pos`.
    pub fn write_kv(
        &mut self,
        layer: usize,
        id: SeqId,
        pos: usize,
        key: &[f32],
        value: &[f32],
    ) -> Result<()> {
        let state = self.state(id)?;
        let off = self.kv_offset(state, pos);
        let kv = &mut self.kv[self.ordinal[layer]];
        kv.keys[off..off + self.kv_width].copy_from_slice(key);
        kv.values[off..off + self.kv_width].copy_from_slice(value);
        Ok(())
    }

    /// Read access to the first `len` cached tokens of `id` in attention layer `layer`.
    pub fn kv_view(&self, layer: usize, id: SeqId, len: usize) -> Result<KvView<'_>> {
        let state = self.state(id)?;
        if len.div_ceil(self.config.block_size) > state.blocks.len() {
            return Err(EngineError::InvalidArgument {
                field: "len",
                message: format!("sequence {id} has no cache blocks for {len} tokens"),
            });
        }
        let kv = &self.kv[self.ordinal[layer]];
        Ok(KvView {
            keys: &kv.keys,
            values: &kv.values,
            blocks: &state.blocks,
            block_size: self.config.block_size,
            len,
            width: self.kv_width,
        })
    }

    /// Mutable conv and recurrent state of `id` in linear layer `layer`.
    pub fn linear_state(&mut self, layer: usize, id: SeqId) -> Result<(&mut [f32], &mut [f32])> {
        let slot = self.state(id)?.slot;
        let (c, r) = (self.conv_len, self.recurrent_len);
        let state = &mut self.linear[self.ordinal[layer]];
        Ok((
            &mut state.conv[slot * c..(slot + 1) * c],
            &mut state.recurrent[slot * r..(slot + 1) * r],
        ))
    }
}

/// Cached keys/values of one sequence in one layer, position by position.
pub struct KvView<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    /// The sequence's blocks, in order.
    blocks: &'a [u32],
    block_size: usize,
    len: usize,
    width: usize,
}

impl KvView<'_> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    fn offset(&self, pos: usize) -> usize {
        debug_assert!(pos < self.len);
        let block = self.blocks[pos / self.block_size] as usize;
        (block * self.block_size + pos % self.block_size) * self.width
    }

    /// Key row `[kv_heads · head_dim]` of position `pos`.
    #[inline]
    pub fn key(&self, pos: usize) -> &[f32] {
        let o = self.offset(pos);
        &self.keys[o..o + self.width]
    }

    #[inline]
    pub fn value(&self, pos: usize) -> &[f32] {
        let o = self.offset(pos);
        &self.values[o..o + self.width]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_spec;

    pub(crate) fn tiny_spec() -> ModelSpec {
        parse_spec(&serde_json::json!({
            "model_type": "qwen3_5_text", "hidden_size": 16, "num_hidden_layers": 4,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
            "vocab_size": 32, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 4,
            "linear_value_head_dim": 4, "linear_num_key_heads": 1, "linear_num_value_heads": 2,
            "intermediate_size": 8
        }))
        .unwrap()
    }

    #[test]
    fn blocks_are_reserved_and_returned() {
        let spec = tiny_spec();
        let cfg = CacheConfig {
            block_size: 4,
            num_blocks: 5,
            max_sequences: 2,
        };
        let mut cache = ModelCache::new(&spec, cfg).unwrap();
        let a = cache.add_sequence().unwrap();
        let b = cache.add_sequence().unwrap();
        assert!(matches!(
            cache.add_sequence(),
            Err(EngineError::NoFreeSlot(2))
        ));
        cache.reserve(a, 9).unwrap(); // 3 blocks
        assert_eq!(cache.free_blocks(), 2);
        let err = cache.reserve(b, 12).unwrap_err();
        assert!(
            matches!(err, EngineError::CacheFull { needed: 3, free: 2 }),
            "{err}"
        );
        cache.release(a);
        assert_eq!(cache.free_blocks(), 5);
        cache.reserve(b, 12).unwrap();
        assert!(matches!(
            cache.seq_len(a),
            Err(EngineError::UnknownSequence(_))
        ));
    }

    #[test]
    fn a_dropped_lease_frees_its_sequence_at_the_next_allocation() {
        let cfg = CacheConfig {
            block_size: 4,
            num_blocks: 4,
            max_sequences: 2,
        };
        let mut cache = ModelCache::new(&tiny_spec(), cfg).unwrap();
        let a = cache.lease().unwrap();
        let b = cache.lease().unwrap();
        cache.reserve(a.id(), 16).unwrap();
        assert_eq!(cache.free_blocks(), 0);
        assert!(matches!(cache.lease(), Err(EngineError::NoFreeSlot(2))));
        drop(a);
        // The next allocation reclaims a's blocks and slot first.
        cache.reserve(b.id(), 8).unwrap();
        assert_eq!(cache.free_blocks(), 2);
        assert_eq!(cache.live_sequences(), 1);
        let c = cache.lease().unwrap();
        drop((b, c));
        cache.reclaim();
        assert_eq!((cache.free_blocks(), cache.live_sequences()), (4, 0));
    }

    #[test]
    fn kv_rows_round_trip_through_blocks() {
        let spec = tiny_spec();
        let cfg = CacheConfig {
            block_size: 2,
            num_blocks: 8,
            max_sequences: 2,
        };
        let mut cache = ModelCache::new(&spec, cfg).unwrap();
        let a = cache.add_sequence().unwrap();
        let b = cache.add_sequence().unwrap();
        cache.reserve(a, 5).unwrap();
        cache.reserve(b, 5).unwrap();
        for pos in 0..5 {
            let k = vec![pos as f32; 8];
            let v = vec![-(pos as f32); 8];
            cache.write_kv(3, a, pos, &k, &v).unwrap();
            cache.write_kv(3, b, pos, &v, &k).unwrap();
        }
        let view = cache.kv_view(3, a, 5).unwrap();
        for pos in 0..5 {
            assert_eq!(view.key(pos), &[pos as f32; 8]);
            assert_eq!(view.value(pos), &[-(pos as f32); 8]);
        }
    }
}
