//! `sluice generate`: one prompt, streamed to stdout, or `--json` at the end.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::json;
use sluice_engine::generation::eos_token_ids;
use sluice_engine::{
    ChatMessage, GenerationRequest, IncrementalDecoder, SamplingParams, Tokenizer, generate,
};

use crate::model_source::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt token ids, comma-separated (e.g. 1,2,3).
    #[arg(
        long,
        value_delimiter = ',',
        conflicts_with = "prompt",
        required_unless_present = "prompt"
    )]
    pub tokens: Option<Vec<u32>>,
    /// Prompt text (tokenised with the model's tokenizer).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Apply the model's chat template to --prompt as one user turn.
    #[arg(long, requires = "prompt")]
    pub chat: bool,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print `{"token_ids": [...], "text": "..."}` of the generated tokens only.
    #[arg(long)]
    pub json: bool,
    /// Generate through a running Sluice endpoint (e.g. http://127.0.0.1:50051) instead of
    /// loading the model here.
    #[arg(long, env = "SLUICE_ENDPOINT")]
    pub endpoint: Option<String>,
    /// With --endpoint: print chunks as they arrive (GenerateStream) instead of one answer.
    #[arg(long, requires = "endpoint")]
    pub stream: bool,
    /// Prompt tokens per forward pass during prefill.
    #[arg(long, default_value_t = sluice_engine::DEFAULT_PREFILL_CHUNK)]
    pub prefill_chunk: usize,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub frequency_penalty: f32,
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            top_logprobs: 0,
            logprobs: false,
            logit_bias: Vec::new(),
        }
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if let Some(endpoint) = args.endpoint.clone() {
        return crate::remote::generate(&endpoint, &args);
    }
    let sampling = args.sampling.params();
    sampling.validate()?;
    let (dir, model) = args.model.load()?;
    let tokenizer = if dir.join("tokenizer.json").exists() {
        Some(Tokenizer::from_dir(&dir)?)
    } else {
        None
    };
    let prompt = match (&args.tokens, &args.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => {
            let tok = tokenizer
                .as_ref()
                .with_context(|| format!("{} has no tokenizer.json", dir.display()))?;
            let text = if args.chat {
                tok.apply_chat_template(&[ChatMessage::user(text.as_str())], true)?
            } else {
                text.clone()
            };
            tok.encode(&text)?
        }
        (None, None) => bail!("give --tokens or --prompt"),
    };
    let eos = eos_token_ids(&dir, model.spec())?;
    let request = GenerationRequest {
        prompt,
        max_tokens: args.max_tokens,
        sampling,
        ignore_eos: args.ignore_eos,
        prefill_chunk: args.prefill_chunk,
    };
    let mut decoder = IncrementalDecoder::new(true);
    let mut stdout = std::io::stdout().lock();
    let start = Instant::now();
    let output = generate(&model, &request, &eos, |s| {
        if let (false, Some(tok)) = (args.json, &tokenizer) {
            let piece = decoder.push(tok, s.token)?;
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        }
        Ok(())
    })?;
    let elapsed = start.elapsed();
    let ids: Vec<u32> = output.tokens.iter().map(|s| s.token).collect();
    if args.json {
        let text = match &tokenizer {
            Some(tok) => tok.decode(&ids, true)?,
            None => String::new(),
        };
        writeln!(stdout, "{}", json!({"token_ids": ids, "text": text}))?;
    } else {
        match &tokenizer {
            Some(tok) => writeln!(stdout, "{}", decoder.finish(tok)?)?,
            None => writeln!(
                stdout,
                "{}",
                ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
            )?,
        }
        eprintln!(
            "{} prompt + {} generated tokens in {:.2}s ({:?})",
            request.prompt.len(),
            ids.len(),
            elapsed.as_secs_f64(),
            output.finish
        );
    }
    Ok(())
}
