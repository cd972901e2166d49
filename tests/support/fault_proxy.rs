//! A TCP proxy that injects network faults between kvstrap and a real API server. TLS
//! passes through untouched (the server's certificate names 127.0.0.1, and so does the
//! proxy), so kvstrap talks to the real kube-apiserver and only the transport misbehaves:
//! - `Fault::Refuse`: every new connection is reset as soon as it is accepted, which the
//!   client sees as a failed connect;
//! - `Fault::Stall`: nothing is forwarded either way (a hung server or a black-holed
//!   route) until the fault changes;
//! - `Fault::Cut`: each connection is reset after a pseudo-random number of bytes, counted
//!   over both directions: requests cut before the server read them, answers cut after
//!   the server acted on them;
//! - `reset_all`: every open connection is reset now (a watch or a request in flight dies).
//!
//! Every fault it injected is counted, so a test can prove the faults really hit.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    None,
    /// Reset new connections at once.
    Refuse,
    /// Forward nothing until the fault changes.
    Stall,
    /// Reset each connection (open ones too) after `min..=max` more bytes.
    Cut { min: u64, max: u64 },
}

/// What the proxy did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub accepted: u64,
    pub refused: u64,
    /// Connections reset by `Fault::Cut` midway.
    pub cut: u64,
    /// Connections reset by `reset_all`.
    pub reset: u64,
    /// Connections the upstream server did not take (it was down).
    pub upstream_failed: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    cut: AtomicU64,
    reset: AtomicU64,
    upstream_failed: AtomicU64,
}

/// One proxied connection: the bytes it may still carry before it is cut.
struct Conn {
    left: AtomicI64,
}

const UNLIMITED: i64 = i64::MAX;

struct Shared {
    upstream: u16,
    fault: watch::Sender<Fault>,
    /// Bumped by `reset_all`: every connection resets when it changes.
    resets: watch::Sender<u64>,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    counters: Counters,
    rng: Mutex<u64>,
}

/// The proxy; dropped, it stops accepting and resets every open connection.
pub struct FaultProxy {
    pub port: u16,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to 127.0.0.1:`upstream`. Call it inside
    /// a tokio runtime.
    pub async fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            upstream,
            fault: watch::channel(Fault::None).0,
            resets: watch::channel(0).0,
            conns: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            rng: Mutex::new(0x9e37_79b9_7f4a_7c15),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        FaultProxy { port, shared, task }
    }

    /// From now on, this fault (open connections included).
    pub fn set(&self, fault: Fault) {
        let conns: Vec<Arc<Conn>> = self
            .shared
            .conns
            .lock()
            .unwrap()
            .values()
            .cloned()
            .collect();
        for c in conns {
            c.left.store(self.shared.budget(fault), Ordering::SeqCst);
        }
        self.shared.fault.send_replace(fault);
    }

    /// Resets every open connection now.
    pub fn reset_all(&self) {
        self.shared.resets.send_modify(|g| *g += 1);
    }

    pub fn counts(&self) -> Counts {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
        Counts {
            accepted: get(&c.accepted),
            refused: get(&c.refused),
            cut: get(&c.cut),
            reset: get(&c.reset),
            upstream_failed: get(&c.upstream_failed),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.reset_all();
    }
}

impl Shared {
    /// Bytes a connection may carry under `fault` before it is cut.
    fn budget(&self, fault: Fault) -> i64 {
        let Fault::Cut { min, max } = fault else {
            return UNLIMITED;
        };
        // xorshift: reproducible from run to run, no extra crate.
        let mut s = self.rng.lock().unwrap();
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        let span = max.saturating_sub(min).saturating_add(1);
        i64::try_from(min + *s % span).unwrap_or(UNLIMITED)
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut next_id = 0u64;
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        shared.counters.accepted.fetch_add(1, Ordering::SeqCst);
        next_id += 1;
        tokio::spawn(serve(client, next_id, shared.clone()));
    }
}

/// Every close of these sockets is a reset (RST), never an orderly FIN after buffered data.
fn reset_on_close(s: &TcpStream) {
    let _ = s.set_zero_linger();
}

async fn serve(client: TcpStream, id: u64, shared: Arc<Shared>) {
    reset_on_close(&client);
    let fault = *shared.fault.borrow();
    if fault == Fault::Refuse {
        shared.counters.refused.fetch_add(1, Ordering::SeqCst);
        return;
    }
    let Ok(upstream) = TcpStream::connect(("127.0.0.1", shared.upstream)).await else {
        shared
            .counters
            .upstream_failed
            .fetch_add(1, Ordering::SeqCst);
        return;
    };
    reset_on_close(&upstream);
    let conn = Arc::new(Conn {
        left: AtomicI64::new(shared.budget(fault)),
    });
    shared.conns.lock().unwrap().insert(id, conn.clone());
    let mut resets = shared.resets.subscribe();
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let up = pump(cr, uw, &conn, &shared);
    let down = pump(ur, cw, &conn, &shared);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        let ended = tokio::select! {
            e = &mut up, if !up_done => { up_done = true; e }
            e = &mut down, if !down_done => { down_done = true; e }
            _ = resets.changed() => {
                shared.counters.reset.fetch_add(1, Ordering::SeqCst);
                break;
            }
        };
        if ended == Ended::Cut {
            shared.counters.cut.fetch_add(1, Ordering::SeqCst);
            break;
        }
    }
    shared.conns.lock().unwrap().remove(&id);
    // The halves drop here: with zero linger, both peers get a reset.
}

#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The source closed (or failed): its end was passed on.
    Eof,
    /// The byte budget ran out (`Fault::Cut`): the connection must be reset.
    Cut,
}

/// Copies one direction until the source ends or the connection's byte budget runs out.
async fn pump(from: OwnedReadHalf, to: OwnedWriteHalf, conn: &Conn, shared: &Shared) -> Ended {
    let mut fault = shared.fault.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match read(&from, &mut buf).await {
            // Dropping `to` passes the end on (FIN).
            Ok(0) | Err(_) => return Ended::Eof,
            Ok(n) => n,
        };
        // A stall holds what was read until the fault changes.
        while *fault.borrow_and_update() == Fault::Stall {
            if fault.changed().await.is_err() {
                return Ended::Eof;
            }
        }
        // Unlimited connections start at i64::MAX and never get near a real budget.
        let len = i64::try_from(n).unwrap_or(UNLIMITED);
        let before = conn.left.fetch_sub(len, Ordering::SeqCst);
        if before < len {
            let part = usize::try_from(before.max(0)).unwrap_or(0);
            let _ = write_all(&to, &buf[..part]).await;
            return Ended::Cut;
        }
        if write_all(&to, &buf[..n]).await.is_err() {
            return Ended::Eof;
        }
    }
}

// Readiness and `try_*` rather than tokio's io-util extension traits, which this crate's
// tokio is built without.
async fn read(from: &OwnedReadHalf, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        from.readable().await?;
        match from.try_read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

async fn write_all(to: &OwnedWriteHalf, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        to.writable().await?;
        match to.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
