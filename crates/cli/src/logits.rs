//! `sluice logits`: the logits of every position of one forward pass.

use std::io::Write;

use anyhow::Result;
use serde_json::json;
use sluice_engine::sampler::argmax;
use sluice_engine::{CacheConfig, LogitsMode, SeqChunk};

use crate::model_source::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Token ids, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub tokens: Vec<u32>,
    /// Print `{"logits": [[f32; vocab]; n_tokens]}`.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: LogitsArgs) -> Result<()> {
    let (_, model) = args.model.load()?;
    let mut cache = model.new_cache(CacheConfig::for_sequences(1, args.tokens.len()))?;
    let seq = cache.add_sequence()?;
    let logits = model.forward(
        &mut cache,
        &[SeqChunk {
            seq,
            tokens: &args.tokens,
        }],
        LogitsMode::AllTokens,
    )?;
    let vocab = model.spec().vocab;
    let mut out = std::io::stdout().lock();
    if args.json {
        let rows: Vec<&[f32]> = logits.chunks_exact(vocab).collect();
        writeln!(out, "{}", json!({ "logits": rows }))?;
    } else {
        for (pos, row) in logits.chunks_exact(vocab).enumerate() {
            let best = argmax(row);
            writeln!(
                out,
                "position {pos}: argmax {best} (logit {:.4})",
                row[best as usize]
            )?;
        }
    }
    Ok(())
}
