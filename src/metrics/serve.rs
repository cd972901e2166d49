//! `[metrics] listen`: the same text over HTTP (`GET /metrics`), for a Prometheus that
//! scrapes nodes directly. One thread polls the listener and every connection, so a
//! client costs a slot, never a thread: at most [`MAX_CONNECTIONS`] at once, a request
//! head of at most [`MAX_HEAD`] bytes (longer: 431), and [`DEADLINE`] from accept to close.
//! The text is the one last written, never computed per request.

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// The longest request head (request line and headers) read; a longer one gets 431.
pub const MAX_HEAD: usize = 8 * 1024;
/// Connections held at once. One more closes the oldest, so clients that are slow (or
/// never finish) hold slots for a moment at most, and never lock out a scrape.
pub const MAX_CONNECTIONS: usize = 16;
/// From accept to close: the request read, the answer sent, the client's close awaited.
pub const DEADLINE: Duration = Duration::from_secs(5);

/// The text the server hands out; replace it after each run.
#[derive(Debug, Clone, Default)]
pub struct Published(Arc<RwLock<Arc<str>>>);

impl Published {
    pub fn set(&self, text: String) {
        let text: Arc<str> = text.into();
        match self.0.write() {
            Ok(mut t) => *t = text,
            Err(poisoned) => *poisoned.into_inner() = text,
        }
    }

    fn get(&self) -> Arc<str> {
        match self.0.read() {
            Ok(t) => Arc::clone(&t),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }
}

/// A running listener: where it listens, and what it holds.
#[derive(Debug, Clone)]
pub struct Listening {
    pub addr: SocketAddr,
    pub load: Arc<Load>,
}

/// Connections of one listener: open now, the most ever open at once, and those closed
/// to make room or because their deadline passed.
#[derive(Debug, Default)]
pub struct Load {
    open: AtomicUsize,
    most: AtomicUsize,
    shed: AtomicUsize,
    expired: AtomicUsize,
}

impl Load {
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
    pub fn most(&self) -> usize {
        self.most.load(Ordering::Relaxed)
    }
    pub fn shed(&self) -> usize {
        self.shed.load(Ordering::Relaxed)
    }
    pub fn expired(&self) -> usize {
        self.expired.load(Ordering::Relaxed)
    }
    fn held(&self, n: usize) {
        self.open.store(n, Ordering::Relaxed);
        self.most.fetch_max(n, Ordering::Relaxed);
    }
}

/// Listen on `addr` and serve `text` until the process ends (port 0 picks a free one). A
/// thread that cannot be started is an error, not a panic.
pub fn start(addr: SocketAddr, text: Published) -> std::io::Result<Listening> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let load = Arc::new(Load::default());
    let counted = Arc::clone(&load);
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || serve(&listener, &text, &counted))?;
    Ok(Listening { addr: bound, load })
}

/// The poll loop: connections make progress first, then new ones are accepted.
fn serve(listener: &TcpListener, text: &Published, load: &Load) {
    let mut conns: Vec<Conn> = Vec::with_capacity(MAX_CONNECTIONS);
    loop {
        let now = Instant::now();
        let before = conns.len();
        conns.retain(|c| now < c.deadline);
        load.expired
            .fetch_add(before - conns.len(), Ordering::Relaxed);
        load.held(conns.len());
        let wait = conns
            .iter()
            .map(|c| c.deadline.saturating_duration_since(now))
            .min()
            .map_or(PollTimeout::NONE, |d| {
                // Rounded up, so the loop does not spin in the last millisecond.
                PollTimeout::try_from(d + Duration::from_millis(1)).unwrap_or(PollTimeout::MAX)
            });
        let ready = match wait_ready(listener, &conns, wait) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("metrics listener: poll failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let mut kept = Vec::with_capacity(conns.len());
        for (mut c, events) in conns.into_iter().zip(&ready[1..]) {
            if events.is_empty() || c.progress(text) {
                kept.push(c);
            }
        }
        conns = kept;
        if ready[0].intersects(PollFlags::POLLIN) {
            accept_all(listener, &mut conns, load);
        }
        load.held(conns.len());
    }
}

/// What happened on the listener (first) and on each connection.
fn wait_ready(
    listener: &TcpListener,
    conns: &[Conn],
    wait: PollTimeout,
) -> nix::Result<Vec<PollFlags>> {
    let mut fds = Vec::with_capacity(conns.len() + 1);
    fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
    fds.extend(
        conns
            .iter()
            .map(|c| PollFd::new(c.stream.as_fd(), c.interest())),
    );
    match poll(&mut fds, wait) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
        Err(e) => return Err(e),
    }
    Ok(fds
        .iter()
        .map(|f| f.revents().unwrap_or(PollFlags::POLLERR))
        .collect())
}

/// Takes every pending connection. Past [`MAX_CONNECTIONS`] the oldest connection is
/// closed for the new one; only those accepted before this round count, so a burst of
/// connections cannot push out one that has not been read yet: when all were accepted just
/// now, the new one is closed at once.
fn accept_all(listener: &TcpListener, conns: &mut Vec<Conn>, load: &Load) {
    let round = Instant::now();
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of file descriptors, most likely: the pending ones wait, and the
                // loop must not spin on a listener that stays readable.
                tracing::debug!("metrics listener: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                return;
            }
        };
        if conns.len() >= MAX_CONNECTIONS {
            load.shed.fetch_add(1, Ordering::Relaxed);
            let oldest = conns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.accepted < round)
                .min_by_key(|(_, c)| c.accepted)
                .map(|(i, _)| i);
            match oldest {
                Some(i) => drop(conns.swap_remove(i)),
                None => continue,
            }
        }
        if stream.set_nonblocking(true).is_ok() {
            conns.push(Conn::new(stream));
        }
    }
}

struct Conn {
    stream: TcpStream,
    accepted: Instant,
    deadline: Instant,
    state: State,
}

enum State {
    /// Reading the request head.
    Head(Vec<u8>),
    /// Sending the answer: the status line and headers, the body, bytes sent so far.
    Answer {
        head: Vec<u8>,
        body: Arc<str>,
        sent: usize,
    },
    /// Answer sent and our side shut: what the client still sends is read and dropped
    /// until it closes, so the kernel does not reset the connection before the client
    /// read the answer.
    Drain,
}

impl Conn {
    fn new(stream: TcpStream) -> Conn {
        let accepted = Instant::now();
        Conn {
            stream,
            accepted,
            deadline: accepted + DEADLINE,
            state: State::Head(Vec::new()),
        }
    }

    fn interest(&self) -> PollFlags {
        match self.state {
            State::Answer { .. } => PollFlags::POLLOUT,
            State::Head(_) | State::Drain => PollFlags::POLLIN,
        }
    }

    /// Reads or writes what the socket allows now; false when the connection is done.
    fn progress(&mut self, text: &Published) -> bool {
        loop {
            let next = match &mut self.state {
                State::Head(buf) => match read_head(&mut self.stream, buf) {
                    Ok(Some(head)) => answer(&head, text),
                    Ok(None) => return true,
                    Err(()) => return false,
                },
                State::Answer { head, body, sent } => {
                    match send(&mut self.stream, head, body.as_bytes(), sent) {
                        Ok(true) => {
                            let _ = self.stream.shutdown(Shutdown::Write);
                            State::Drain
                        }
                        Ok(false) => return true,
                        Err(()) => return false,
                    }
                }
                State::Drain => return drain(&mut self.stream),
            };
            self.state = next;
        }
    }
}

/// What the head says once it is complete (`Some`), or its end is not here yet (`None`);
/// `Err` when the client closed or failed. A head over [`MAX_HEAD`] is complete too: as
/// far as it is read, and too long.
fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Option<Vec<u8>>, ()> {
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return Err(()),
            Ok(n) => {
                let end = buf.len().saturating_sub(3);
                buf.extend_from_slice(&chunk[..n]);
                // An empty line ends the head (CRLF, or a bare LF from a lax client).
                let ended = buf[end..].windows(2).enumerate().any(|(i, w)| {
                    w == b"\n\n" || (w == b"\n\r" && buf.get(end + i + 2) == Some(&b'\n'))
                });
                if ended || buf.len() > MAX_HEAD {
                    return Ok(Some(std::mem::take(buf)));
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Err(()),
        }
    }
}

/// Writes what the socket takes of `head` then `body`; true once all is sent.
fn send(stream: &mut TcpStream, head: &[u8], body: &[u8], sent: &mut usize) -> Result<bool, ()> {
    loop {
        let rest = match head.get(*sent..) {
            Some(h) if !h.is_empty() => h,
            _ => body
                .get(sent.saturating_sub(head.len())..)
                .unwrap_or_default(),
        };
        if rest.is_empty() {
            return Ok(true);
        }
        match stream.write(rest) {
            Ok(0) => return Err(()),
            Ok(n) => *sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Err(()),
        }
    }
}

/// Reads and drops input; false once the client closed (or failed).
fn drain(stream: &mut TcpStream) -> bool {
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// The answer to a request head.
fn answer(head: &[u8], text: &Published) -> State {
    let (status, body, kind): (&str, Arc<str>, &str) = if head.len() > MAX_HEAD {
        (
            "431 Request Header Fields Too Large",
            "request head over 8 KiB\n".into(),
            "text/plain",
        )
    } else {
        let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
        let mut parts = line.split(|&b| b == b' ');
        match (parts.next(), parts.next()) {
            (Some(b"GET"), Some(b"/metrics" | b"/")) => (
                "200 OK",
                text.get(),
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            (Some(b"GET"), _) => (
                "404 Not Found",
                "kvstrap serves /metrics\n".into(),
                "text/plain",
            ),
            _ => ("405 Method Not Allowed", "only GET\n".into(), "text/plain"),
        }
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    State::Answer {
        head: head.into_bytes(),
        body,
        sent: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{e}"));
        let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    fn server(text: &Published) -> SocketAddr {
        start(
            "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")),
            text.clone(),
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .addr
    }

    #[test]
    fn serves_the_latest_text_on_metrics_only() {
        let text = Published::default();
        text.set("kvstrap_apply_runs_total 1\n".into());
        let addr = server(&text);
        let first = get(addr, "/metrics");
        assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
        assert!(first.contains("version=0.0.4"), "{first}");
        assert!(
            first.ends_with("\r\n\r\nkvstrap_apply_runs_total 1\n"),
            "{first}"
        );
        text.set("kvstrap_apply_runs_total 2\n".into());
        assert!(get(addr, "/metrics").ends_with("kvstrap_apply_runs_total 2\n"));
        assert!(get(addr, "/other").starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn a_head_in_pieces_is_answered_once_complete_and_other_methods_get_405() {
        let text = Published::default();
        text.set("a 1\n".into());
        let addr = server(&text);
        let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{e}"));
        for piece in ["GET /met", "rics HTTP/1.1\r\nHost: x\r", "\n", "\r\n"] {
            let _ = s.write_all(piece.as_bytes());
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\na 1\n"), "{out}");
        let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{e}"));
        let _ = write!(s, "POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 405"), "{out}");
    }
}
