#![allow(dead_code)] // shared by benches, each using part of it
//! What the whole-cluster benches share: their knobs from the environment, medians of
//! samples, a process's CPU time, and reading the lines a replica writes to its log on the
//! host.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

/// utime + stime of `pid` (all its threads), in seconds; 0 for a process that is gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name (which may hold spaces): state is field 3, utime 14 and stime 15
    // (1-based, whole line).
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = 100.0; // USER_HZ, which Linux fixes at 100 wherever it exports it
    (ticks(11) + ticks(12)) / hz
}

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The median of the samples; zero for none.
pub fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    let n = s.len();
    if n == 0 {
        Duration::ZERO
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2
    }
}

/// The `q` quantile (0.0 to 1.0, nearest rank) of the samples; zero for none.
pub fn percentile(v: &[Duration], q: f64) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    if s.is_empty() { Duration::ZERO } else { s[((s.len() - 1) as f64 * q).round() as usize] }
}

/// The median of plain numbers; NaN for none.
pub fn median_f64(v: impl Iterator<Item = f64>) -> f64 {
    let mut s: Vec<f64> = v.collect();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

pub fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

/// `tool` on PATH, if it is there.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// The new bytes of a log file since the tail started (the agent or its shim writes it; the
/// bench only reads).
pub struct Tail {
    path: PathBuf,
    offset: u64,
    pub text: String,
}

impl Tail {
    /// From the start of `path` (which may not exist yet).
    pub fn new(path: PathBuf) -> Tail {
        Tail { path, offset: 0, text: String::new() }
    }

    /// From the current end of `path`.
    pub fn at_end(path: PathBuf) -> Tail {
        let offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Tail { path, offset, text: String::new() }
    }

    /// Whether `needle` appeared since the tail started.
    pub fn saw(&mut self, needle: &str) -> bool {
        if let Ok(mut f) = std::fs::File::open(&self.path) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len < self.offset {
                self.offset = 0; // rotated
            }
            if len > self.offset && f.seek(SeekFrom::Start(self.offset)).is_ok() {
                let mut buf = Vec::new();
                if f.read_to_end(&mut buf).is_ok() {
                    self.offset += buf.len() as u64;
                    self.text.push_str(&String::from_utf8_lossy(&buf));
                }
            }
        }
        self.text.contains(needle)
    }
}

/// What one `wrk --latency` run reports.
#[derive(Debug, Clone, Default)]
pub struct WrkResult {
    pub rps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub requests: u64,
    /// Non-2xx/3xx responses plus socket errors (connect, read, write, timeout).
    pub errors: u64,
}

fn parse_wrk_duration_ms(s: &str) -> f64 {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let v: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        "m" => v * 60_000.0,
        _ => f64::NAN,
    }
}

/// Parses the text `wrk --latency` prints.
pub fn parse_wrk(text: &str) -> WrkResult {
    let mut r = WrkResult::default();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["Requests/sec:", v] => r.rps = v.parse().unwrap_or(f64::NAN),
            ["50%", v] => r.p50_ms = parse_wrk_duration_ms(v),
            ["90%", v] => r.p90_ms = parse_wrk_duration_ms(v),
            ["99%", v] => r.p99_ms = parse_wrk_duration_ms(v),
            [n, "requests", "in", ..] => r.requests = n.parse().unwrap_or(0),
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                r.errors += rest.iter().filter_map(|t| t.trim_end_matches(',').parse::<u64>().ok()).sum::<u64>()
            }
            _ => {}
        }
    }
    r
}

/// Runs `wrk` (behind `prefix`, e.g. `nsenter --net=...`) at `url` with `conns` connections
/// (and up to two threads) for `secs` seconds; panics with its output if it fails.
pub fn wrk(prefix: &[String], url: &str, conns: usize, secs: usize) -> WrkResult {
    wrk_with(prefix, url, conns, secs, &[])
}

/// [`wrk`] with further arguments before the URL (`-H "Host: web.example"`).
pub fn wrk_with(prefix: &[String], url: &str, conns: usize, secs: usize, extra: &[&str]) -> WrkResult {
    let mut argv: Vec<String> = prefix.to_vec();
    argv.push("wrk".into());
    argv.extend([format!("-t{}", conns.clamp(1, 2)), format!("-c{conns}"), format!("-d{secs}s"), "--latency".into()]);
    argv.extend(extra.iter().map(|a| a.to_string()));
    argv.push(url.into());
    let out = std::process::Command::new(&argv[0]).args(&argv[1..]).output().expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    parse_wrk(&text)
}
