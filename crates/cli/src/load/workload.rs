//! What `sluice load` sends: prompt and output lengths (fixed or uniform), random-token or
//! file prompts, and Poisson arrival gaps, all from one seeded generator.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// A length, fixed (`128`) or drawn uniformly from an inclusive range (`64..256`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Length {
    pub min: u32,
    pub max: u32,
}

impl FromStr for Length {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let number = |t: &str| {
            t.trim()
                .parse::<u32>()
                .map_err(|_| format!("`{s}`: expected N or MIN..MAX (token counts)"))
        };
        let (min, max) = match s.split_once("..") {
            Some((a, b)) => (number(a)?, number(b)?),
            None => {
                let n = number(s)?;
                (n, n)
            }
        };
        if min == 0 || min > max {
            return Err(format!("`{s}`: lengths must be at least 1, MIN ≤ MAX"));
        }
        Ok(Length { min, max })
    }
}

/// An open loop's rates over time: `RPS:SECONDS,RPS:SECONDS,...` (e.g. `100:10,1000:10,100:20`
/// for a tenfold flash crowd of 10 s between two calm stretches).
#[derive(Debug, Clone, PartialEq)]
pub struct Phases(pub Vec<(f64, f64)>);

impl FromStr for Phases {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}`: expected RPS:SECONDS[,RPS:SECONDS...], each positive");
        let mut phases = Vec::new();
        for part in s.split(',') {
            let (rps, secs) = part.split_once(':').ok_or_else(bad)?;
            let rps: f64 = rps.trim().parse().map_err(|_| bad())?;
            let secs: f64 = secs.trim().parse().map_err(|_| bad())?;
            if !(rps.is_finite() && rps > 0.0 && secs.is_finite() && secs > 0.0) {
                return Err(bad());
            }
            phases.push((rps, secs));
        }
        Ok(Phases(phases))
    }
}

impl Phases {
    /// The rate `t` seconds into the run (the last phase's once they are over).
    pub fn rate_at(&self, t: f64) -> f64 {
        let mut end = 0.0;
        for &(rps, secs) in &self.0 {
            end += secs;
            if t < end {
                return rps;
            }
        }
        self.0.last().map_or(1.0, |p| p.0)
    }

    pub fn seconds(&self) -> f64 {
        self.0.iter().map(|p| p.1).sum()
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(r, s)| format!("{r}:{s}")).collect();
        write!(f, "{}", parts.join(","))
    }
}

impl std::fmt::Display for Length {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}..{}", self.min, self.max)
        }
    }
}

/// SplitMix64: small, fast and seedable; statistical quality is ample for load shapes.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[0, n)`.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    pub fn length(&mut self, l: Length) -> u32 {
        l.min + self.below((l.max - l.min) as u64 + 1) as u32
    }

    /// Gap to the next arrival of a Poisson process with `rate` per second.
    pub fn exponential_gap(&mut self, rate: f64) -> Duration {
        let u = 1.0 - self.unit(); // (0, 1]: ln never sees 0
        Duration::from_secs_f64(-u.ln() / rate)
    }
}

/// One request's prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Tokens(Vec<u32>),
    Text(String),
}

/// Where prompts come from.
#[derive(Debug, Clone)]
pub enum PromptSource {
    /// Token ids uniform over the vocabulary, `length` long.
    Random { vocab: u32, length: Length },
    /// Lines of a file, in turn.
    File(Vec<String>),
}

impl PromptSource {
    /// Prompts from a file: one per line, either plain text or a JSON string (for prompts
    /// with newlines); empty lines are skipped.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading prompts from {}", path.display()))?;
        let prompts: Vec<String> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str::<String>(l).unwrap_or_else(|_| l.to_string()))
            .collect();
        if prompts.is_empty() {
            bail!("{} holds no prompt", path.display());
        }
        Ok(PromptSource::File(prompts))
    }

    /// The `index`-th prompt.
    pub fn prompt(&self, index: usize, rng: &mut Rng) -> Prompt {
        match self {
            PromptSource::Random { vocab, length } => {
                let n = rng.length(*length);
                Prompt::Tokens((0..n).map(|_| rng.below(*vocab as u64) as u32).collect())
            }
            PromptSource::File(lines) => Prompt::Text(lines[index % lines.len()].clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_parse_and_give_the_rate_of_each_stretch() {
        let p: Phases = "100:10,1000:2.5,50:5".parse().unwrap();
        assert_eq!(p.0, vec![(100.0, 10.0), (1000.0, 2.5), (50.0, 5.0)]);
        assert_eq!(p.seconds(), 17.5);
        assert_eq!(p.rate_at(0.0), 100.0);
        assert_eq!(p.rate_at(10.0), 1000.0);
        assert_eq!(p.rate_at(12.4), 1000.0);
        assert_eq!(p.rate_at(12.5), 50.0);
        assert_eq!(p.rate_at(99.0), 50.0);
        for bad in ["", "100", "100:0", "-1:5", "1:5,x:2"] {
            assert!(bad.parse::<Phases>().is_err(), "{bad}");
        }
    }

    #[test]
    fn lengths_parse_fixed_and_ranges() {
        assert_eq!("128".parse::<Length>(), Ok(Length { min: 128, max: 128 }));
        assert_eq!(
            "64..256".parse::<Length>(),
            Ok(Length { min: 64, max: 256 })
        );
        assert!("0".parse::<Length>().is_err());
        assert!("9..3".parse::<Length>().is_err());
        assert!("a..b".parse::<Length>().is_err());
    }

    #[test]
    fn uniform_lengths_cover_the_range_evenly() {
        let mut rng = Rng::new(1);
        let l = Length { min: 10, max: 13 };
        let mut counts = [0usize; 4];
        for _ in 0..40_000 {
            counts[(rng.length(l) - 10) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn poisson_gaps_have_the_rate_and_variance_of_an_exponential() {
        let mut rng = Rng::new(7);
        let rate = 250.0;
        let gaps: Vec<f64> = (0..100_000)
            .map(|_| rng.exponential_gap(rate).as_secs_f64())
            .collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
        // An exponential's mean and standard deviation are both 1/rate.
        assert!((mean * rate - 1.0).abs() < 0.02, "mean {mean}");
        assert!((var.sqrt() * rate - 1.0).abs() < 0.03, "sd {}", var.sqrt());
    }

    #[test]
    fn file_prompts_take_plain_lines_and_json_strings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.txt");
        std::fs::write(&path, "hello there\n\n\"two\\nlines\"\n").unwrap();
        let source = PromptSource::from_file(&path).unwrap();
        let mut rng = Rng::new(0);
        assert_eq!(
            source.prompt(0, &mut rng),
            Prompt::Text("hello there".into())
        );
        assert_eq!(
            source.prompt(1, &mut rng),
            Prompt::Text("two\nlines".into())
        );
        assert_eq!(
            source.prompt(2, &mut rng),
            Prompt::Text("hello there".into())
        );
    }
}
