//! Latency samples and their percentiles.

use std::time::Duration;

/// Latencies in nanoseconds.
#[derive(Default)]
pub struct Samples(Vec<f64>);

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.0.push(d.as_nanos() as f64);
    }

    pub fn extend(&mut self, other: Samples) {
        self.0.extend(other.0);
    }

    fn percentile(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        let i = ((v.len() - 1) as f64 * p).round() as usize;
        v[i.min(v.len() - 1)]
    }

    /// The median, in nanoseconds.
    pub fn p50(&self) -> f64 {
        self.percentile(0.50)
    }

    /// The 99th percentile, in nanoseconds.
    pub fn p99(&self) -> f64 {
        self.percentile(0.99)
    }

    /// "p50 … · p99 …", for the table.
    pub fn summary(&self) -> String {
        format!("p50 {} · p99 {}", fmt(self.p50()), fmt(self.p99()))
    }
}

/// Nanoseconds for humans.
pub fn fmt(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.1} µs", ns / 1e3)
    }
}
