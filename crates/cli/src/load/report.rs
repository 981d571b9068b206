//! What `sluice load` measured: latency distributions (HDR histograms, microseconds),
//! throughput, errors by status, how fast refusals came back, and goodput under the SLOs —
//! overall and second by second (by when each request was issued), so a flash crowd and
//! the recovery after it show.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// One request's outcome, as the driver saw it.
#[derive(Debug, Clone)]
pub struct Sample {
    pub prompt_tokens: u32,
    pub outcome: Outcome,
    /// When it was sent, and how long until it finished (or was refused).
    pub issued: Instant,
    pub latency: Duration,
}

/// Statuses that mean "refused for load": the server said no at once, by design.
pub fn is_refusal(status: &str) -> bool {
    matches!(status, "RESOURCE_EXHAUSTED" | "HTTP 429")
}

/// One second of the run, by issue time.
#[derive(Debug, Clone, Copy, Default)]
struct Second {
    issued: u64,
    good: u64,
    completed: u64,
    refused: u64,
    failed: u64,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Done {
        /// Time to the first token.
        ttft: Duration,
        /// Arrival to last token.
        e2e: Duration,
        /// Gap before each token after the first (a chunk of k tokens counts k gaps of 1/k).
        itl: Vec<Duration>,
        output_tokens: u32,
    },
    /// The status (`RESOURCE_EXHAUSTED`, `HTTP 429`, ...) and one message.
    Failed { status: String, message: String },
}

/// Service-level objectives: a request is good when it meets every one given.
#[derive(Debug, Clone, Copy, Default)]
pub struct Slo {
    pub ttft: Option<Duration>,
    pub tpot: Option<Duration>,
}

pub struct Stats {
    ttft: Histogram<u64>,
    itl: Histogram<u64>,
    tpot: Histogram<u64>,
    e2e: Histogram<u64>,
    completed: u64,
    good: u64,
    prompt_tokens: u64,
    output_tokens: u64,
    errors: BTreeMap<String, (u64, String)>,
    refusal: Histogram<u64>,
    slo: Slo,
    origin: Instant,
    seconds: Vec<Second>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to an hour at 3 significant digits; grows beyond if it must.
    let mut h = Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| {
        Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits are valid"))
    });
    h.auto(true);
    h
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

/// Time per output token after the first; `None` for one-token outputs.
pub fn tpot(ttft: Duration, e2e: Duration, output_tokens: u32) -> Option<Duration> {
    (output_tokens > 1).then(|| e2e.saturating_sub(ttft) / (output_tokens - 1))
}

impl Stats {
    /// Seconds of the timeline count from `origin`.
    pub fn new(slo: Slo, origin: Instant) -> Self {
        Stats {
            ttft: histogram(),
            itl: histogram(),
            tpot: histogram(),
            e2e: histogram(),
            completed: 0,
            good: 0,
            prompt_tokens: 0,
            output_tokens: 0,
            errors: BTreeMap::new(),
            refusal: histogram(),
            slo,
            origin,
            seconds: Vec::new(),
        }
    }

    fn second(&mut self, issued: Instant) -> &mut Second {
        let i = issued.saturating_duration_since(self.origin).as_secs() as usize;
        if self.seconds.len() <= i {
            self.seconds.resize(i + 1, Second::default());
        }
        &mut self.seconds[i]
    }

    pub fn completed(&self) -> u64 {
        self.completed
    }

    pub fn failed(&self) -> u64 {
        self.errors.values().map(|(n, _)| n).sum()
    }

    pub fn record(&mut self, sample: Sample) {
        self.second(sample.issued).issued += 1;
        match sample.outcome {
            Outcome::Done {
                ttft,
                e2e,
                itl,
                output_tokens,
            } => {
                self.completed += 1;
                self.prompt_tokens += sample.prompt_tokens as u64;
                self.output_tokens += output_tokens as u64;
                // Saturating: a value past the histogram's range is clamped, never lost.
                self.ttft.saturating_record(micros(ttft));
                self.e2e.saturating_record(micros(e2e));
                for gap in itl {
                    self.itl.saturating_record(micros(gap));
                }
                let per_token = tpot(ttft, e2e, output_tokens);
                if let Some(t) = per_token {
                    self.tpot.saturating_record(micros(t));
                }
                let ttft_ok = self.slo.ttft.is_none_or(|limit| ttft <= limit);
                let tpot_ok = self
                    .slo
                    .tpot
                    .is_none_or(|limit| per_token.is_none_or(|t| t <= limit));
                let good = ttft_ok && tpot_ok;
                if good {
                    self.good += 1;
                }
                let second = self.second(sample.issued);
                second.completed += 1;
                second.good += u64::from(good);
            }
            Outcome::Failed { status, message } => {
                let refused = is_refusal(&status);
                if refused {
                    self.refusal.saturating_record(micros(sample.latency));
                }
                let second = self.second(sample.issued);
                if refused {
                    second.refused += 1;
                } else {
                    second.failed += 1;
                }
                let entry = self.errors.entry(status).or_insert((0, message));
                entry.0 += 1;
            }
        }
    }

    /// The report over a measured window of `elapsed`.
    pub fn report(&self, elapsed: Duration, setup: Value, generator_cpu: Duration) -> Value {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let total = self.completed + self.failed();
        let latency = |h: &Histogram<u64>| {
            if h.is_empty() {
                return Value::Null;
            }
            let ms = |v: u64| v as f64 / 1000.0;
            json!({
                "mean": h.mean() / 1000.0,
                "p50": ms(h.value_at_quantile(0.50)),
                "p90": ms(h.value_at_quantile(0.90)),
                "p99": ms(h.value_at_quantile(0.99)),
                "max": ms(h.max()),
            })
        };
        let errors: serde_json::Map<String, Value> = self
            .errors
            .iter()
            .map(|(status, (n, message))| (status.clone(), json!({"count": n, "example": message})))
            .collect();
        let slo_given = self.slo.ttft.is_some() || self.slo.tpot.is_some();
        let timeline: Vec<Value> = self
            .seconds
            .iter()
            .enumerate()
            .map(|(t, s)| {
                json!({
                    "t": t, "issued": s.issued, "completed": s.completed, "good": s.good,
                    "refused": s.refused, "failed": s.failed,
                })
            })
            .collect();
        json!({
            "setup": setup,
            "duration_s": secs,
            "requests": {"completed": self.completed, "failed": self.failed(), "errors": errors},
            "throughput": {
                "requests_per_s": self.completed as f64 / secs,
                "output_tokens_per_s": self.output_tokens as f64 / secs,
                "prompt_tokens_per_s": self.prompt_tokens as f64 / secs,
            },
            "tokens": {"prompt": self.prompt_tokens, "output": self.output_tokens},
            "ttft_ms": latency(&self.ttft),
            "itl_ms": latency(&self.itl),
            "tpot_ms": latency(&self.tpot),
            "e2e_ms": latency(&self.e2e),
            // From sending a request to its refusal (RESOURCE_EXHAUSTED, HTTP 429).
            "refusal_ms": latency(&self.refusal),
            // Per second of issue time: requests issued, completed, good (within every SLO;
            // all completed when none is given), refused and failed otherwise.
            "timeline": timeline,
            "goodput": if slo_given {
                json!({
                    "slo_ttft_ms": self.slo.ttft.map(|d| d.as_secs_f64() * 1000.0),
                    "slo_tpot_ms": self.slo.tpot.map(|d| d.as_secs_f64() * 1000.0),
                    // Failed requests count against the share: they met no objective.
                    "share": if total > 0 { self.good as f64 / total as f64 } else { 0.0 },
                    "good": self.good,
                    "requests_per_s": self.good as f64 / secs,
                })
            } else {
                Value::Null
            },
            "generator": {
                "cpu_s": generator_cpu.as_secs_f64(),
                "cpu_per_request_ms": if total > 0 {
                    generator_cpu.as_secs_f64() * 1000.0 / total as f64
                } else {
                    0.0
                },
                "cores_busy": generator_cpu.as_secs_f64() / secs,
            },
        })
    }
}

/// The report for people.
pub fn human(report: &Value, out: &mut impl std::io::Write) -> Result<()> {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let setup = &report["setup"];
    writeln!(
        out,
        "sluice load: {}",
        setup["summary"].as_str().unwrap_or("")
    )?;
    let r = &report["requests"];
    writeln!(
        out,
        "  requests   {} completed, {} failed in {:.2} s",
        r["completed"],
        r["failed"],
        f(&report["duration_s"])
    )?;
    if let Some(errors) = r["errors"].as_object() {
        for (status, e) in errors {
            writeln!(
                out,
                "    {status:<20} {:>6}  e.g. {}",
                e["count"],
                e["example"].as_str().unwrap_or("")
            )?;
        }
    }
    let t = &report["throughput"];
    writeln!(
        out,
        "  throughput {:.1} req/s, {:.1} output tok/s, {:.1} prompt tok/s",
        f(&t["requests_per_s"]),
        f(&t["output_tokens_per_s"]),
        f(&t["prompt_tokens_per_s"])
    )?;
    writeln!(
        out,
        "  {:<10} {:>9} {:>9} {:>9} {:>9} {:>9}  (ms)",
        "", "mean", "p50", "p90", "p99", "max"
    )?;
    for (name, key) in [
        ("TTFT", "ttft_ms"),
        ("ITL", "itl_ms"),
        ("TPOT", "tpot_ms"),
        ("E2E", "e2e_ms"),
        ("refusal", "refusal_ms"),
    ] {
        let l = &report[key];
        if l.is_null() {
            writeln!(out, "  {name:<10} {:>9}", "-")?;
            continue;
        }
        writeln!(
            out,
            "  {name:<10} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            f(&l["mean"]),
            f(&l["p50"]),
            f(&l["p90"]),
            f(&l["p99"]),
            f(&l["max"])
        )?;
    }
    let g = &report["goodput"];
    if !g.is_null() {
        let slo = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x} ms"));
        writeln!(
            out,
            "  goodput    {:.1} % of requests within TTFT ≤ {} and TPOT ≤ {} ({:.1} req/s)",
            100.0 * f(&g["share"]),
            slo(&g["slo_ttft_ms"]),
            slo(&g["slo_tpot_ms"]),
            f(&g["requests_per_s"])
        )?;
    }
    if let Some(timeline) = report["timeline"].as_array()
        && timeline.len() > 1
    {
        // Good requests per second of issue time, then refused ones: a flash crowd and the
        // recovery after it, at a glance.
        let row = |key: &str| {
            timeline
                .iter()
                .map(|s| s[key].as_u64().unwrap_or(0).to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        writeln!(out, "  good/s     {}", row("good"))?;
        writeln!(out, "  refused/s  {}", row("refused"))?;
    }
    let gen_cpu = &report["generator"];
    writeln!(
        out,
        "  generator  {:.3} ms CPU per request, {:.2} cores busy",
        f(&gen_cpu["cpu_per_request_ms"]),
        f(&gen_cpu["cores_busy"])
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(origin: Instant, ttft_ms: u64, e2e_ms: u64, tokens: u32) -> Sample {
        let ttft = Duration::from_millis(ttft_ms);
        let e2e = Duration::from_millis(e2e_ms);
        let gap = (e2e - ttft) / (tokens - 1).max(1);
        Sample {
            prompt_tokens: 10,
            outcome: Outcome::Done {
                ttft,
                e2e,
                itl: vec![gap; tokens as usize - 1],
                output_tokens: tokens,
            },
            // Request i is issued at i × 10 ms.
            issued: origin + Duration::from_millis(ttft_ms * 10),
            latency: e2e,
        }
    }

    #[test]
    fn percentiles_throughput_and_goodput() {
        let origin = Instant::now();
        let mut s = Stats::new(
            Slo {
                ttft: Some(Duration::from_millis(50)),
                tpot: Some(Duration::from_millis(10)),
            },
            origin,
        );
        // 100 requests: TTFT 1..=100 ms, 11 tokens, 5 ms per token after the first, issued
        // 10 ms × their TTFT after the start (TTFT ≤ 50 ms: the first half second).
        for i in 1..=100u64 {
            s.record(done(origin, i, i + 50, 11));
        }
        s.record(Sample {
            prompt_tokens: 10,
            outcome: Outcome::Failed {
                status: "RESOURCE_EXHAUSTED".into(),
                message: "full".into(),
            },
            issued: origin + Duration::from_millis(1500),
            latency: Duration::from_millis(2),
        });
        let r = s.report(
            Duration::from_secs(2),
            json!({}),
            Duration::from_millis(101),
        );
        let close = |v: &Value, want: f64| (v.as_f64().unwrap() - want).abs() <= want * 0.002;
        assert!(close(&r["ttft_ms"]["p50"], 50.0), "{}", r["ttft_ms"]);
        assert!(close(&r["ttft_ms"]["p99"], 99.0), "{}", r["ttft_ms"]);
        assert!(close(&r["ttft_ms"]["max"], 100.0));
        assert!(close(&r["tpot_ms"]["p50"], 5.0), "{}", r["tpot_ms"]);
        assert!(close(&r["itl_ms"]["max"], 5.0));
        assert_eq!(r["requests"]["completed"], 100);
        assert_eq!(r["requests"]["errors"]["RESOURCE_EXHAUSTED"]["count"], 1);
        assert!(close(&r["throughput"]["requests_per_s"], 50.0));
        assert!(close(&r["throughput"]["output_tokens_per_s"], 550.0));
        // TTFT ≤ 50 ms for 50 of them; all meet TPOT; the failure counts as missed.
        assert!(
            close(&r["goodput"]["share"], 50.0 / 101.0),
            "{}",
            r["goodput"]
        );
        assert!(close(&r["generator"]["cpu_per_request_ms"], 1.0));
        // The refusal took 2 ms; by second: 99 issued in the first (the 50 good ones among
        // them: TTFT ≤ 50 ms), request 100 at exactly 1 s, the refusal at 1.5 s.
        assert!(close(&r["refusal_ms"]["p99"], 2.0), "{}", r["refusal_ms"]);
        let t = &r["timeline"];
        assert_eq!(t[0]["issued"], 99, "{t}");
        assert_eq!(t[0]["good"], 50, "{t}");
        assert_eq!(t[0]["completed"], 99, "{t}");
        assert_eq!(t[1]["issued"], 2, "{t}");
        assert_eq!(t[1]["good"], 0, "{t}");
        assert_eq!(t[1]["refused"], 1, "{t}");
        let mut text = Vec::new();
        human(&r, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("RESOURCE_EXHAUSTED"), "{text}");
        assert!(text.contains("goodput"), "{text}");
    }

    #[test]
    fn tpot_excludes_the_first_token() {
        let t = tpot(Duration::from_millis(100), Duration::from_millis(190), 10);
        assert_eq!(t, Some(Duration::from_millis(10)));
        assert_eq!(
            tpot(Duration::from_millis(5), Duration::from_millis(5), 1),
            None
        );
    }
}
