//! `[metrics] listen` under hostile clients (`src/metrics/serve.rs`): a request head over
//! 8 KiB, 40 slow clients at once, a client sending one byte per second, 100 idle
//! connections. Throughout, a well-behaved scrape is answered within a second, the server
//! keeps its one thread, and it never holds more than 16 connections.
//!
//! One test function, so its figures (threads of this process) see no other test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvstrap::metrics::serve::{self, Listening, Published, DEADLINE, MAX_CONNECTIONS};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A good scrape must be answered within this, whatever else the server is doing.
const SCRAPE_LIMIT: Duration = Duration::from_secs(1);
const TEXT: &str = "kvstrap_apply_runs_total 7\n";

#[test]
fn metrics_listener_bounds() {
    head_over_8_kib_gets_431_and_is_closed();
    forty_slow_clients_never_delay_a_scrape();
    one_byte_per_second_is_cut_at_the_deadline();
    a_hundred_idle_connections_cost_no_thread();
}

fn server() -> Listening {
    let text = Published::default();
    text.set(TEXT.into());
    serve::start("127.0.0.1:0".parse().unwrap(), text).unwrap()
}

/// One scrape: the whole answer, and how long it took. Panics past [`SCRAPE_LIMIT`].
#[track_caller]
fn scrape(addr: SocketAddr) -> Duration {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(SCRAPE_LIMIT)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: node\r\nAccept: text/plain\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let read = s.read_to_string(&mut out);
    let took = start.elapsed();
    assert!(read.is_ok(), "scrape: {read:?} after {took:?}, got {out:?}");
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out:?}");
    assert!(out.ends_with(TEXT), "{out:?}");
    assert!(took < SCRAPE_LIMIT, "a scrape took {took:?}");
    took
}

/// Scrapes every 200 ms while `busy` holds; the slowest one.
fn scrape_while(addr: SocketAddr, busy: &AtomicBool) -> (usize, Duration) {
    let (mut n, mut worst) = (0, Duration::ZERO);
    while busy.load(Ordering::SeqCst) {
        worst = worst.max(scrape(addr));
        n += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    (n, worst)
}

/// Threads of this process whose name starts with `metrics`.
fn metrics_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("metrics"))
        })
        .count()
}

fn head_over_8_kib_gets_431_and_is_closed() {
    let server = server();
    let addr = server.addr;
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut writer = s.try_clone().unwrap();
    // 100 KiB of header, written while the answer is read (the server may stop reading).
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(b"GET /metrics HTTP/1.1\r\nX-Pad: ");
        let pad = vec![b'a'; 1024];
        let mut sent = 0;
        for _ in 0..100 {
            match writer.write_all(&pad) {
                Ok(()) => sent += pad.len(),
                Err(_) => break,
            }
        }
        sent
    });
    let mut out = Vec::new();
    let read = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{read:?} {out:?}"
    );
    let sent = sender.join().unwrap();
    eprintln!("431 after the client had sent {sent} bytes of padding; the connection is closed");
    scrape(addr);
}

fn forty_slow_clients_never_delay_a_scrape() {
    let server = server();
    let addr = server.addr;
    let before = metrics_threads();
    let busy = Arc::new(AtomicBool::new(true));
    let connects = Arc::new(AtomicUsize::new(0));
    // Each sends one byte of a request head per second and never ends it; when the server
    // closes it, it connects again.
    let slow: Vec<_> = (0..40)
        .map(|_| {
            let (busy, connects) = (busy.clone(), connects.clone());
            std::thread::spawn(move || {
                let head = b"GET /metrics HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
                while busy.load(Ordering::SeqCst) {
                    let Ok(mut s) = TcpStream::connect(addr) else {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    };
                    connects.fetch_add(1, Ordering::SeqCst);
                    for b in head.iter().cycle() {
                        if !busy.load(Ordering::SeqCst) || s.write_all(&[*b]).is_err() {
                            break;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let stop = busy.clone();
    let window = DEADLINE + Duration::from_secs(3);
    let timer = std::thread::spawn(move || {
        std::thread::sleep(window);
        stop.store(false, Ordering::SeqCst);
    });
    let (n, worst) = scrape_while(addr, &busy);
    timer.join().unwrap();
    for t in slow {
        t.join().unwrap();
    }
    let load = &server.load;
    eprintln!(
        "40 slow clients ({} connections in {window:?}): {n} scrapes, the slowest {worst:?}; \
         at most {} connections held, {} closed to make room, {} at their deadline",
        connects.load(Ordering::SeqCst),
        load.most(),
        load.shed(),
        load.expired()
    );
    assert!(n >= 20, "{n} scrapes");
    assert!(
        load.most() <= MAX_CONNECTIONS,
        "{} connections held",
        load.most()
    );
    assert!(load.shed() > 0, "40 clients and 16 slots: some were closed");
    assert_eq!(metrics_threads(), before, "no thread per connection");
}

fn one_byte_per_second_is_cut_at_the_deadline() {
    let server = server();
    let addr = server.addr;
    let busy = Arc::new(AtomicBool::new(true));
    let stop = busy.clone();
    let trickle = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let start = Instant::now();
        let mut sent = 0;
        for b in
            b"GET /metrics HTTP/1.1\r\nHost: node\r\nX-Trickle: aaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n"
        {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            sent += 1;
            std::thread::sleep(Duration::from_secs(1));
            // Closed by the server: a read sees the end at once.
            s.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 64];
            match s.read(&mut buf) {
                Ok(0) => break,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Ok(n) => panic!("an answer to an unfinished head: {:?}", &buf[..n]),
                Err(_) => break,
            }
            s.set_nonblocking(false).unwrap();
        }
        stop.store(false, Ordering::SeqCst);
        (start.elapsed(), sent)
    });
    let (n, worst) = scrape_while(addr, &busy);
    let (closed, sent) = trickle.join().unwrap();
    eprintln!(
        "one byte per second: closed after {closed:?} ({sent} bytes); {n} scrapes meanwhile, \
         the slowest {worst:?}"
    );
    assert!(
        closed >= DEADLINE && closed < DEADLINE + Duration::from_secs(2),
        "closed after {closed:?}"
    );
    assert_eq!(server.load.expired(), 1, "closed by its deadline");
}

fn a_hundred_idle_connections_cost_no_thread() {
    let server = server();
    let addr = server.addr;
    let before = metrics_threads();
    let idle: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let took = scrape(addr);
    let load = &server.load;
    eprintln!(
        "100 idle connections: at most {} held ({} now), {} closed at once or to make room; \
         a scrape in {took:?}",
        load.most(),
        load.open(),
        load.shed()
    );
    assert!(load.most() <= MAX_CONNECTIONS, "{} held", load.most());
    assert!(load.shed() >= 100 - MAX_CONNECTIONS, "{} shed", load.shed());
    assert_eq!(metrics_threads(), before, "no thread per connection");
    drop(idle);
}
