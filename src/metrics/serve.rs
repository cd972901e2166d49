//! `[metrics] listen`: the same text over HTTP (`GET /metrics`), for a Prometheus that
//! scrapes nodes directly. A thread per connection on a plain listener is plenty for a
//! scrape every few seconds; the text is the one last written, never computed per request.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// The text the server hands out; replace it after each run.
#[derive(Debug, Clone, Default)]
pub struct Published(Arc<RwLock<String>>);

impl Published {
    pub fn set(&self, text: String) {
        match self.0.write() {
            Ok(mut t) => *t = text,
            Err(poisoned) => *poisoned.into_inner() = text,
        }
    }

    fn get(&self) -> String {
        match self.0.read() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// Listen on `addr` and serve `text` until the process ends. Returns the bound address
/// (port 0 picks a free one).
pub fn start(addr: SocketAddr, text: Published) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let text = text.clone();
                // A slow client gets its own thread and a time limit, never the listener.
                let _ = std::thread::Builder::new()
                    .name("metrics-conn".into())
                    .spawn(move || answer(conn, &text));
            }
        })?;
    Ok(bound)
}

fn answer(conn: TcpStream, text: &Published) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(&conn);
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    // Read the headers to their end so the client is not cut off mid-request.
    let mut line = String::new();
    while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
        line.clear();
    }
    let mut parts = request.split_whitespace();
    let (status, body, kind) = match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics" | "/")) => (
            "200 OK",
            text.get(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        (Some("GET"), _) => (
            "404 Not Found",
            "kvstrap serves /metrics\n".into(),
            "text/plain",
        ),
        _ => ("405 Method Not Allowed", "only GET\n".into(), "text/plain"),
    };
    let mut w = &conn;
    let _ = write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{e}"));
        let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    #[test]
    fn serves_the_latest_text_on_metrics_only() {
        let text = Published::default();
        text.set("kvstrap_apply_runs_total 1\n".into());
        let addr = start(
            "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")),
            text.clone(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
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
}
