//! Guided decoding: output held to a JSON schema, a regular expression or a Lark grammar.
//!
//! The constraint engine is llguidance (what vLLM and SGLang use): an Earley parser over a
//! derivative-based lexer that computes a step's allowed tokens against a trie of the
//! vocabulary's bytes in well under a millisecond, with bounded work per step (its
//! `ParserLimits`). Writing that here would be months; wrapping it is this file.
//!
//! A constraint is validated at the router ([`GrammarCompiler::check`]: the grammar is
//! compiled once against the tokenizer, an error names the field) and travels in
//! `WorkerSampling`. The worker that samples a token compiles it again and replays the tokens
//! generated before it took the request over (the prefill worker's first token, the tokens a
//! migrated request had sent), so every worker masks exactly as one process would.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use sluice_engine::{Sampled, Sampler, TokenMask};
use sluice_proto::v1 as pb;

use crate::error::{Result, RuntimeError};

/// A validated constraint: the wire's `Constraint`, its JSON schema parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Constraint {
    pub grammar: Grammar,
    /// Tokens up to and including the first of this id are free (a reasoning block).
    pub after_token: Option<u32>,
}

impl Constraint {
    /// The constraint `c` says (`None`: unset), refused naming `field` when it cannot be read.
    pub fn from_pb(c: Option<&pb::Constraint>, field: &str) -> Result<Option<Constraint>> {
        let Some(c) = c else {
            return Ok(None);
        };
        Ok(Grammar::from_pb(c, field)?.map(|grammar| Constraint {
            grammar,
            after_token: c.after_token,
        }))
    }

    pub fn to_pb(&self) -> pb::Constraint {
        pb::Constraint {
            kind: Some(self.grammar.to_pb()),
            after_token: self.after_token,
        }
    }
}

/// What the output (after `Constraint::after_token`) must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    JsonSchema(serde_json::Value),
    Regex(String),
    Lark(String),
}

impl Grammar {
    fn from_pb(c: &pb::Constraint, field: &str) -> Result<Option<Grammar>> {
        use pb::constraint::Kind;
        let Some(kind) = c.kind.as_ref() else {
            return Ok(None);
        };
        Ok(Some(match kind {
            Kind::JsonSchema(text) => {
                let schema: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                    RuntimeError::invalid(format!("{field}.json_schema"), format!("not JSON: {e}"))
                })?;
                if !(schema.is_object() || schema.is_boolean()) {
                    return Err(RuntimeError::invalid(
                        format!("{field}.json_schema"),
                        "a JSON schema is an object (or true/false)",
                    ));
                }
                Grammar::JsonSchema(schema)
            }
            Kind::Regex(rx) => Grammar::Regex(rx.clone()),
            Kind::Lark(lark) => Grammar::Lark(lark.clone()),
        }))
    }

    fn to_pb(&self) -> pb::constraint::Kind {
        use pb::constraint::Kind;
        match self {
            Grammar::JsonSchema(schema) => Kind::JsonSchema(schema.to_string()),
            Grammar::Regex(rx) => Kind::Regex(rx.clone()),
            Grammar::Lark(lark) => Kind::Lark(lark.clone()),
        }
    }

    /// The wire field this grammar came in, for errors.
    fn field(&self) -> &'static str {
        match self {
            Grammar::JsonSchema(_) => "json_schema",
            Grammar::Regex(_) => "regex",
            Grammar::Lark(_) => "lark",
        }
    }

    fn top_level(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonSchema(schema) => {
                let mut schema = schema.clone();
                // Compact JSON unless the schema says otherwise: with whitespace free, a
                // model can pad the output with blank lines until its budget runs out (a
                // known failure of guided decoding), and the answer never closes.
                if let Some(obj) = schema.as_object_mut()
                    && !obj.contains_key("x-guidance")
                {
                    obj.insert(
                        "x-guidance".into(),
                        serde_json::json!({ "whitespace_flexible": false }),
                    );
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Grammar::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        }
    }
}

/// Compiles constraints against one checkpoint's tokenizer. The vocabulary's trie is built on
/// the first constrained request, or ahead of it by [`GrammarCompiler::warm_up`].
pub struct GrammarCompiler {
    tokenizer: PathBuf,
    vocab: usize,
    eos: Vec<u32>,
    factory: OnceLock<std::result::Result<ParserFactory, String>>,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("tokenizer", &self.tokenizer)
            .field("vocab", &self.vocab)
            .field("compiled", &self.factory.get().is_some())
            .finish()
    }
}

impl GrammarCompiler {
    /// For the checkpoint in `dir`: its `tokenizer.json`, the model's vocabulary size (rows
    /// past the tokenizer's are never allowed) and its end-of-sequence ids (allowed once the
    /// grammar accepts).
    pub fn new(dir: &Path, vocab: usize, eos: &[u32]) -> Arc<Self> {
        Arc::new(GrammarCompiler {
            tokenizer: dir.join("tokenizer.json"),
            vocab,
            eos: eos.to_vec(),
            factory: OnceLock::new(),
        })
    }

    /// Builds the vocabulary's trie now, on a thread of its own, so that the first
    /// constrained request does not wait for it (nor block the thread that checks it).
    pub fn warm_up(self: &Arc<Self>) {
        let compiler = self.clone();
        let spawned = std::thread::Builder::new()
            .name("sluice-grammar-warm-up".into())
            .spawn(move || {
                if let Err(e) = compiler.factory() {
                    tracing::warn!("{e}");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("grammar warm-up thread: {e}");
        }
    }

    fn factory(&self) -> Result<&ParserFactory> {
        self.factory
            .get_or_init(|| self.build_factory())
            .as_ref()
            .map_err(|e| RuntimeError::Internal(format!("guided decoding unavailable: {e}")))
    }

    fn build_factory(&self) -> std::result::Result<ParserFactory, String> {
        let path = &self.tokenizer;
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if words.len() > self.vocab {
            return Err(format!(
                "{} has {} tokens, more than the model's {} rows",
                path.display(),
                words.len(),
                self.vocab
            ));
        }
        // Padding rows of the embedding: no bytes, never allowed.
        words.resize(self.vocab, Vec::new());
        let first_eos = *self
            .eos
            .first()
            .ok_or("the model names no end-of-sequence token")?;
        let info = TokRxInfo::new(self.vocab as u32, first_eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&self.eos);
        // Sampling picks one token at a time from the mask, so the tokenizer is only needed
        // for the trie; the approximate environment never re-tokenizes text we generate.
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(factory)
    }

    fn matcher(&self, grammar: &Grammar) -> Result<Matcher> {
        let factory = self.factory()?;
        let parser = factory
            .create_parser(grammar.top_level())
            .map_err(|e| RuntimeError::invalid(grammar.field(), e.to_string()))?;
        Ok(Matcher::new(Ok(parser)))
    }

    /// Refuses a constraint that does not compile, naming `field` (the request field it
    /// came in) or one whose `after_token` is not in the vocabulary.
    pub fn check(&self, constraint: &Constraint, field: &str) -> Result<()> {
        if let Some(t) = constraint.after_token
            && t as usize >= self.vocab
        {
            return Err(RuntimeError::invalid(
                format!("{field}.after_token"),
                format!(
                    "token id {t} is not below the vocabulary size {}",
                    self.vocab
                ),
            ));
        }
        let grammar = &constraint.grammar;
        let mut matcher = self.matcher(grammar).map_err(|e| match e {
            RuntimeError::InvalidArgument {
                field: kind,
                message,
            } => RuntimeError::invalid(format!("{field}.{kind}"), message),
            other => other,
        })?;
        // A grammar can compile and still allow nothing at its start (an empty language).
        let mask = matcher.compute_mask().map_err(|e| {
            RuntimeError::invalid(format!("{field}.{}", grammar.field()), e.to_string())
        })?;
        if mask.is_zero() {
            return Err(RuntimeError::invalid(
                format!("{field}.{}", grammar.field()),
                "no output satisfies it",
            ));
        }
        Ok(())
    }

    /// A guide at the point where `generated` (tokens already produced for this request)
    /// leaves it.
    pub fn guide(&self, constraint: &Constraint, generated: &[u32]) -> Result<TokenGuide> {
        let mut guide = TokenGuide {
            matcher: self.matcher(&constraint.grammar)?,
            mask: SimpleVob::alloc(self.vocab),
            prepared: None,
            after_token: constraint.after_token,
        };
        for &t in generated {
            guide
                .accept(t)
                .map_err(|e| RuntimeError::Internal(format!("replaying generated tokens: {e}")))?;
        }
        Ok(guide)
    }
}

/// One request's place in its grammar.
pub struct TokenGuide {
    matcher: Matcher,
    /// The last mask computed (kept to lend it to the sampler).
    mask: SimpleVob,
    /// `mask` was computed ahead, for the next step (`prepare`), with this outcome.
    prepared: Option<Result<()>>,
    /// Until this token has been generated, tokens are free (and not fed to the matcher).
    after_token: Option<u32>,
}

impl TokenGuide {
    /// The tokens the next step may pick: what keeps the output inside the grammar, plus
    /// end-of-sequence where the grammar accepts (only it once the grammar is complete).
    fn mask(&mut self) -> Result<Option<TokenMask<'_>>> {
        if self.after_token.is_some() {
            return Ok(None);
        }
        match self.prepared.take() {
            Some(outcome) => outcome?,
            None => self.compute()?,
        }
        Ok(Some(TokenMask(self.mask.as_slice())))
    }

    /// Computes the next step's mask now — it depends only on the tokens accepted so far, so
    /// it can be made while the step's forward runs — for `mask` to use.
    fn prepare(&mut self) {
        if self.after_token.is_none() && self.prepared.is_none() {
            self.prepared = Some(self.compute());
        }
    }

    fn compute(&mut self) -> Result<()> {
        self.mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| RuntimeError::invalid("constraint", e.to_string()))?;
        if self.mask.is_zero() {
            return Err(RuntimeError::invalid(
                "constraint",
                "the grammar allows no token here",
            ));
        }
        Ok(())
    }

    fn accept(&mut self, token: u32) -> Result<()> {
        // A mask made ahead was for the state before this token.
        self.prepared = None;
        if let Some(after) = self.after_token {
            if token == after {
                self.after_token = None;
            }
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| RuntimeError::invalid("constraint", e.to_string()))
    }

    /// The grammar is complete and allows nothing more.
    pub fn is_complete(&self) -> bool {
        self.after_token.is_none() && self.matcher.is_stopped()
    }
}

/// A request's sampler and, when it is constrained, its guide: the one place a worker picks
/// a token.
pub struct GuidedSampler {
    sampler: Sampler,
    guide: Option<TokenGuide>,
}

impl GuidedSampler {
    pub fn new(sampler: Sampler, guide: Option<TokenGuide>) -> Self {
        GuidedSampler { sampler, guide }
    }

    /// Picks the next token from `logits` (masked by the guide) and advances the guide.
    pub fn sample(&mut self, logits: &[f32]) -> Result<Sampled> {
        let Some(guide) = self.guide.as_mut() else {
            return Ok(self.sampler.sample(logits));
        };
        let mask = guide.mask()?;
        let sampled = self.sampler.sample_within(logits, mask);
        guide.accept(sampled.token)?;
        Ok(sampled)
    }

    /// Whether a grammar guides this sampler's picks.
    pub fn is_guided(&self) -> bool {
        self.guide.is_some()
    }

    /// Makes the next pick's mask ahead of the logits (off the step's critical path: the
    /// decode scheduler calls it on a thread of its own while the forward runs). `sample`
    /// computes it itself when this was not called; the picks are the same either way.
    pub fn prepare_mask(&mut self) {
        if let Some(guide) = self.guide.as_mut() {
            guide.prepare();
        }
    }

    /// The constraint is satisfied and admits nothing more: the sequence is over.
    pub fn grammar_complete(&self) -> bool {
        self.guide.as_ref().is_some_and(TokenGuide::is_complete)
    }

    pub fn rng_state(&self) -> u64 {
        self.sampler.rng_state()
    }
}

/// A guide for `constraint` past `generated`, compiled off the async threads (a schema takes
/// about a millisecond; a call before the trie is built waits for it). Without a compiler (a worker
/// started without its tokenizer) constrained requests are refused.
pub async fn start_guide(
    compiler: Option<&Arc<GrammarCompiler>>,
    constraint: Constraint,
    generated: Vec<u32>,
) -> Result<TokenGuide> {
    let compiler = compiler.cloned().ok_or_else(|| {
        RuntimeError::invalid(
            "constraint",
            "this worker runs without a tokenizer: guided decoding is off",
        )
    })?;
    tokio::task::spawn_blocking(move || compiler.guide(&constraint, &generated))
        .await
        .map_err(|e| RuntimeError::Internal(format!("grammar compilation panicked: {e}")))?
}

impl GrammarCompiler {
    /// For the checkpoint in `dir` (its `config.json` names the vocabulary, its generation
    /// config the end-of-sequence ids).
    /// The trie is built in the background from now on (`warm_up`).
    pub fn for_checkpoint(dir: &Path) -> Result<Arc<Self>> {
        let spec = sluice_engine::config::load_spec(dir)?;
        let eos = sluice_engine::generation::eos_token_ids(dir, &spec)?;
        let compiler = GrammarCompiler::new(dir, spec.vocab, &eos);
        compiler.warm_up();
        Ok(compiler)
    }
}
