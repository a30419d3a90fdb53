//! Attacks over real sockets, each against its own relay process: what a hostile client can do
//! to a connection's resources (hold it without a handshake, trickle its headers, stop
//! reading, zero HTTP/2 windows, floods of frames and of connections).
//!
//! Each test asserts the two things that matter to everyone else: a legitimate client (a fresh
//! TLS connection from 127.0.0.2) is answered throughout the attack, and afterwards the relay's
//! open connections and its memory come back down. The attack clients are the scripts in
//! `tests/attacks/`, bounded in count and time; `bench/attacks` runs them at scale and measures
//! latency. The relay's deadlines here are a second or two, so the area takes seconds.

mod harness;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;

use crate::common::{Upstream, UpstreamBehaviour};
use harness::{Target, n};

/// Asserts that the attack client saw the relay close every connection within `bound` seconds
/// (of its connection, first header byte or answer, as the mode counts) and that none it left
/// open had been held longer.
fn cut_within(summary: &serde_json::Value, bound: f64) {
    assert!(n(summary, "closed_by_server") > 0.0, "the relay closed none: {summary}");
    assert!(n(summary, "close_after_max") < bound, "closed too late: {summary}");
    let held = summary["held_max"].as_f64().unwrap_or(0.0);
    assert!(held < bound, "a connection outlived its deadline: {summary}");
}

/// How long an attack client may run in all: its `--seconds` and the time to wind down.
const ATTACK_BOUND: Duration = Duration::from_secs(30);

/// Spreads a client's connections over `count` addresses from 127.0.1.1 up, as many clients
/// would (each stays under the default per-address cap of 256).
fn spread(count: &str) -> [&str; 4] {
    ["--src", "127.0.1.1", "--src-count", count]
}

#[tokio::test]
async fn zero_window_http2_clients_holding_every_slot_do_not_keep_others_out() {
    // As many zero-window clients as there are connection slots, replaced as they are cut:
    // answers that can never be sent are stalled, so the relay cuts them (send_timeout) or
    // makes room for a newcomer (stalled connections go first).
    let target = Target::start(&[("max_connections", "64")], "").await;
    let mut attack = target
        .attack("h2.py", &["zero-window", "--connections", "64", "--streams", "4", "--reconnect", "--seconds", "3"]);
    let seen = target.during(&mut attack, ATTACK_BOUND).await;
    let summary = attack.summary();
    eprintln!("zero-window: {summary} {seen:?}");
    assert!(n(&summary, "opened") >= 64.0 && n(&summary, "closed_by_server") >= 64.0, "{summary}");
    cut_within(&summary, 2.5);
    assert!(target.closures(&["send_timeout", "overload"]).await >= 64);
    target.recovers().await;
}

#[tokio::test]
async fn slow_readers_of_large_answers_are_cut_off_at_the_send_timeout() {
    // 32 MiB: more than the loopback socket buffers of both hops hold, so the relay's writes
    // block and the send deadline runs.
    let big = Bytes::from(vec![b'x'; 32 << 20]);
    let upstream =
        Upstream::start(None, UpstreamBehaviour::respond(move |_| http::Response::new(Full::new(big.clone())))).await;
    let target = Target::start(&[], &format!("upstream = \"http://{}\"", upstream.addr)).await;
    let args =
        ["slow-reader", "--connections", "12", "--method", "POST", "--path", "/v1/auth/token/c", "--seconds", "3"];
    let mut attack = target.attack("conns.py", &args);
    let seen = target.during(&mut attack, ATTACK_BOUND).await;
    let summary = attack.summary();
    eprintln!("slow-reader: {summary} {seen:?}");
    assert_eq!((n(&summary, "answered"), n(&summary, "closed_by_server")), (12.0, 12.0), "{summary}");
    // What sat in the socket buffers arrived after the pause, far less than the answers.
    assert!(n(&summary, "received") < 12.0 * f64::from(32 << 20) / 2.0, "{summary}");
    assert!(target.closures(&["send_timeout"]).await >= 12);
    target.recovers().await;
}

#[tokio::test]
async fn slowloris_senders_are_cut_off_at_the_header_deadline() {
    let target = Target::start(&[], "").await;
    let mut args = vec!["slowloris", "--connections", "300", "--interval", "0.2", "--reconnect", "--seconds", "3"];
    args.extend(spread("4"));
    let mut attack = target.attack("conns.py", &args);
    let seen = target.during(&mut attack, ATTACK_BOUND).await;
    let summary = attack.summary();
    eprintln!("slowloris: {summary} {seen:?}");
    // Cut one header_read_timeout (1 s) after their first byte, not when the attack ended.
    cut_within(&summary, 2.5);
    let cut = n(&summary, "closed_by_server");
    assert!(target.closures(&["header_timeout"]).await as f64 >= cut, "{summary}");
    target.recovers().await;
}

#[tokio::test]
async fn five_thousand_unfinished_handshakes_are_cut_off_at_the_handshake_deadline() {
    // Half send nothing, half the start of a ClientHello. The deadline is long enough that
    // all 5,000 are held at once; the client ends once the relay has closed them all.
    let target = Target::start(&[("handshake_timeout", "\"5s\"")], "").await;
    let mut args = vec!["handshakes", "--connections", "5000", "--seconds", "15"];
    args.extend(spread("25"));
    let mut attack = target.attack("conns.py", &args);
    let seen = target.during(&mut attack, ATTACK_BOUND).await;
    let summary = attack.summary();
    eprintln!("handshakes: {summary} {seen:?}");
    assert_eq!((n(&summary, "opened"), n(&summary, "closed_by_server")), (5000.0, 5000.0), "{summary}");
    cut_within(&summary, 7.0);
    assert!(seen.peak_open >= 4000, "the handshakes were held at once: {seen:?}");
    let failed = target.metric("oauth_relay_tls_handshake_failures_total", "reason").await;
    assert!(failed.values().sum::<u64>() >= 5000, "{failed:?}");
    target.recovers().await;
}

#[tokio::test]
async fn a_connection_flood_from_one_address_meets_its_cap() {
    let target = Target::start(&[("max_connections_per_ip", "64")], "").await;
    let args = ["flood", "--connections", "16", "--count", "3000", "--seconds", "3"];
    let mut attack = target.attack("conns.py", &args);
    let seen = target.during(&mut attack, ATTACK_BOUND).await;
    let summary = attack.summary();
    eprintln!("flood: {summary} {seen:?}");
    let opened = n(&summary, "opened");
    assert!(opened >= 1000.0, "{summary}");
    // Beyond the cap, connections are closed as soon as they are accepted; within it, at the
    // handshake deadline.
    let refused = target.closures(&["per_ip_limit"]).await;
    assert!(refused as f64 >= opened - 64.0 * 4.0, "{refused} refused of {summary}");
    assert!(seen.peak_open <= 64 + 16, "one address held {} connections", seen.peak_open);
    cut_within(&summary, 2.5);
    target.recovers().await;
}

#[tokio::test]
async fn a_request_flood_over_http2_leaves_others_served() {
    // h2load from 64 connections, 100 streams each, as fast as the relay answers for 3 s: a
    // busy relay, not a broken one; every request is answered and nothing stays behind.
    let target = Target::start(&[], "").await;
    let mut flood =
        target.h2load("/healthz", &["--clients", "64", "--max-concurrent-streams", "100", "--duration", "3"]);
    let seen = target.during(&mut flood, ATTACK_BOUND).await;
    let out = flood.output();
    eprintln!("h2load: {seen:?}\n{out}");
    let requests = out.lines().find(|l| l.starts_with("requests: ")).unwrap_or_else(|| panic!("no totals:\n{out}"));
    let count = |what: &str| -> u64 {
        let field = requests.split(", ").find(|f| f.ends_with(what)).unwrap_or_else(|| panic!("{what}: {requests}"));
        field.trim_start_matches("requests: ").split(' ').next().and_then(|v| v.parse().ok()).expect("a count")
    };
    assert!(count(" succeeded") >= 1000, "{requests}");
    assert_eq!((count(" failed"), count(" errored"), count(" timeout")), (0, 0, 0), "{requests}");
    target.recovers().await;
}

/// 50 connections (replaced as they are closed), each opening and cancelling up to 2,000
/// streams as fast as it can, for 3 s.
const RAPID_RESET: [&str; 8] =
    ["rapid-reset", "--connections", "50", "--count", "2000", "--reconnect", "--seconds", "3"];

#[tokio::test]
async fn rapid_reset_streams_leave_nothing_behind() {
    // Each connection opens and cancels streams as fast as it can (CVE-2023-44487). A stream
    // the relay has already answered costs what a request costs; one reset before hyper took
    // it counts toward h2's limit (20 per connection), which ends the connection.
    let target = Target::start(&[], "").await;
    let mut attack = target.attack("h2.py", &RAPID_RESET);
    let seen = target.during(&mut attack, ATTACK_BOUND).await;
    let summary = attack.summary();
    eprintln!("rapid-reset: {summary} {seen:?}");
    assert!(n(&summary, "sent") >= 50.0 * 100.0, "{summary}");
    assert!(seen.peak_kib < target.baseline_kib + 32 * 1024, "RssAnon rose to {} KiB", seen.peak_kib);
    target.recovers().await;
}

#[tokio::test]
async fn a_continuation_flood_is_refused_before_it_fills_memory() {
    // Header blocks that never end, 16 KB at a time: the relay must give up on each at its
    // header list bound, not buffer what keeps coming.
    let target = Target::start(&[], "").await;
    let args = ["continuation", "--connections", "8", "--count", "2000", "--reconnect", "--seconds", "2"];
    let mut attack = target.attack("h2.py", &args);
    let seen = target.during(&mut attack, ATTACK_BOUND).await;
    let summary = attack.summary();
    eprintln!("continuation: {summary} {seen:?}");
    // Every connection is refused at once (those begun as the attack ended aside).
    assert!(n(&summary, "closed_by_server") >= n(&summary, "opened") - 8.0, "{summary}");
    cut_within(&summary, 1.5);
    assert!(seen.peak_kib < target.baseline_kib + 32 * 1024, "RssAnon rose to {} KiB", seen.peak_kib);
    target.recovers().await;
}

/// A flood of `mode` frames ("settings", "ping") on 8 connections, half of which never read
/// the answers.
async fn frame_flood(mode: &str) {
    let target = Target::start(&[], "").await;
    let args = [mode, "--connections", "8", "--count", "1000000", "--seconds", "3"];
    let mut attack = target.attack("h2.py", &args);
    let seen = target.during(&mut attack, ATTACK_BOUND).await;
    let summary = attack.summary();
    eprintln!("{mode} flood: {summary} {seen:?}");
    assert!(summary["seen"][mode].as_f64().unwrap_or(0.0) >= 1000.0, "the relay answered: {summary}");
    target.recovers().await;
}

#[tokio::test]
async fn a_settings_flood_leaves_others_served() {
    frame_flood("settings").await;
}

#[tokio::test]
async fn a_ping_flood_leaves_others_served() {
    frame_flood("ping").await;
}

// Attacks that once got through: a frame flood outliving the idle deadline, a warning per
// rapid-reset connection, a handshake flood keeping new clients out.

#[tokio::test]
async fn a_frame_flood_does_not_outlive_the_idle_deadline() {
    // PINGs and SETTINGS are not requests: the idle deadline (2 s, then the goodbye's second)
    // should end these connections however busy they keep the relay. Today 4 to 6 of the 8
    // stay open for the whole attack; with drive()'s timer branch polled outside the budget
    // (`tokio::task::unconstrained(&mut sleep)`), all 8 closed after 3.2 s in a trial build.
    let target = Target::start(&[], "").await;
    let args = ["settings", "--connections", "8", "--count", "10000000", "--seconds", "8"];
    let mut attack = target.attack("h2.py", &args);
    target.during(&mut attack, ATTACK_BOUND).await;
    let summary = attack.summary();
    eprintln!("settings flood: {summary}");
    // 2 s idle and 1 s of goodbye, with room for a test machine whose other tests keep both
    // cores busy (timers then fire late); a connection the relay never cut lives all 8 s.
    cut_within(&summary, 6.5);
    assert_eq!(n(&summary, "closed_by_server"), 8.0, "{summary}");
}

#[tokio::test]
async fn a_rapid_reset_attack_adds_no_warning_per_connection_to_the_log() {
    let target = Target::start(&[], "").await;
    let mut attack = target.attack("h2.py", &RAPID_RESET);
    target.during(&mut attack, ATTACK_BOUND).await;
    let summary = attack.summary();
    let log = target.relay.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    let opened = n(&summary, "opened");
    assert!(
        warnings.len() < 5,
        "{} warnings for {opened} connections, such as:\n{}",
        warnings.len(),
        warnings[..3].join("\n")
    );
}

#[tokio::test]
async fn a_handshake_flood_over_max_connections_does_not_keep_new_clients_out() {
    // Twice max_connections silent connections, 100 per address (under the per-address cap),
    // with the default handshake deadline: nginx would close connections that sent nothing
    // to make room (they are "reusable"); here every slot waits out its deadline.
    let target = Target::start(&[("max_connections", "500"), ("handshake_timeout", "\"10s\"")], "").await;
    let mut args = vec!["handshakes", "--connections", "1000", "--seconds", "6"];
    args.extend(spread("10"));
    let mut attack = target.attack("conns.py", &args);
    tokio::time::sleep(Duration::from_secs(1)).await;
    target.during(&mut attack, ATTACK_BOUND).await;
    target.recovers().await;
}
