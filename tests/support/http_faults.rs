//! An HTTP proxy in front of the real API server that answers chosen requests with an
//! error of its own. It terminates TLS with the control plane's own serving certificate
//! (signed by the CA kvstrap's kubeconfig trusts, for 127.0.0.1), forwards every request
//! to the real kube-apiserver with the harness's client, and lets a test say, per method
//! and path, "answer the next N of these with status S" — either instead of the server
//! (`Stage::Before`: the request never reaches it) or after it (`Stage::After`: the server
//! acted, the client only sees the error). Status 429 carries `Retry-After: 1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Whether an injected error replaces the server's answer or the request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Answered by the proxy; the server never sees the request.
    Before,
    /// Forwarded; the server acts on it; the client gets the error instead of the answer.
    After,
}

#[derive(Debug, Clone)]
struct Rule {
    method: String,
    /// A substring of the path and query (`/api/v1/persistentvolumes`, `watch=true`).
    path: String,
    status: u16,
    stage: Stage,
    times: u32,
}

/// One error the proxy answered with: method, path and query, status, stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub stage: Stage,
}

#[derive(Default)]
struct Rules {
    rules: Vec<Rule>,
    injected: Vec<Injected>,
    forwarded: u64,
}

#[derive(Clone)]
struct Proxy {
    upstream: kube::Client,
    rules: Arc<Mutex<Rules>>,
}

pub struct HttpFaults {
    pub port: u16,
    rules: Arc<Mutex<Rules>>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpFaults {
    /// Serves on a free loopback port with `cert_dir`'s `server.crt` and `server.key`,
    /// forwarding to the server `upstream` talks to. Call it inside a tokio runtime.
    pub async fn start(cert_dir: &Path, upstream: kube::Client) -> HttpFaults {
        let tcp = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        let listener = TlsListener {
            tcp,
            acceptor: acceptor(cert_dir),
        };
        let rules = Arc::new(Mutex::new(Rules::default()));
        let state = Proxy {
            upstream,
            rules: rules.clone(),
        };
        let app = axum::Router::new().fallback(forward).with_state(state);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        HttpFaults { port, rules, task }
    }

    /// The next `times` requests with `method` whose path and query contain `path` get
    /// `status`, at `stage`.
    pub fn fail(&self, method: &str, path: &str, status: u16, stage: Stage, times: u32) {
        self.rules.lock().unwrap().rules.push(Rule {
            method: method.to_string(),
            path: path.to_string(),
            status,
            stage,
            times,
        });
    }

    /// The errors injected so far.
    pub fn injected(&self) -> Vec<Injected> {
        self.rules.lock().unwrap().injected.clone()
    }

    /// Rules that have not fired as often as asked.
    pub fn unused(&self) -> Vec<String> {
        let r = self.rules.lock().unwrap();
        r.rules
            .iter()
            .filter(|r| r.times > 0)
            .map(|r| format!("{} {} -> {} x{}", r.method, r.path, r.status, r.times))
            .collect()
    }

    /// Requests passed to the server (including those answered with an error after).
    pub fn forwarded(&self) -> u64 {
        self.rules.lock().unwrap().forwarded
    }
}

impl Drop for HttpFaults {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn acceptor(dir: &Path) -> tokio_rustls::TlsAcceptor {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&std::fs::read(dir.join("server.crt")).unwrap())
            .collect::<Result<_, _>>()
            .unwrap();
    let key =
        PrivateKeyDer::from_pem_slice(&std::fs::read(dir.join("server.key")).unwrap()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

struct TlsListener {
    tcp: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            // A client that gives up during the handshake is no reason to stop serving.
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

impl Proxy {
    /// The rule that fires for this request, if any (and counts it down).
    fn take(&self, method: &str, path: &str) -> Option<(u16, Stage)> {
        let mut r = self.rules.lock().unwrap();
        let rule = r
            .rules
            .iter_mut()
            .find(|r| r.times > 0 && r.method == method && path.contains(&r.path))?;
        rule.times -= 1;
        let fired = (rule.status, rule.stage);
        r.injected.push(Injected {
            method: method.to_string(),
            path: path.to_string(),
            status: fired.0,
            stage: fired.1,
        });
        Some(fired)
    }
}

async fn forward(State(proxy): State<Proxy>, req: Request) -> Response {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let fault = proxy.take(&method, &path);
    if let Some((status, Stage::Before)) = fault {
        return error(status);
    }
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 64 << 20).await else {
        return error(400);
    };
    let mut out = http::Request::builder()
        .method(parts.method)
        .uri(path.as_str());
    for name in [http::header::CONTENT_TYPE, http::header::ACCEPT] {
        if let Some(v) = parts.headers.get(&name) {
            out = out.header(name, v);
        }
    }
    let out = out.body(kube::client::Body::from(bytes.to_vec())).unwrap();
    proxy.rules.lock().unwrap().forwarded += 1;
    let answer = proxy.upstream.send(out).await;
    if let Some((status, Stage::After)) = fault {
        // Wait for the server's whole answer, so the write surely happened.
        if let Ok(a) = answer {
            let _ = axum::body::to_bytes(Body::new(a.into_body()), usize::MAX).await;
        }
        return error(status);
    }
    match answer {
        Ok(a) => a.map(Body::new),
        Err(e) => (http::StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

/// A Kubernetes Status answer with `code`.
fn error(code: u16) -> Response {
    let reason = match code {
        409 => "Conflict",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        _ => "Unknown",
    };
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("injected by the test proxy: {code} {reason}"),
        "reason": reason, "code": code,
    });
    let status = http::StatusCode::from_u16(code).unwrap();
    let mut r = (status, axum::Json(body)).into_response();
    if code == 429 {
        r.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("1"),
        );
    }
    r
}
