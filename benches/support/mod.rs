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

/// One HTTP/1.1 request, sent as is over a kept-alive connection.
#[derive(Clone, Debug)]
pub struct RawRequest {
    pub method: &'static str,
    pub path: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
    /// The status every answer must have (a run of errors would measure the error path).
    pub status: u16,
}

impl RawRequest {
    fn bytes(&self) -> Vec<u8> {
        let mut text = format!(
            "{} {} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n",
            self.method,
            self.path,
            self.body.len()
        );
        for (name, value) in &self.headers {
            text.push_str(&format!("{name}: {value}\r\n"));
        }
        text.push_str("\r\n");
        text.push_str(&self.body);
        text.into_bytes()
    }
}

/// Sends `request` `count` times, one after the other, over one kept-alive connection.
pub fn send_sequentially(port: u16, request: &RawRequest, count: usize) {
    use std::io::{BufRead, BufReader, Read};
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("server reachable");
    stream.set_nodelay(true).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let bytes = request.bytes();
    for _ in 0..count {
        writer.write_all(&bytes).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        assert_eq!(status, request.status, "{request:?} answered {line:?}");
        let (mut length, mut chunked) = (0usize, false);
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap();
                }
                // A compressed answer streams: its length is not known up front.
                if name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = value.trim().eq_ignore_ascii_case("chunked");
                }
            }
        }
        if !chunked {
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            continue;
        }
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            let size = usize::from_str_radix(line.trim_end(), 16).expect("a chunk size");
            // The chunk and its CRLF; the last (empty) chunk is followed by one CRLF.
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).unwrap();
            if size == 0 {
                break;
            }
        }
    }
}

/// Instructions per request of a server in its steady state: `program` runs under
/// `valgrind --tool=callgrind`, listening on `port`; after `warmup` requests its counters
/// are zeroed (`callgrind_control --zero`), `count` more are sent, and the counts since
/// the zero are dumped to `out` (`callgrind_control --dump`) and divided by `count`. One
/// process: start-up, whose cost depends on the wall clock (quanta's calibration, the
/// wait for Redis, the readiness checks), is not counted at all, where a difference of two
/// runs let it move the figure by thousands per request. Stopped with SIGTERM after.
pub fn instructions_per_request(
    program: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
    port: u16,
    request: &RawRequest,
    (warmup, count): (usize, usize),
    out: &std::path::Path,
) -> f64 {
    use std::time::{Duration, Instant};
    let raw = out.with_extension("callgrind-out");
    let mut child = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", raw.display()))
        .arg(program)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("valgrind on PATH (apt-get install valgrind)");
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "{} did not listen under callgrind",
            program.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    send_sequentially(port, request, warmup);
    callgrind_control(child.id(), "--zero");
    send_sequentially(port, request, count);
    callgrind_control(child.id(), "--dump");
    // SIGTERM: a graceful exit (callgrind then writes the counts since the dump as well).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "{} under callgrind: {status}",
        program.display()
    );
    // The dump is the first numbered part; the exit's own is the file without a number.
    let dump = std::path::PathBuf::from(format!("{}.1", raw.display()));
    std::fs::rename(&dump, out).expect("callgrind's dump after the measured requests");
    let _ = std::fs::remove_file(&raw);
    let text = std::fs::read_to_string(out).expect("callgrind output");
    let total: u64 = text
        .lines()
        .find_map(|line| {
            line.strip_prefix("totals:")
                .or(line.strip_prefix("summary:"))
        })
        .and_then(|n| n.split_whitespace().next()?.parse().ok())
        .expect("callgrind totals line");
    total as f64 / count as f64
}

fn callgrind_control(pid: u32, what: &str) {
    let status = Command::new("callgrind_control")
        .args([what, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("callgrind_control (comes with valgrind)");
    assert!(status.success(), "callgrind_control {what} {pid}: {status}");
}
