//! Export and import of one sequence's whole state. This is what moves from a prefill worker
//! to a decode worker: a [`CacheLayout`] that says what each byte region holds, and the regions.
//! Block tables are not part of it, so the two sides may use different block sizes.

use serde::{Deserialize, Serialize};

use super::{ModelCache, SeqId};
use crate::config::MixerKind;
use crate::error::{EngineError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegionKind {
    /// `[tokens, kv_heads, head_dim]` f32.
    Keys,
    /// `[tokens, kv_heads, head_dim]` f32.
    Values,
    /// `[conv_dim, kernel - 1]` f32.
    ConvState,
    /// `[value_heads, key_dim, value_dim]` f32.
    RecurrentState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    pub layer: usize,
    pub kind: RegionKind,
    /// Number of f32 elements.
    pub elements: usize,
}

/// Describes a snapshot's regions; two models can exchange snapshots only if their layouts
/// for the same token count are equal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheLayout {
    pub tokens: usize,
    pub regions: Vec<RegionLayout>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheSnapshot {
    pub layout: CacheLayout,
    /// One little-endian f32 byte region per `layout.regions` entry.
    pub regions: Vec<Vec<u8>>,
}

impl CacheSnapshot {
    pub fn total_bytes(&self) -> usize {
        self.regions.iter().map(Vec::len).sum()
    }
}

fn to_bytes(values: impl Iterator<Item = f32>) -> Vec<u8> {
    values.flat_map(f32::to_le_bytes).collect()
}

fn from_bytes(bytes: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

impl ModelCache {
    /// The layout a snapshot of `tokens` tokens has for this model.
    pub fn layout(&self, tokens: usize) -> CacheLayout {
        let mut regions = Vec::new();
        for (layer, kind) in self.kinds.iter().enumerate() {
            match kind {
                MixerKind::FullAttention => {
                    for kind in [RegionKind::Keys, RegionKind::Values] {
                        regions.push(RegionLayout {
                            layer,
                            kind,
                            elements: tokens * self.kv_width,
                        });
                    }
                }
                MixerKind::LinearAttention => {
                    regions.push(RegionLayout {
                        layer,
                        kind: RegionKind::ConvState,
                        elements: self.conv_len,
                    });
                    regions.push(RegionLayout {
                        layer,
                        kind: RegionKind::RecurrentState,
                        elements: self.recurrent_len,
                    });
                }
            }
        }
        CacheLayout { tokens, regions }
    }

    /// Copies out the whole state of `id`.
    pub fn export(&self, id: SeqId) -> Result<CacheSnapshot> {
        let state = self.state(id)?;
        let layout = self.layout(state.len);
        let regions = layout
            .regions
            .iter()
            .map(|r| {
                let ord = self.ordinal[r.layer];
                match r.kind {
                    RegionKind::Keys | RegionKind::Values => {
                        let store = &self.kv[ord];
                        let src = if r.kind == RegionKind::Keys {
                            &store.keys
                        } else {
                            &store.values
                        };
                        to_bytes((0..state.len).flat_map(|p| {
                            let o = self.kv_offset(state, p);
                            src[o..o + self.kv_width].iter().copied()
                        }))
                    }
                    RegionKind::ConvState => {
                        let c = self.conv_len;
                        let s = &self.linear[ord].conv[state.slot * c..(state.slot + 1) * c];
                        to_bytes(s.iter().copied())
                    }
                    RegionKind::RecurrentState => {
                        let n = self.recurrent_len;
                        let s = &self.linear[ord].recurrent[state.slot * n..(state.slot + 1) * n];
                        to_bytes(s.iter().copied())
                    }
                }
            })
            .collect();
        Ok(CacheSnapshot { layout, regions })
    }

    /// Creates a new sequence holding exactly the exported state.
    pub fn import(&mut self, snapshot: &CacheSnapshot) -> Result<SeqId> {
        let expected = self.layout(snapshot.layout.tokens);
        if snapshot.layout != expected {
            return Err(EngineError::SnapshotMismatch(format!(
                "{} regions for {} tokens, this model expects {}",
                snapshot.layout.regions.len(),
                snapshot.layout.tokens,
                expected.regions.len()
            )));
        }
        for (r, bytes) in expected.regions.iter().zip(&snapshot.regions) {
            if bytes.len() != r.elements * 4 {
                return Err(EngineError::SnapshotMismatch(format!(
                    "layer {} {:?}: {} bytes, expected {}",
                    r.layer,
                    r.kind,
                    bytes.len(),
                    r.elements * 4
                )));
            }
        }
        if snapshot.regions.len() != expected.regions.len() {
            return Err(EngineError::SnapshotMismatch(
                "region count differs from layout".into(),
            ));
        }
        let id = self.add_sequence()?;
        let tokens = snapshot.layout.tokens;
        if let Err(e) = self.reserve(id, tokens) {
            self.release(id);
            return Err(e);
        }
        let state = self.seqs[&id].clone();
        let w = self.kv_width;
        for (r, bytes) in expected.regions.iter().zip(&snapshot.regions) {
            let ord = self.ordinal[r.layer];
            match r.kind {
                RegionKind::Keys | RegionKind::Values => {
                    for p in 0..tokens {
                        let o = self.kv_offset(&state, p);
                        let store = &mut self.kv[ord];
                        let dst = if r.kind == RegionKind::Keys {
                            &mut store.keys
                        } else {
                            &mut store.values
                        };
                        from_bytes(&bytes[p * w * 4..(p + 1) * w * 4], &mut dst[o..o + w]);
                    }
                }
                RegionKind::ConvState => {
                    let c = self.conv_len;
                    from_bytes(
                        bytes,
                        &mut self.linear[ord].conv[state.slot * c..(state.slot + 1) * c],
                    );
                }
                RegionKind::RecurrentState => {
                    let n = self.recurrent_len;
                    let dst = &mut self.linear[ord].recurrent[state.slot * n..(state.slot + 1) * n];
                    from_bytes(bytes, dst);
                }
            }
        }
        self.advance(id, tokens)?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::super::CacheConfig;
    use super::super::tests::tiny_spec;
    use super::*;

    #[test]
    fn export_import_round_trips_across_block_sizes() {
        let spec = tiny_spec();
        let mut a = ModelCache::new(
            &spec,
            CacheConfig {
                block_size: 2,
                num_blocks: 8,
                max_sequences: 1,
            },
        )
        .unwrap();
        let s = a.add_sequence().unwrap();
        a.reserve(s, 5).unwrap();
        for p in 0..5 {
            a.write_kv(3, s, p, &[p as f32 + 0.5; 8], &[p as f32 - 0.25; 8])
                .unwrap();
        }
        a.advance(s, 5).unwrap();
        let (conv, rec) = a.linear_state(0, s).unwrap();
        conv.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32);
        rec.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = -(i as f32));
        let snap = a.export(s).unwrap();

        let mut b = ModelCache::new(
            &spec,
            CacheConfig {
                block_size: 3,
                num_blocks: 4,
                max_sequences: 2,
            },
        )
        .unwrap();
        let _other = b.add_sequence().unwrap();
        let t = b.import(&snap).unwrap();
        assert_eq!(b.seq_len(t).unwrap(), 5);
        assert_eq!(b.export(t).unwrap(), snap);

        let mut wrong = snap.clone();
        wrong.regions[0].pop();
        assert!(matches!(
            b.import(&wrong),
            Err(EngineError::SnapshotMismatch(_))
        ));
    }
}
