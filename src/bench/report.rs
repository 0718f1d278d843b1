//! The statistics of a bench run and the reports made from them: pure, no I/O.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Highest latency the histograms hold (one hour, in µs); larger values are clamped.
pub const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Significant digits of the histograms (0.1% error).
pub const HISTOGRAM_DIGITS: u8 = 3;
/// MB as the issue defines it: 10^6 bytes.
pub const MB: f64 = 1_000_000.0;

/// What a run measured so far: counts, a latency histogram in µs and errors by code name.
#[derive(Clone, Debug)]
pub struct Stats {
    /// Messages acknowledged (produce) or received (consume, e2e).
    pub messages: u64,
    /// Body bytes of those messages.
    pub bytes: u64,
    /// Requests (produce), polls (consume) or messages (e2e) the latencies were taken of.
    pub samples: u64,
    /// Messages of the failed requests.
    pub failed_messages: u64,
    pub errors: BTreeMap<String, u64>,
    pub latency_us: Histogram<u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            messages: 0,
            bytes: 0,
            samples: 0,
            failed_messages: 0,
            errors: BTreeMap::new(),
            latency_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, HISTOGRAM_DIGITS)
                .expect("valid histogram bounds"),
        }
    }

    /// Counts `messages` of `bytes` that succeeded; the latency is one sample.
    pub fn record_ok(&mut self, messages: u64, bytes: u64, latency: Duration) {
        self.messages += messages;
        self.bytes += bytes;
        self.record_latency_us(latency.as_micros().min(u128::from(u64::MAX)) as u64);
    }

    /// Counts messages without a latency sample.
    pub fn record_messages(&mut self, messages: u64, bytes: u64) {
        self.messages += messages;
        self.bytes += bytes;
    }

    pub fn record_latency_us(&mut self, us: u64) {
        self.samples += 1;
        // Clamped: a sub-µs or absurd value must not fail the run.
        let _ = self.latency_us.record(us.clamp(1, MAX_LATENCY_US));
    }

    /// Counts one failed request of `messages` messages under its code name.
    pub fn record_error(&mut self, code: &str, messages: u64) {
        *self.errors.entry(code.to_owned()).or_insert(0) += 1;
        self.failed_messages += messages;
    }

    /// Counts one request whose messages were stored but answered with a status other than
    /// SEND_OK (a SYNC_MASTER without its slave's copy), under the status's name; its
    /// messages count as acknowledged through [`Self::record_ok`].
    pub fn record_status(&mut self, status: &str) {
        *self.errors.entry(status.to_owned()).or_insert(0) += 1;
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Latency at a percentile (0..=100) in µs; 0 when nothing was recorded.
    pub fn percentile_us(&self, p: f64) -> u64 {
        if self.latency_us.is_empty() {
            0
        } else {
            self.latency_us.value_at_quantile(p / 100.0)
        }
    }

    /// Adds another run's statistics (errors merged by code).
    pub fn merge(&mut self, other: &Stats) {
        self.messages += other.messages;
        self.bytes += other.bytes;
        self.samples += other.samples;
        self.failed_messages += other.failed_messages;
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_insert(0) += v;
        }
        self.latency_us
            .add(&other.latency_us)
            .expect("histograms of the same bounds");
    }
}

/// Messages per second, 0 for an empty interval.
pub fn rate(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

/// The final result of a run, as text and as one JSON line.
#[derive(Clone, Debug)]
pub struct Report {
    /// `produce`, `consume` or `e2e`.
    pub kind: &'static str,
    /// Messages asked for (`--messages`).
    pub requested: u64,
    pub messages: u64,
    pub bytes: u64,
    pub seconds: f64,
    /// What one latency sample is, e.g. "per request (batch of 64)".
    pub latency_of: String,
    pub samples: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub failed_messages: u64,
    pub errors: BTreeMap<String, u64>,
    /// Why the run ended early (consecutive failures, deadline, idle), if it did.
    pub stopped: Option<String>,
    /// The settings, echoed in both outputs: (name, value).
    pub settings: Vec<(&'static str, String)>,
    /// More counters, in the JSON and the text: (name, value).
    pub extra: Vec<(&'static str, u64)>,
}

impl Report {
    pub fn new(kind: &'static str, requested: u64, stats: &Stats, elapsed: Duration) -> Report {
        Report {
            kind,
            requested,
            messages: stats.messages,
            bytes: stats.bytes,
            seconds: elapsed.as_secs_f64(),
            latency_of: String::new(),
            samples: stats.samples,
            p50_us: stats.percentile_us(50.0),
            p90_us: stats.percentile_us(90.0),
            p99_us: stats.percentile_us(99.0),
            p999_us: stats.percentile_us(99.9),
            max_us: if stats.latency_us.is_empty() {
                0
            } else {
                stats.latency_us.max()
            },
            failed_messages: stats.failed_messages,
            errors: stats.errors.clone(),
            stopped: None,
            settings: Vec::new(),
            extra: Vec::new(),
        }
    }

    pub fn msgs_per_sec(&self) -> f64 {
        rate(self.messages, self.seconds)
    }

    pub fn mb_per_sec(&self) -> f64 {
        rate(self.bytes, self.seconds) / MB
    }

    /// Success: every requested message went through, without a single error.
    pub fn ok(&self) -> bool {
        self.errors.is_empty() && self.messages >= self.requested && self.stopped.is_none()
    }

    /// One JSON object, no newline.
    pub fn to_json(&self) -> String {
        let mut s = String::with_capacity(512);
        s.push('{');
        let _ = write!(s, "\"kind\":{}", json_str(self.kind));
        for (k, v) in [
            ("requested", self.requested),
            ("messages", self.messages),
            ("bytes", self.bytes),
        ] {
            let _ = write!(s, ",\"{k}\":{v}");
        }
        let _ = write!(s, ",\"seconds\":{}", json_f64(self.seconds, 6));
        let _ = write!(s, ",\"msgs_per_sec\":{}", json_f64(self.msgs_per_sec(), 1));
        let _ = write!(s, ",\"mb_per_sec\":{}", json_f64(self.mb_per_sec(), 3));
        let _ = write!(s, ",\"latency\":{}", json_str(&self.latency_of));
        for (k, v) in [
            ("samples", self.samples),
            ("p50_us", self.p50_us),
            ("p90_us", self.p90_us),
            ("p99_us", self.p99_us),
            ("p999_us", self.p999_us),
            ("max_us", self.max_us),
            ("failed_messages", self.failed_messages),
        ] {
            let _ = write!(s, ",\"{k}\":{v}");
        }
        for (k, v) in &self.extra {
            let _ = write!(s, ",{}:{v}", json_str(k));
        }
        s.push_str(",\"errors\":{");
        for (i, (k, v)) in self.errors.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(s, "{sep}{}:{v}", json_str(k));
        }
        s.push('}');
        match &self.stopped {
            Some(r) => {
                let _ = write!(s, ",\"stopped\":{}", json_str(r));
            }
            None => s.push_str(",\"stopped\":null"),
        }
        s.push_str(",\"settings\":{");
        for (i, (k, v)) in self.settings.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(s, "{sep}{}:{}", json_str(k), json_str(v));
        }
        s.push_str("}}");
        s
    }

    /// The human report, several lines, ending with a newline.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let verb = if self.kind == "produce" {
            "acknowledged"
        } else {
            "received"
        };
        let _ = writeln!(
            s,
            "orbitmq bench {}: {} of {} messages {verb} in {:.2} s",
            self.kind, self.messages, self.requested, self.seconds
        );
        if !self.settings.is_empty() {
            let set: Vec<String> = self
                .settings
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(s, "  settings    {}", set.join(" "));
        }
        let _ = writeln!(
            s,
            "  throughput  {:.0} msgs/s  {:.1} MB/s  (MB = 10^6 bytes of bodies)",
            self.msgs_per_sec(),
            self.mb_per_sec()
        );
        let _ = writeln!(
            s,
            "  latency     {}, {} samples, µs: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            self.latency_of,
            self.samples,
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.max_us
        );
        for (k, v) in &self.extra {
            let _ = writeln!(s, "  {k:<11} {v}");
        }
        if self.errors.is_empty() {
            let _ = writeln!(s, "  errors      none");
        } else {
            let e: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(
                s,
                "  errors      {} (failed requests by code; {} messages in them)",
                e.join(", "),
                self.failed_messages
            );
        }
        if let Some(r) = &self.stopped {
            let _ = writeln!(s, "  stopped     {r}");
        }
        s
    }
}

/// The live progress line: the rate over the last interval and the p99 so far.
pub fn progress_line(
    kind: &str,
    total: u64,
    delta_msgs: u64,
    delta_bytes: u64,
    interval: Duration,
    p99_us: u64,
) -> String {
    let secs = interval.as_secs_f64();
    format!(
        "{kind}: {total} msgs  {:.0} msgs/s  {:.1} MB/s  p99 {:.2} ms",
        rate(delta_msgs, secs),
        rate(delta_bytes, secs) / MB,
        p99_us as f64 / 1000.0
    )
}

/// A JSON string literal.
pub fn json_str(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('"');
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

/// A JSON number; NaN and infinities (not JSON) become 0.
fn json_f64(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "0".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_stats() -> Stats {
        let mut s = Stats::new();
        // 1..=1000 µs, one sample each, 64 messages of 1 KiB per request.
        for us in 1..=1000u64 {
            s.record_ok(64, 64 * 1024, Duration::from_micros(us));
        }
        s
    }

    #[test]
    fn percentiles_follow_the_samples() {
        let s = sample_stats();
        assert_eq!(s.samples, 1000);
        assert_eq!(s.messages, 64_000);
        let within = |got: u64, want: u64| got.abs_diff(want) <= want / 500 + 1;
        assert!(
            within(s.percentile_us(50.0), 500),
            "{}",
            s.percentile_us(50.0)
        );
        assert!(within(s.percentile_us(90.0), 900));
        assert!(within(s.percentile_us(99.0), 990));
        assert!(within(s.percentile_us(99.9), 999));
        assert!(within(s.latency_us.max(), 1000));
        assert_eq!(Stats::new().percentile_us(99.0), 0, "empty is 0");
        // Out-of-range latencies are clamped, not lost.
        let mut c = Stats::new();
        c.record_latency_us(0);
        c.record_latency_us(u64::MAX);
        assert_eq!(c.samples, 2);
        assert_eq!(c.latency_us.len(), 2);
    }

    #[test]
    fn errors_are_counted_by_code_and_merged() {
        let mut a = Stats::new();
        a.record_error("Timeout", 64);
        a.record_error("Timeout", 64);
        a.record_error("SYSTEM_BUSY", 1);
        let mut b = Stats::new();
        b.record_error("Timeout", 16);
        b.record_ok(3, 30, Duration::from_micros(5));
        a.merge(&b);
        assert_eq!(a.errors["Timeout"], 3);
        assert_eq!(a.errors["SYSTEM_BUSY"], 1);
        assert_eq!(a.error_count(), 4);
        assert_eq!(a.failed_messages, 145);
        assert_eq!((a.messages, a.bytes, a.samples), (3, 30, 1));
    }

    #[test]
    fn json_line_has_the_fields() {
        let mut stats = sample_stats();
        stats.record_error("ConnectionLost", 64);
        let mut r = Report::new("produce", 100_000, &stats, Duration::from_secs(2));
        r.latency_of = "per request (batch of 64)".into();
        r.stopped = Some("3 consecutive \"failures\"".into());
        r.settings.push(("batch", "64".into()));
        r.extra.push(("producers", 4));
        let line = r.to_json();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).expect("valid JSON");
        assert_eq!(v["kind"], "produce");
        assert_eq!(v["messages"], 64_000);
        assert_eq!(v["bytes"], 64_000 * 1024);
        assert_eq!(v["seconds"].as_f64(), Some(2.0));
        assert_eq!(v["msgs_per_sec"].as_f64(), Some(32_000.0));
        assert!((v["mb_per_sec"].as_f64().unwrap() - 32.768).abs() < 1e-9);
        for k in ["p50_us", "p90_us", "p99_us", "p999_us", "max_us"] {
            assert!(v[k].as_u64().unwrap() > 0, "{k}");
        }
        assert!(v["p50_us"].as_u64() <= v["p99_us"].as_u64());
        assert!(v["p99_us"].as_u64() <= v["max_us"].as_u64());
        assert_eq!(v["errors"]["ConnectionLost"], 1);
        assert_eq!(v["failed_messages"], 64);
        assert_eq!(v["producers"], 4);
        assert_eq!(v["settings"]["batch"], "64");
        assert_eq!(v["stopped"], "3 consecutive \"failures\"");
        assert!(!r.ok());
    }

    #[test]
    fn a_clean_run_is_ok_and_its_errors_are_an_empty_object() {
        let stats = sample_stats();
        let r = Report::new("produce", 64_000, &stats, Duration::ZERO);
        assert!(r.ok());
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["errors"], serde_json::json!({}));
        assert_eq!(v["stopped"], serde_json::Value::Null);
        // A zero-length run must not print NaN or inf.
        assert_eq!(v["msgs_per_sec"].as_f64(), Some(0.0));
        let short = Report::new("produce", 64_001, &stats, Duration::from_secs(1));
        assert!(!short.ok(), "fewer messages than requested");
        let text = r.to_text();
        assert!(text.contains("64000 of 64000 messages acknowledged"));
        assert!(text.contains("errors      none"));
    }

    #[test]
    fn json_strings_are_escaped_and_progress_is_one_line() {
        assert_eq!(json_str("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
        let p = progress_line(
            "produce",
            10,
            500_000,
            512_000_000,
            Duration::from_secs(1),
            1234,
        );
        assert_eq!(
            p,
            "produce: 10 msgs  500000 msgs/s  512.0 MB/s  p99 1.23 ms"
        );
    }
}
