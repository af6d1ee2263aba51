//! What the harnesses in `benches/` share: wrk runs and their parsed reports.

#![allow(dead_code)]

use std::io::Write;
use std::process::Command;

/// Requests per second and latency percentiles, in milliseconds, and the requests made.
#[derive(Clone, Copy, Debug, Default)]
pub struct Run {
    pub rps: f64,
    pub p50: f64,
    pub p99: f64,
    pub requests: u64,
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

pub fn median_run(runs: &[Run]) -> Run {
    Run {
        rps: median(runs.iter().map(|r| r.rps).collect()),
        p50: median(runs.iter().map(|r| r.p50).collect()),
        p99: median(runs.iter().map(|r| r.p99).collect()),
        requests: runs.iter().map(|r| r.requests).sum::<u64>() / runs.len().max(1) as u64,
    }
}

pub fn wrk_script(dir: &std::path::Path, name: &str, body: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    path
}

/// Parses wrk's `--latency` report.
pub fn wrk(url: &str, concurrency: usize, seconds: u64, script: &std::path::Path) -> Run {
    let output = Command::new("wrk")
        .args([
            "-t",
            "2",
            "-c",
            &concurrency.to_string(),
            "-d",
            &format!("{seconds}s"),
        ])
        .args(["--latency", "-s"])
        .arg(script)
        .arg(url)
        .output()
        .expect("wrk on PATH (apt-get install wrk)");
    let text = String::from_utf8_lossy(&output.stdout);
    let millis = |token: &str| -> f64 {
        let (number, unit) = token.split_at(
            token
                .find(|c: char| c.is_alphabetic())
                .unwrap_or(token.len()),
        );
        let n: f64 = number.parse().unwrap_or(f64::NAN);
        match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            _ => f64::NAN,
        }
    };
    let mut run = Run::default();
    for line in text.lines().map(str::trim) {
        if line.contains(" requests in ") {
            run.requests = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            run.rps = rest.trim().parse().unwrap_or(f64::NAN);
        } else if let Some(rest) = line.strip_prefix("50%") {
            run.p50 = millis(rest.trim());
        } else if let Some(rest) = line.strip_prefix("99%") {
            run.p99 = millis(rest.trim());
        }
    }
    if text.contains("Non-2xx") {
        panic!("wrk saw error responses:\n{text}");
    }
    run
}
