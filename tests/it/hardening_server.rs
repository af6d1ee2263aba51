//! The server's own limits (issue 15, items 1, 5, 6, 12, 13, 15; issue 17's drain), each
//! at its edge against the real `airstate` binary over real sockets: raw TCP clients that
//! send partial headers, stall mid-body or stay idle, and a client sending across SIGTERM.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::ServedBinary;
use uuid::Uuid;

const BINARY: &str = env!("CARGO_BIN_EXE_airstate");
const SECRET: &str = "hardening-secret-that-is-long-enough-for-hs512";

/// The embedded store and claims identity, plus `extra`.
fn serve(extra: &[(&str, &str)]) -> ServedBinary {
    let mut env = vec![
        ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
        ("RUST_LOG", "warn"),
    ];
    env.extend_from_slice(extra);
    ServedBinary::start(&env, Stdio::inherit())
}

fn address(served: &ServedBinary) -> String {
    served.base.trim_start_matches("http://").to_owned()
}

/// An execution token for a fresh task instance, minted by `airstate token`.
fn task_token() -> (Uuid, String) {
    let ti = Uuid::new_v4();
    let output = Command::new(BINARY)
        .args(["token", "--sub", &ti.to_string()])
        .args(["--dag-id", "d", "--run-id", "r", "--task-id", "t"])
        .env("AIRFLOW__API_AUTH__JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(output.status.success(), "airstate token");
    (
        ti,
        String::from_utf8_lossy(&output.stdout).trim().to_owned(),
    )
}

fn connect(served: &ServedBinary) -> TcpStream {
    let stream = TcpStream::connect(address(served)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Reads until the server closes the connection or `limit` passes; what was read and,
/// when it closed, after how long.
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, Option<Duration>) {
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(started.elapsed());
        if left.is_zero() {
            return (String::from_utf8_lossy(&received).into_owned(), None);
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            // A reset is a close too.
            Err(_) => break,
        }
    }
    (
        String::from_utf8_lossy(&received).into_owned(),
        Some(started.elapsed()),
    )
}

/// Reads one response (headers plus a `Content-Length` body) off a kept-alive connection.
fn read_response(stream: &mut TcpStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut received = Vec::new();
    let mut byte = [0u8; 1];
    while !received.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "connection closed");
        received.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&received).into_owned();
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    head + &String::from_utf8_lossy(&body)
}

/// Descriptors the process holds open.
fn open_descriptors(served: &ServedBinary) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", served.child.id()))
        .unwrap()
        .count()
}

fn metric(served: &ServedBinary, name: &str) -> f64 {
    let mut stream = connect(served);
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (text, _) = read_until_closed(&mut stream, Duration::from_secs(5));
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn slow_headers_are_closed_at_the_header_timeout() {
    let served = serve(&[
        // Long enough that fifty connections are all open when counted, on a busy machine.
        ("AIRSTATE_HEADER_READ_TIMEOUT_MS", "1500"),
        ("AIRSTATE_IDLE_TIMEOUT_MS", "30000"),
    ]);
    let baseline = open_descriptors(&served);
    // Fifty clients that start a request and drip a header line now and then, never
    // ending the headers: each byte arrives well within the timeout, the headers never.
    let mut slow: Vec<(TcpStream, Instant)> = (0..50)
        .map(|_| {
            let mut stream = connect(&served);
            stream
                .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n")
                .unwrap();
            (stream, Instant::now())
        })
        .collect();
    let started = Instant::now();
    let mut most_open = 0;
    while started.elapsed() < Duration::from_millis(800) {
        for (stream, _) in &mut slow {
            let _ = stream.write_all(b"X-Drip: 1\r\n");
        }
        most_open = most_open.max(open_descriptors(&served));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Still open from each client's side: nothing to read, no end of stream. (The
    // gateway's descriptor count, which tests running beside this one move by a few,
    // only shows that they were accepted.)
    for (stream, _) in &mut slow {
        stream.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        let read = stream.read(&mut byte);
        assert!(
            matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a dripping client's connection was answered or closed early: {read:?}"
        );
        stream.set_nonblocking(false).unwrap();
    }
    assert!(
        most_open >= baseline + 45,
        "{most_open} descriptors at most while fifty clients dripped, {baseline} before"
    );
    for (stream, first_byte) in &mut slow {
        let (text, closed) = read_until_closed(stream, Duration::from_secs(5));
        assert!(closed.is_some(), "a slow header is never closed");
        let closed = first_byte.elapsed();
        assert!(text.is_empty(), "no response to unfinished headers: {text}");
        assert!(
            closed >= Duration::from_millis(1450) && closed < Duration::from_millis(4000),
            "closed {closed:?} after its first byte, the timeout is 1500 ms"
        );
    }
    // Their descriptors are given back.
    std::thread::sleep(Duration::from_millis(200));
    let after = open_descriptors(&served);
    assert!(
        after <= baseline + 2,
        "{after} descriptors, {baseline} before"
    );
    assert!(metric(&served, "airstate_connections_timed_out_total") >= 50.0);
}

#[test]
fn idle_keep_alive_connections_are_closed_at_the_idle_timeout() {
    // The idle limit is its own: longer than the header one, and not cut by it.
    let served = serve(&[
        ("AIRSTATE_HEADER_READ_TIMEOUT_MS", "300"),
        ("AIRSTATE_IDLE_TIMEOUT_MS", "1200"),
    ]);
    let mut stream = connect(&served);
    let request = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n";
    stream.write_all(request).unwrap();
    assert!(read_response(&mut stream).starts_with("HTTP/1.1 200"));
    // Idle for less than the limit (but more than the header timeout): still served.
    std::thread::sleep(Duration::from_millis(800));
    stream.write_all(request).unwrap();
    assert!(read_response(&mut stream).starts_with("HTTP/1.1 200"));
    let (text, closed) = read_until_closed(&mut stream, Duration::from_secs(10));
    let closed = closed.expect("an idle connection is never closed");
    assert!(text.is_empty(), "{text}");
    assert!(
        closed >= Duration::from_millis(1100) && closed < Duration::from_millis(3000),
        "closed after {closed:?}, the idle timeout is 1200 ms"
    );
    // A connection that never sends anything is idle too.
    let mut silent = connect(&served);
    let (_, closed) = read_until_closed(&mut silent, Duration::from_secs(10));
    let closed = closed.expect("a silent connection is never closed");
    assert!(closed >= Duration::from_millis(1100), "{closed:?}");
}

#[test]
fn a_slow_header_on_a_kept_alive_connection_is_closed_at_the_header_timeout() {
    // The watchdog is asleep towards the far idle deadline when the next head starts;
    // nothing wakes it for that head, so it must never sleep past one header timeout.
    let served = serve(&[
        ("AIRSTATE_HEADER_READ_TIMEOUT_MS", "800"),
        ("AIRSTATE_IDLE_TIMEOUT_MS", "30000"),
    ]);
    let mut stream = connect(&served);
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert!(read_response(&mut stream).starts_with("HTTP/1.1 200"));
    std::thread::sleep(Duration::from_millis(1300));
    stream.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
    let first_byte = Instant::now();
    let (text, closed) = read_until_closed(&mut stream, Duration::from_secs(10));
    assert!(closed.is_some(), "a slow header is never closed");
    let closed = first_byte.elapsed();
    assert!(text.is_empty(), "{text}");
    assert!(
        closed >= Duration::from_millis(750) && closed < Duration::from_millis(2500),
        "closed {closed:?} after its first byte, the header timeout is 800 ms"
    );
}

#[test]
fn a_stalled_body_is_a_408_at_the_body_timeout() {
    let served = serve(&[
        ("AIRSTATE_BODY_READ_TIMEOUT_MS", "700"),
        ("AIRSTATE_HEADER_READ_TIMEOUT_MS", "300"),
    ]);
    let (ti, token) = task_token();
    let put = |body: &str, sent: usize| {
        let mut stream = connect(&served);
        let head = format!(
            "PUT /execution/store/ti/{ti}/k HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(&body.as_bytes()[..sent]).unwrap();
        let started = Instant::now();
        let (text, _) = read_until_closed(&mut stream, Duration::from_secs(5));
        (text, started.elapsed())
    };
    let body = r#"{"value": "complete"}"#;
    // Half the body, then nothing: refused once the timeout is over, not held for ever.
    let (text, took) = put(body, 10);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.contains(r#"{"detail":"Request body not received within 700 ms"}"#),
        "{text}"
    );
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    // The whole body is served.
    let (text, _) = put(body, body.len());
    assert!(text.starts_with("HTTP/1.1 204"), "{text}");
}

#[test]
fn connections_over_the_cap_are_closed_at_once() {
    let served = serve(&[("AIRSTATE_MAX_CONNECTIONS", "4")]);
    // The start-up probe's connection is gone: only the scrape's own is open.
    wait_for_metric(&served, "airstate_connections_open", 1.0);
    std::thread::sleep(Duration::from_millis(100));
    // Four kept-alive connections, each known to be accepted (it was answered).
    let mut held: Vec<TcpStream> = (0..4).map(|_| connect(&served)).collect();
    let health = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n";
    for stream in &mut held {
        stream.write_all(health).unwrap();
        assert!(read_response(stream).starts_with("HTTP/1.1 200"));
    }
    let mut over = connect(&served);
    let (text, closed) = read_until_closed(&mut over, Duration::from_secs(5));
    assert!(text.is_empty(), "{text}");
    let closed = closed.expect("the fifth connection is kept open");
    assert!(
        closed < Duration::from_millis(500),
        "closed after {closed:?}"
    );
    // The four held ones are still served.
    for stream in &mut held {
        stream.write_all(health).unwrap();
        assert!(read_response(stream).starts_with("HTTP/1.1 200"));
    }
    // One gone, one more fits (it asks for the metrics): the refusal was counted.
    drop(held.pop());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(metric(&served, "airstate_connections_rejected_total"), 1.0);
}

/// Issue 15, item 1: with more connections allowed than the descriptor limit leaves room
/// for, the descriptors run out first. A new client must then be closed at once (it
/// retries elsewhere), not left in the listen backlog unanswered, and once connections
/// close the replica serves again.
#[test]
fn connections_past_the_descriptor_limit_are_closed_at_once() {
    let served = ServedBinary::start_with_nofile(
        &[
            ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
            ("RUST_LOG", "error"),
            ("AIRSTATE_MAX_CONNECTIONS", "1000"),
        ],
        Stdio::inherit(),
        128,
    );
    let health = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n";
    // More kept-alive connections than 128 descriptors hold, each asking once.
    let mut held: Vec<TcpStream> = (0..160)
        .map(|_| {
            let mut stream = connect(&served);
            stream.write_all(health).unwrap();
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut answered = 0;
    for stream in &mut held {
        let (text, _) = read_until_closed(stream, Duration::from_millis(100));
        answered += usize::from(text.starts_with("HTTP/1.1 200"));
    }
    assert!(
        (100..160).contains(&answered),
        "{answered} of 160 answered: the descriptor limit was not reached"
    );
    for _ in 0..5 {
        let mut probe = connect(&served);
        probe.write_all(health).unwrap();
        let (text, closed) = read_until_closed(&mut probe, Duration::from_secs(3));
        let closed = closed.unwrap_or_else(|| {
            panic!("a new connection was left waiting, unanswered, with descriptors exhausted")
        });
        assert!(
            closed < Duration::from_millis(1000) && (text.is_empty() || text.contains(" 200 ")),
            "closed after {closed:?}: {text:?}"
        );
    }
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let mut again = connect(&served);
    again.write_all(health).unwrap();
    assert!(read_response(&mut again).starts_with("HTTP/1.1 200"));
    assert!(metric(&served, "airstate_connections_rejected_total") >= 1.0);
}

#[test]
fn headers_over_the_limit_are_a_431() {
    let served = serve(&[("AIRSTATE_MAX_HEADER_BYTES", "4096")]);
    let send = |padding: usize| {
        let mut stream = connect(&served);
        let request = format!(
            "GET /health HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
            "p".repeat(padding)
        );
        stream.write_all(request.as_bytes()).unwrap();
        read_until_closed(&mut stream, Duration::from_secs(5)).0
    };
    assert!(send(3900).starts_with("HTTP/1.1 200"));
    assert!(send(4200).starts_with("HTTP/1.1 431"));
}

/// A PUT of a body of `length` bytes of which only `sent` are sent: its handler waits for
/// the rest, holding whatever the request counts against.
fn stalled_put(
    served: &ServedBinary,
    ti: Uuid,
    token: &str,
    length: usize,
    sent: usize,
) -> TcpStream {
    let mut stream = connect(served);
    let head = format!(
        "PUT /execution/store/ti/{ti}/k HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream
        .write_all(&body_of(length).as_bytes()[..sent])
        .unwrap();
    stream
}

/// A valid PUT body of exactly `length` bytes.
fn body_of(length: usize) -> String {
    let frame = r#"{"value": ""}"#.len();
    format!(r#"{{"value": "{}"}}"#, "x".repeat(length - frame))
}

/// One request with `Connection: close`; the response and how long it took.
fn exchange(served: &ServedBinary, request: &str) -> (String, Duration) {
    let mut stream = connect(served);
    let started = Instant::now();
    stream.write_all(request.as_bytes()).unwrap();
    let (text, _) = read_until_closed(&mut stream, Duration::from_secs(10));
    (text, started.elapsed())
}

fn put_request(ti: Uuid, token: &str, body: &str, chunked: bool) -> String {
    let framing = if chunked {
        format!(
            "Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        )
    } else {
        format!("Content-Length: {}\r\n\r\n{body}", body.len())
    };
    format!(
        "PUT /execution/store/ti/{ti}/k HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nConnection: close\r\n{framing}"
    )
}

fn wait_for_metric(served: &ServedBinary, name: &str, value: f64) {
    let started = Instant::now();
    while metric(served, name) != value {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name} never reached {value}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_shed(text: &str, took: Duration) {
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("retry-after: 1\r\n"),
        "{text}"
    );
    assert!(
        text.ends_with(r#"{"detail":"Too many requests in flight on this replica, retry later"}"#),
        "{text}"
    );
    assert!(took < Duration::from_millis(500), "shed after {took:?}");
}

#[test]
fn requests_past_the_concurrency_limit_are_a_fast_503() {
    let served = serve(&[("AIRSTATE_MAX_CONCURRENT_REQUESTS", "2")]);
    let (ti, token) = task_token();
    let mut stalled: Vec<TcpStream> = (0..2)
        .map(|_| stalled_put(&served, ti, &token, 100, 10))
        .collect();
    // The scrape counts itself.
    wait_for_metric(&served, "airstate_http_requests_in_flight", 3.0);
    let get = format!(
        "GET /execution/store/ti/{ti}/k HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let (text, took) = exchange(&served, &get);
    assert_shed(&text, took);
    // Probes are never shed.
    let (text, _) = exchange(
        &served,
        "GET /ready HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // One stalled request finishes: the next one fits.
    stalled[0]
        .write_all(&body_of(100).as_bytes()[10..])
        .unwrap();
    assert!(read_response(&mut stalled[0]).starts_with("HTTP/1.1 204"));
    let (text, _) = exchange(&served, &get);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(
        metric(
            &served,
            r#"airstate_requests_shed_total{reason="requests"}"#
        ),
        1.0
    );
}

#[test]
fn body_bytes_past_the_in_flight_limit_are_a_fast_503() {
    let served = serve(&[
        ("AIRSTATE_MAX_BODY_BYTES", "1000"),
        ("AIRSTATE_MAX_BODY_BYTES_IN_FLIGHT", "1000"),
    ]);
    let (ti, token) = task_token();
    let mut stalled = stalled_put(&served, ti, &token, 600, 10);
    wait_for_metric(&served, "airstate_http_requests_in_flight", 2.0);
    // 600 + 401 bytes do not fit; 600 + 400 exactly do.
    let (text, took) = exchange(&served, &put_request(ti, &token, &body_of(401), false));
    assert_shed(&text, took);
    let (text, _) = exchange(&served, &put_request(ti, &token, &body_of(400), false));
    assert!(text.starts_with("HTTP/1.1 204"), "{text}");
    // A chunked body may be as large as the body cap, so it is counted as that.
    let (text, took) = exchange(&served, &put_request(ti, &token, &body_of(20), true));
    assert_shed(&text, took);
    stalled.write_all(&body_of(600).as_bytes()[10..]).unwrap();
    assert!(read_response(&mut stalled).starts_with("HTTP/1.1 204"));
    let (text, _) = exchange(&served, &put_request(ti, &token, &body_of(20), true));
    assert!(text.starts_with("HTTP/1.1 204"), "{text}");
    assert_eq!(
        metric(
            &served,
            r#"airstate_requests_shed_total{reason="body_bytes"}"#
        ),
        2.0
    );
}

#[test]
fn a_malformed_or_truncated_body_is_a_400() {
    let served = serve(&[]);
    let (ti, token) = task_token();
    let head = format!(
        "PUT /execution/store/ti/{ti}/k HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\n"
    );
    let detail = r#"{"detail":"Malformed or truncated request body (invalid chunked encoding, or fewer bytes than Content-Length)"}"#;
    // A chunk size that is not hexadecimal.
    let (text, _) = exchange(
        &served,
        &format!("{head}Transfer-Encoding: chunked\r\n\r\nzz\r\n"),
    );
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.ends_with(detail), "{text}");
    // A body cut short: the client half-closes after 5 of 40 declared bytes.
    let mut stream = connect(&served);
    stream
        .write_all(format!("{head}Content-Length: 40\r\n\r\n{{\"va").as_bytes())
        .unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let (text, _) = read_until_closed(&mut stream, Duration::from_secs(5));
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.ends_with(detail), "{text}");
    // Nothing was stored, and a whole chunked body is served.
    let (text, _) = exchange(&served, &put_request(ti, &token, &body_of(30), true));
    assert!(text.starts_with("HTTP/1.1 204"), "{text}");
}

fn sigterm(served: &ServedBinary) {
    unsafe { libc::kill(served.child.id() as i32, libc::SIGTERM) };
}

/// Waits for the process to exit; how long after `since` it did.
fn wait_exit(served: &mut ServedBinary, since: Instant, limit: Duration) -> Duration {
    loop {
        if let Some(status) = served.child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            return since.elapsed();
        }
        assert!(since.elapsed() < limit, "no exit {limit:?} after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_half_sent_request_does_not_hold_the_shutdown() {
    let mut served = serve(&[("AIRSTATE_SHUTDOWN_GRACE_SECONDS", "20")]);
    let (ti, token) = task_token();
    let mut head_only = connect(&served);
    head_only
        .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    let mut half_body = stalled_put(&served, ti, &token, 100, 10);
    wait_for_metric(&served, "airstate_http_requests_in_flight", 2.0);
    let signalled = Instant::now();
    sigterm(&served);
    let took = wait_exit(&mut served, signalled, Duration::from_secs(15));
    assert!(took < Duration::from_secs(2), "exit {took:?} after SIGTERM");
    // The request still receiving its body is told to go elsewhere; the one without its
    // headers gets nothing, its connection closed.
    let (text, _) = read_until_closed(&mut half_body, Duration::from_secs(5));
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(
        text.ends_with(r#"{"detail":"Server shutting down, retry on another replica"}"#),
        "{text}"
    );
    let (text, closed) = read_until_closed(&mut head_only, Duration::from_secs(5));
    assert!(text.is_empty() && closed.is_some(), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_across_sigterm_are_all_served_during_the_drain() {
    let mut served = serve(&[
        ("AIRSTATE_SHUTDOWN_DRAIN_SECONDS", "2"),
        ("AIRSTATE_SHUTDOWN_GRACE_SECONDS", "10"),
    ]);
    let (ti, token) = task_token();
    // A worker keeping its connections alive, and new clients opening one per request.
    let pooled = reqwest::Client::new();
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let url = format!("{}/execution/store/ti/{ti}/k", served.base);
    let signalled = std::sync::Arc::new(std::sync::OnceLock::<Instant>::new());
    let sender = {
        let signalled = signalled.clone();
        let fresh = fresh.clone();
        tokio::spawn(async move {
            let (mut before, mut after, mut failures) = (0, 0, Vec::new());
            for i in 0.. {
                if signalled
                    .get()
                    .is_some_and(|at| at.elapsed() > Duration::from_millis(1500))
                {
                    break;
                }
                let client = if i % 2 == 0 { &pooled } else { &fresh };
                let outcome = client
                    .put(&url)
                    .bearer_auth(&token)
                    .json(&serde_json::json!({"value": i}))
                    .send()
                    .await;
                match outcome {
                    Ok(response) if response.status() == 204 => {}
                    Ok(response) => failures.push(format!("{i}: {}", response.status())),
                    Err(error) => failures.push(format!("{i}: {error}")),
                }
                if signalled.get().is_some() {
                    after += 1;
                } else {
                    before += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (before, after, failures)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    sigterm(&served);
    signalled.set(Instant::now()).unwrap();
    // Readiness turns 503 at once, on a new connection, while requests are still served.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(common::ready(&served.base).await.0, 503);
    let (before, after, failures) = sender.await.unwrap();
    println!("{before} requests before SIGTERM, {after} in the 1.5 s after it");
    assert!(
        failures.is_empty(),
        "refused during the drain: {failures:?}"
    );
    // Enough requests on both sides of the signal to mean something, even on a busy host.
    assert!(before >= 1 && after >= 10, "{before} / {after}");
    // Then it stops accepting and exits once the drain is over.
    let since = *signalled.get().unwrap();
    let took = tokio::task::spawn_blocking(move || {
        let took = wait_exit(&mut served, since, Duration::from_secs(10));
        (took, served)
    })
    .await
    .unwrap();
    assert!(
        took.0 >= Duration::from_secs(2) && took.0 < Duration::from_millis(3500),
        "exit {:?} after SIGTERM, the drain is 2 s",
        took.0
    );
    assert!(TcpStream::connect(address(&took.1)).is_err());
}

/// A JWKS endpoint on raw TCP that serves `document` while `hang` is off, and accepts but
/// never answers while it is on (the connections are kept open until the test ends).
struct JwksEndpoint {
    url: String,
    document: std::sync::Arc<std::sync::Mutex<String>>,
    hang: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl JwksEndpoint {
    fn start(document: String, hang: bool) -> JwksEndpoint {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let document = Arc::new(Mutex::new(document));
        let hang = Arc::new(AtomicBool::new(hang));
        let (served, hanging) = (document.clone(), hang.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                if hanging.load(Ordering::SeqCst) {
                    held.push(stream);
                    continue;
                }
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                let body = served.lock().unwrap().clone();
                let _ = stream.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
        });
        JwksEndpoint {
            url,
            document,
            hang,
        }
    }

    fn hang(&self, on: bool) {
        self.hang.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

/// An Ed25519 key made by openssl: its PEM path and its public JWK with `kid`.
fn ed25519_key(dir: &std::path::Path, kid: &str) -> (String, serde_json::Value) {
    let path = dir.join(format!("{kid}.pem"));
    let made = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(made.status.success(), "openssl genpkey");
    let pem = std::fs::read(&path).unwrap();
    let encoding = jsonwebtoken::EncodingKey::from_ed_pem(&pem).unwrap();
    let mut jwk =
        jsonwebtoken::jwk::Jwk::from_encoding_key(&encoding, jsonwebtoken::Algorithm::EdDSA)
            .unwrap();
    jwk.common.key_id = Some(kid.to_owned());
    (
        path.display().to_string(),
        serde_json::to_value(jwk).unwrap(),
    )
}

/// A token for `ti` signed with the key at `pem` under `kid`, by `airstate token`.
fn token_signed_by(pem: &str, kid: &str, ti: Uuid) -> String {
    let output = Command::new(BINARY)
        .args(["token", "--sub", &ti.to_string()])
        .args(["--dag-id", "d", "--run-id", "r", "--task-id", "t"])
        .env_clear()
        .env("AIRFLOW__API_AUTH__JWT_PRIVATE_KEY_PATH", pem)
        .env("AIRFLOW__API_AUTH__JWT_KID", kid)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[test]
fn a_jwks_endpoint_that_never_answers_fails_start_up_at_the_timeout() {
    let endpoint = JwksEndpoint::start(String::new(), true);
    let started = Instant::now();
    let mut child = Command::new(BINARY)
        .arg("serve")
        .env_clear()
        .env("AIRFLOW__API_AUTH__TRUSTED_JWKS_URL", &endpoint.url)
        .env("AIRSTATE_JWKS_TIMEOUT_MS", "800")
        .env(
            "AIRSTATE_LISTEN",
            format!("127.0.0.1:{}", common::free_port()),
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("start-up still hangs on the JWKS after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("AIRFLOW__API_AUTH__TRUSTED_JWKS_URL"),
        "{stderr}"
    );
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(4),
        "exited after {took:?}, the timeout is 800 ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_refresh_that_never_answers_does_not_stop_later_refreshes() {
    let dir = tempfile::tempdir().unwrap();
    let (pem_a, jwk_a) = ed25519_key(dir.path(), "a");
    let (pem_b, jwk_b) = ed25519_key(dir.path(), "b");
    let endpoint = JwksEndpoint::start(serde_json::json!({"keys": [jwk_a]}).to_string(), false);
    let served = ServedBinary::start(
        &[
            ("AIRFLOW__API_AUTH__TRUSTED_JWKS_URL", &endpoint.url),
            ("AIRSTATE_JWKS_REFRESH_SECONDS", "1"),
            ("AIRSTATE_JWKS_TIMEOUT_MS", "500"),
            ("RUST_LOG", "error"),
        ],
        Stdio::inherit(),
    );
    let http = reqwest::Client::new();
    let ti = Uuid::new_v4();
    let url = format!("{}/execution/store/ti/{ti}/k", served.base);
    let status = |token: String| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            http.get(&url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(status(token_signed_by(&pem_a, "a", ti)).await, 404);
    // The endpoint hangs through a few refreshes; then it answers with a new key.
    endpoint.hang(true);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    *endpoint.document.lock().unwrap() = serde_json::json!({"keys": [jwk_a, jwk_b]}).to_string();
    endpoint.hang(false);
    let token_b = token_signed_by(&pem_b, "b", ti);
    let started = Instant::now();
    loop {
        let got = status(token_b.clone()).await;
        if got == 404 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "the key added after the hang is never trusted ({got}): the refresh task is stuck"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_a_fast_503_while_redis_is_known_down() {
    let mut redis = common::RedisServer::start();
    let served = serve(&[
        ("AIRSTATE_REDIS_URL", &redis.url),
        ("AIRSTATE_REDIS_TIMEOUT_MS", "3000"),
        ("AIRSTATE_REDIS_RECONNECT_MAX_MS", "500"),
        ("RUST_LOG", "error"),
    ]);
    let (ti, token) = task_token();
    let http = reqwest::Client::new();
    let url = format!("{}/execution/store/ti/{ti}/k", served.base);
    let put = |i: u32| {
        let (http, url, token) = (http.clone(), url.clone(), token.clone());
        async move {
            let started = Instant::now();
            let response = http
                .put(&url)
                .bearer_auth(token)
                .json(&serde_json::json!({"value": i}))
                .send()
                .await
                .unwrap();
            let retry_after = response.headers().get("retry-after").cloned();
            (response.status(), retry_after, started.elapsed())
        }
    };
    assert_eq!(put(0).await.0, 204);
    redis.stop();
    // fred sees the connection drop at once; from then on it is reconnecting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut slowest = Duration::ZERO;
    for i in 1..=20 {
        let (status, retry_after, took) = put(i).await;
        assert_eq!(status, 503, "request {i}");
        assert_eq!(retry_after.unwrap(), "1");
        slowest = slowest.max(took);
    }
    println!("slowest 503 while Redis is down: {slowest:?} (command timeout 3 s)");
    assert!(
        slowest < Duration::from_millis(300),
        "slowest 503 took {slowest:?}"
    );
    // Back once Redis is: failing fast never outlives the outage.
    redis.restart();
    let started = Instant::now();
    loop {
        let (status, _, _) = put(99).await;
        if status == 204 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never back: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The process's resident memory, from /proc.
fn rss_bytes(served: &ServedBinary) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", served.child.id())).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

#[test]
fn many_clients_sending_huge_headers_cost_little_memory() {
    let served = serve(&[]);
    let baseline = rss_bytes(&served);
    // 300 clients, no token, each sending 300 KiB of headers that never end: what
    // OOM-killed a 256 MiB replica in seconds when hyper buffered ~400 KiB each.
    let line = format!("X-Pad: {}\r\n", "p".repeat(1000));
    let mut clients: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut stream = connect(&served);
            stream
                .set_write_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let _ = stream.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n");
            stream
        })
        .collect();
    let mut peak = baseline;
    for _ in 0..300 {
        for stream in &mut clients {
            // Refused or reset once the server has given up on it: that is the point.
            let _ = stream.write(line.as_bytes());
        }
        peak = peak.max(rss_bytes(&served));
    }
    let growth = peak.saturating_sub(baseline);
    println!(
        "RSS {} MiB before, peak {} MiB with 300 clients sending 300 KiB headers",
        baseline >> 20,
        peak >> 20
    );
    for stream in &mut clients {
        let (text, closed) = read_until_closed(stream, Duration::from_secs(5));
        assert!(
            closed.is_some(),
            "a client over the header limit is kept open"
        );
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 431"),
            "{text}"
        );
    }
    assert!(growth < 48 << 20, "RSS grew by {} MiB", growth >> 20);
}

/// `helm template` of the chart with its default values file plus `--set` pairs.
fn render_chart(sets: &[&str]) -> Result<String, String> {
    let tmp = env!("CARGO_TARGET_TMPDIR");
    let tools = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/deploy-tools.sh"
        ))
        .arg(format!("{tmp}/deploy-tools"))
        .output()
        .unwrap();
    assert!(
        tools.status.success(),
        "{}",
        String::from_utf8_lossy(&tools.stderr)
    );
    let dir = String::from_utf8_lossy(&tools.stdout)
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_owned();
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/airstate");
    let values = format!("{chart}/ci/defaults-values.yaml");
    let mut command = Command::new(format!("{dir}/helm"));
    command
        .args(["template", "rel", chart, "-f", &values])
        .env("HOME", tmp)
        .env("HELM_CACHE_HOME", format!("{tmp}/helm-cache"))
        .env("HELM_CONFIG_HOME", format!("{tmp}/helm-config"))
        .env("HELM_DATA_HOME", format!("{tmp}/helm-data"));
    for set in sets {
        command.args(["--set", set]);
    }
    let output = command.output().unwrap();
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[test]
fn the_chart_sets_every_limit_and_a_drain_its_grace_period_covers() {
    let rendered = render_chart(&[]).unwrap();
    for (name, value) in [
        ("AIRSTATE_MAX_HEADER_BYTES", "32768"),
        ("AIRSTATE_HEADER_READ_TIMEOUT_MS", "10000"),
        ("AIRSTATE_BODY_READ_TIMEOUT_MS", "30000"),
        ("AIRSTATE_IDLE_TIMEOUT_MS", "60000"),
        ("AIRSTATE_MAX_CONNECTIONS", "1000"),
        ("AIRSTATE_MAX_CONCURRENT_REQUESTS", "256"),
        ("AIRSTATE_MAX_BODY_BYTES_IN_FLIGHT", "16777216"),
        ("AIRSTATE_SHUTDOWN_DRAIN_SECONDS", "5"),
        ("AIRSTATE_JWKS_TIMEOUT_MS", "5000"),
    ] {
        let entry = format!("{name}: \"{value}\"");
        assert!(
            rendered.contains(&entry),
            "{entry} missing from the ConfigMap"
        );
    }
    // No preStop: the image has no shell, the drain runs in the binary.
    assert!(!rendered.contains("preStop:"));
    assert!(rendered.contains("terminationGracePeriodSeconds: 30"));
    // Kubernetes would kill a pod mid-drain: the render refuses.
    let error = render_chart(&["terminationGracePeriodSeconds=25"]).unwrap_err();
    assert!(
        error.contains("terminationGracePeriodSeconds must be longer"),
        "{error}"
    );
    render_chart(&["terminationGracePeriodSeconds=26"]).unwrap();
}
