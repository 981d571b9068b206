//! Routed experts hosted elsewhere (as on expert workers) give bit-identical logits to the same
//! experts loaded in the model, whatever the sharding and the batch.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sluice_engine::{
    CacheConfig, ExpertExecutor, ExpertGroup, ExpertResidency, ExpertShard, LogitsMode, Model,
    SeqChunk, shard_range,
};

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/golden")
        .join(case)
}

/// Shards in one process, standing in for expert workers; records what it was asked.
struct Shards {
    shards: Vec<ExpertShard>,
    calls: Mutex<Vec<(usize, usize)>>,
}

impl ExpertExecutor for Shards {
    fn run(&self, layer: usize, groups: &[ExpertGroup]) -> sluice_engine::Result<Vec<Vec<f32>>> {
        self.calls.lock().unwrap().push((layer, groups.len()));
        groups
            .iter()
            .map(|g| {
                let shard = self
                    .shards
                    .iter()
                    .find(|s| s.range().contains(&g.expert))
                    .unwrap();
                Ok(shard.run(layer, std::slice::from_ref(g))?.remove(0))
            })
            .collect()
    }
}

fn logits(model: &Model, prompts: &[Vec<u32>]) -> Vec<f32> {
    let mut cache = model
        .new_cache(CacheConfig::for_sequences(prompts.len(), 256))
        .unwrap();
    let seqs: Vec<_> = prompts
        .iter()
        .map(|_| cache.add_sequence().unwrap())
        .collect();
    let batch: Vec<SeqChunk> = seqs
        .iter()
        .zip(prompts)
        .map(|(&seq, p)| SeqChunk { seq, tokens: p })
        .collect();
    model
        .forward(&mut cache, &batch, LogitsMode::AllTokens)
        .unwrap()
}

fn remote(dir: &Path, shards: usize) -> (Model, Arc<Shards>) {
    let mut model = Model::load_with(dir, &ExpertResidency::Remote, |_, _| {}).unwrap();
    let experts = model.spec().moe.as_ref().unwrap().experts;
    let executor = Arc::new(Shards {
        shards: (0..shards)
            .map(|i| ExpertShard::load(dir, shard_range(experts, i, shards).unwrap()).unwrap())
            .collect(),
        calls: Mutex::new(Vec::new()),
    });
    model.set_expert_executor(executor.clone());
    (model, executor)
}

#[test]
fn remote_experts_give_bit_identical_logits() {
    for case in ["moe", "vl_fused", "bf16"] {
        let dir = fixture(case);
        let local = Model::load(&dir, |_, _| {}).unwrap();
        let vocab = local.spec().vocab as u32;
        let prompts = vec![
            (0..70).map(|i| (i * 37 + 5) % vocab).collect::<Vec<u32>>(),
            vec![1, 2, 3],
        ];
        let expected = logits(&local, &prompts);
        for shards in [1, 2, 3] {
            let (model, executor) = remote(&dir, shards);
            assert_eq!(model.fingerprint(), local.fingerprint(), "{case}");
            assert_eq!(
                executor.shards[0].fingerprint(),
                local.fingerprint(),
                "{case}"
            );
            let got = logits(&model, &prompts);
            assert!(
                got.iter()
                    .zip(&expected)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{case} with {shards} shards differs"
            );
            let moe_layers = local
                .spec()
                .layers
                .iter()
                .filter(|l| l.ffn == sluice_engine::config::FfnKind::Moe)
                .count();
            assert_eq!(executor.calls.lock().unwrap().len(), moe_layers, "{case}");
        }
    }
}

#[test]
fn a_model_without_experts_and_no_executor_fails_clearly() {
    let dir = fixture("moe");
    let model = Model::load_with(&dir, &ExpertResidency::Remote, |_, _| {}).unwrap();
    let mut cache = model.new_cache(CacheConfig::for_sequences(1, 16)).unwrap();
    let seq = cache.add_sequence().unwrap();
    let err = model
        .forward(
            &mut cache,
            &[SeqChunk {
                seq,
                tokens: &[1, 2],
            }],
            LogitsMode::LastPerSequence,
        )
        .unwrap_err();
    assert!(err.to_string().contains("no executor"), "{err}");
}

#[test]
fn impossible_shards_are_refused() {
    assert_eq!(shard_range(8, 1, 3).unwrap(), 2..5);
    assert!(shard_range(8, 3, 3).is_err());
    assert!(shard_range(2, 0, 3).is_err());
    assert!(shard_range(8, 0, 0).is_err());
}
