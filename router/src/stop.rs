//! Stop strings matched across token boundaries: text that could still be the start of a stop
//! string is held back until it is known not to be, and the stop string itself never reaches
//! the client.

#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Decoded text not yet released.
    held: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops,
            held: String::new(),
        }
    }

    /// Adds newly decoded text; returns what can be released now and whether a stop string
    /// was found (then nothing after it is ever released).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (text.to_string(), false);
        }
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Keep the longest tail that is a proper prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// Whatever is held at the end of the generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length in bytes of the longest suffix of `text` that is a proper prefix of `stop`, cut on
/// character boundaries.
pub(crate) fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = (stop.len().saturating_sub(1)).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start) && stop.starts_with(&text[start..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (text, stopped) = m.push(p);
            out.push_str(&text);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn matches_across_pieces_and_drops_the_stop_string() {
        assert_eq!(
            run(&["END"], &["abc E", "N", "D tail"]),
            ("abc ".into(), true)
        );
        assert_eq!(run(&["\n\n"], &["one\n", "\ntwo"]), ("one".into(), true));
        assert_eq!(
            run(&["xyz"], &["ab", "x", "y", "q"]),
            ("abxyq".into(), false)
        );
        assert_eq!(run(&[], &["free ", "text"]), ("free text".into(), false));
        assert_eq!(run(&["ö!"], &["aö", "ö", "!"]), ("aö".into(), true));
        // The earliest of several stop strings wins.
        assert_eq!(run(&["cd", "b"], &["abcd"]), ("a".into(), true));
    }
}
