//! A misbehaving upstream: a raw TCP server on loopback (optionally TLS) that reads each request
//! head, and a body of the length its `Content-Length` says, then plays the bytes, pauses and
//! closes the test's script gives for that request, whatever HTTP says about them. For answers
//! no real server library would send: two answers to one request, `Content-Length` beside
//! `Transfer-Encoding`, `101`, status `600`, a 200 KB head, a body cut off midway.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// One step of an answer.
#[derive(Debug, Clone)]
pub enum Step {
    /// These bytes, in one write.
    Write(Vec<u8>),
    /// A pause.
    Sleep(Duration),
    /// Close the connection (without a TLS close_notify).
    Close,
}

impl Step {
    pub fn write(bytes: impl AsRef<[u8]>) -> Step {
        Step::Write(bytes.as_ref().to_vec())
    }
}

/// A complete answer with `Content-Length`: `HTTP/1.1 {status}` and `body`.
pub fn answer(status: &str, body: &str) -> String {
    format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
}

type Script = dyn Fn(&str) -> Vec<Step> + Send + Sync;

/// What the rogue read, shared by its connections.
#[derive(Clone, Default)]
struct Seen {
    targets: Arc<Mutex<Vec<String>>>,
    heads: Arc<Mutex<Vec<String>>>,
}

/// A running rogue upstream; stops when dropped.
pub struct Rogue {
    pub addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
    /// The request target of every request read, in order.
    targets: Arc<Mutex<Vec<String>>>,
    /// The head of every request read, in order.
    heads: Arc<Mutex<Vec<String>>>,
    /// How many scripts have been played to their end.
    played: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Rogue {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Rogue {
    /// Plain HTTP on 127.0.0.1:0; `script` gets each request's target and returns its answer.
    pub async fn start(script: impl Fn(&str) -> Vec<Step> + Send + Sync + 'static) -> Rogue {
        Self::serve(None, Arc::new(script)).await
    }

    /// Like [`Rogue::start`], behind TLS with `tls`.
    pub async fn start_tls(
        tls: Arc<rustls::ServerConfig>,
        script: impl Fn(&str) -> Vec<Step> + Send + Sync + 'static,
    ) -> Rogue {
        Self::serve(Some(TlsAcceptor::from(tls)), Arc::new(script)).await
    }

    async fn serve(tls: Option<TlsAcceptor>, script: Arc<Script>) -> Rogue {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the rogue upstream");
        let addr = listener.local_addr().expect("local address");
        let (connections, played): (Arc<AtomicUsize>, Arc<AtomicUsize>) = Default::default();
        let seen = Seen::default();
        let shared = (Arc::clone(&connections), seen.clone(), Arc::clone(&played));
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                shared.0.fetch_add(1, Ordering::SeqCst);
                let (tls, script, seen, played) = (tls.clone(), script.clone(), shared.1.clone(), shared.2.clone());
                conns.spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                converse(stream, &*script, &seen, &played).await;
                            }
                        }
                        None => converse(tcp, &*script, &seen, &played).await,
                    }
                });
            }
        });
        Rogue { addr, connections, targets: seen.targets, heads: seen.heads, played, task }
    }

    /// How many connections were accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Every request target read, in order.
    pub fn targets(&self) -> Vec<String> {
        self.targets.lock().unwrap().clone()
    }

    /// Every request head read (request line and fields), in order.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    /// Waits (at most 10 s) until `n` scripts have been played to their end.
    pub async fn wait_played(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.played.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "the rogue upstream played {} of {n} scripts", self.played());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn played(&self) -> usize {
        self.played.load(Ordering::SeqCst)
    }
}

/// Reads requests on one connection and plays each one's script, until the peer closes, a
/// script closes, or nothing comes for 30 s.
async fn converse<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    script: &Script,
    seen: &Seen,
    played: &AtomicUsize,
) {
    let mut buf = Vec::new();
    while let Some((target, head)) = read_request(&mut stream, &mut buf).await {
        seen.targets.lock().unwrap().push(target.clone());
        seen.heads.lock().unwrap().push(head);
        for step in script(&target) {
            match step {
                Step::Write(bytes) => {
                    if stream.write_all(&bytes).await.is_err() || stream.flush().await.is_err() {
                        return;
                    }
                }
                Step::Sleep(d) => tokio::time::sleep(d).await,
                Step::Close => {
                    played.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
        }
        played.fetch_add(1, Ordering::SeqCst);
    }
}

/// One request from `stream` (`buf` keeps bytes read past it): its target and head, once its
/// head and its `Content-Length` body are in. `None` at the end of the stream, on a head over 64 KiB, or
/// after 30 s without a complete request.
async fn read_request<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> Option<(String, String)> {
    let read = async {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 64 * 1024 || !fill(stream, buf).await {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let length: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            if !fill(stream, buf).await {
                return None;
            }
        }
        buf.drain(..head_end + length);
        let target = head.split(' ').nth(1)?.to_string();
        Some((target, head))
    };
    tokio::time::timeout(Duration::from_secs(30), read).await.ok().flatten()
}

/// Appends what one read brings; false at the end of the stream or on an error.
async fn fill<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    match stream.read(&mut chunk).await {
        Ok(n @ 1..) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        _ => false,
    }
}
