//! Prometheus metrics: counters, gauges and histograms in families with labels, registered
//! once per process and rendered in the text exposition format (`/metrics`). Updates are
//! atomic and lock-free; only creating a new label set takes a lock.
//!
//! Names start with `sluice_`; a worker's series carry its `worker` label so that `sluice up`
//! (every role in one process) and the tests (several workers in one process) keep them apart.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Latency buckets, in seconds: 1 ms to 2 min.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// An `f64` updated atomically.
#[derive(Debug, Default)]
struct AtomicF64(AtomicU64);

impl AtomicF64 {
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }

    fn add(&self, v: f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((f64::from_bits(b) + v).to_bits())
            });
    }
}

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicF64);

impl Counter {
    pub fn inc(&self) {
        self.0.add(1.0);
    }

    pub fn add(&self, v: f64) {
        self.0.add(v);
    }

    pub fn get(&self) -> f64 {
        self.0.get()
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicF64);

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.set(v);
    }

    pub fn add(&self, v: f64) {
        self.0.add(v);
    }

    pub fn get(&self) -> f64 {
        self.0.get()
    }
}

/// Observations counted into fixed buckets, with their sum.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last is +Inf.
    counts: Vec<AtomicU64>,
    sum: AtomicF64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicF64::default(),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum.add(v);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

enum Kind {
    Counter,
    Gauge,
    Histogram(&'static [f64]),
}

enum Series {
    Counter(Arc<Counter>),
    Gauge(Arc<Gauge>),
    Histogram(Arc<Histogram>),
}

struct Family {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    kind: Kind,
    series: Mutex<BTreeMap<Vec<String>, Series>>,
}

/// Every metric family of the process.
#[derive(Default)]
pub struct Registry {
    families: Mutex<Vec<Arc<Family>>>,
}

/// The process-wide registry `/metrics` renders.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Metrics stay usable after a panic elsewhere: the maps are valid at every point.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// The family `name`, registered on first use (later calls must agree on its kind).
    fn family(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        kind: Kind,
    ) -> Arc<Family> {
        let mut families = lock(&self.families);
        if let Some(f) = families.iter().find(|f| f.name == name) {
            return f.clone();
        }
        let f = Arc::new(Family {
            name,
            help,
            labels,
            kind,
            series: Mutex::new(BTreeMap::new()),
        });
        families.push(f.clone());
        f
    }

    pub fn counter(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> CounterFamily {
        CounterFamily(self.family(name, help, labels, Kind::Counter))
    }

    pub fn gauge(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> GaugeFamily {
        GaugeFamily(self.family(name, help, labels, Kind::Gauge))
    }

    pub fn histogram(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        buckets: &'static [f64],
    ) -> HistogramFamily {
        HistogramFamily(self.family(name, help, labels, Kind::Histogram(buckets)))
    }

    /// The text exposition format, families in registration order.
    pub fn render(&self) -> String {
        let families: Vec<Arc<Family>> = lock(&self.families).clone();
        let mut out = String::new();
        for f in families {
            f.render(&mut out);
        }
        out
    }
}

impl Family {
    fn series(&self, values: &[&str]) -> Series {
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        let mut series = lock(&self.series);
        let s = series.entry(key).or_insert_with(|| match self.kind {
            Kind::Counter => Series::Counter(Arc::default()),
            Kind::Gauge => Series::Gauge(Arc::default()),
            Kind::Histogram(b) => Series::Histogram(Arc::new(Histogram::new(b))),
        });
        match s {
            Series::Counter(c) => Series::Counter(c.clone()),
            Series::Gauge(g) => Series::Gauge(g.clone()),
            Series::Histogram(h) => Series::Histogram(h.clone()),
        }
    }

    fn render(&self, out: &mut String) {
        let kind = match self.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram(_) => "histogram",
        };
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {kind}", self.name);
        for (values, series) in lock(&self.series).iter() {
            let labels = self.label_text(values, None);
            match series {
                Series::Counter(c) => {
                    let _ = writeln!(out, "{}{labels} {}", self.name, c.get());
                }
                Series::Gauge(g) => {
                    let _ = writeln!(out, "{}{labels} {}", self.name, g.get());
                }
                Series::Histogram(h) => {
                    let mut cumulative = 0;
                    for (i, c) in h.counts.iter().enumerate() {
                        cumulative += c.load(Ordering::Relaxed);
                        let le = h
                            .bounds
                            .get(i)
                            .map_or("+Inf".to_string(), |b| b.to_string());
                        let labels = self.label_text(values, Some(&le));
                        let _ = writeln!(out, "{}_bucket{labels} {cumulative}", self.name);
                    }
                    let _ = writeln!(out, "{}_sum{labels} {}", self.name, h.sum.get());
                    let _ = writeln!(out, "{}_count{labels} {cumulative}", self.name);
                }
            }
        }
    }

    fn label_text(&self, values: &[String], le: Option<&str>) -> String {
        let mut pairs: Vec<String> = self
            .labels
            .iter()
            .zip(values)
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        if let Some(le) = le {
            pairs.push(format!("le=\"{le}\""));
        }
        if pairs.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", pairs.join(","))
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Handles to one family's series, by label values (in the family's label order).
pub struct CounterFamily(Arc<Family>);
pub struct GaugeFamily(Arc<Family>);
pub struct HistogramFamily(Arc<Family>);

impl CounterFamily {
    pub fn with(&self, values: &[&str]) -> Arc<Counter> {
        match self.0.series(values) {
            Series::Counter(c) => c,
            _ => Arc::default(),
        }
    }
}

impl GaugeFamily {
    pub fn with(&self, values: &[&str]) -> Arc<Gauge> {
        match self.0.series(values) {
            Series::Gauge(g) => g,
            _ => Arc::default(),
        }
    }
}

impl HistogramFamily {
    pub fn with(&self, values: &[&str]) -> Arc<Histogram> {
        match self.0.series(values) {
            Series::Histogram(h) => h,
            _ => Arc::new(Histogram::new(LATENCY_BUCKETS)),
        }
    }
}

/// `GET /metrics` in the text exposition format.
pub async fn metrics_response() -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        registry().render(),
    )
}

/// Serves `GET /metrics` on `listener` until `shutdown` (a worker's `--metrics-listen`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new().route("/metrics", axum::routing::get(metrics_response));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// What every worker exports about its own load.
pub struct WorkerGauges {
    pub running: Arc<Gauge>,
    pub waiting: Arc<Gauge>,
}

impl WorkerGauges {
    pub fn new(role: &str, worker: &str) -> Self {
        let r = registry();
        WorkerGauges {
            running: r
                .gauge(
                    "sluice_running_sequences",
                    "Sequences in the worker's running batch.",
                    &["role", "worker"],
                )
                .with(&[role, worker]),
            waiting: r
                .gauge(
                    "sluice_waiting_sequences",
                    "Sequences waiting on the worker (queued, preempted, or staged caches).",
                    &["role", "worker"],
                )
                .with(&[role, worker]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_exposition_format() {
        let r = Registry::default();
        let c = r.counter("t_requests_total", "Requests.", &["outcome"]);
        c.with(&["ok"]).inc();
        c.with(&["ok"]).add(2.0);
        c.with(&["error \"x\""]).inc();
        let h = r.histogram("t_latency_seconds", "Latency.", &[], &[0.1, 1.0]);
        let h = h.with(&[]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        r.gauge("t_depth", "Depth.", &[]).with(&[]).set(4.0);
        let text = r.render();
        let expected = "\
# HELP t_requests_total Requests.
# TYPE t_requests_total counter
t_requests_total{outcome=\"error \\\"x\\\"\"} 1
t_requests_total{outcome=\"ok\"} 3
# HELP t_latency_seconds Latency.
# TYPE t_latency_seconds histogram
t_latency_seconds_bucket{le=\"0.1\"} 1
t_latency_seconds_bucket{le=\"1\"} 2
t_latency_seconds_bucket{le=\"+Inf\"} 3
t_latency_seconds_sum 5.55
t_latency_seconds_count 3
# HELP t_depth Depth.
# TYPE t_depth gauge
t_depth 4
";
        assert_eq!(text, expected);
    }

    #[test]
    fn a_family_registered_twice_is_the_same_family() {
        let r = Registry::default();
        r.counter("t_total", "T.", &[]).with(&[]).inc();
        r.counter("t_total", "T.", &[]).with(&[]).inc();
        assert_eq!(r.counter("t_total", "T.", &[]).with(&[]).get(), 2.0);
        assert_eq!(r.render().matches("# TYPE").count(), 1);
    }
}
