#![allow(dead_code)] // shared by benches, each using part of it
//! What the whole-cluster benches share: their knobs from the environment, medians of
//! samples, and reading the lines a replica writes to its log on the host.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

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
