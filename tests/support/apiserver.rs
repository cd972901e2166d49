//! An in-process Kubernetes API-server double on 127.0.0.1: list, get, server-side apply,
//! delete and watch for PersistentVolumes, StorageClasses and Events, speaking Kubernetes
//! JSON. It enforces what a real API server checks for local PVs (node affinity, absolute
//! local.path, capacity, DNS-1123 names, immutable fields, delete preconditions) and
//! records every deletion with the phase the PV had, so tests can prove no Bound PV died.
//! Where the real control plane was seen to behave in a way that matters to kvstrap, the
//! double does the same (pinned by tests/kube_real.rs): a new PV is answered Pending and
//! made Available, with the pv-protection finalizer, just after; a Released PV with
//! reclaim Delete and no external `pv.kubernetes.io/provisioned-by` goes `Failed`; Events
//! with `eventTime` need `action`, `reportingComponent` and `reportingInstance`; an Event
//! name that exists already is a 409.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, watch};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Pv,
    Sc,
    Event,
}

impl Kind {
    fn kind(self) -> &'static str {
        match self {
            Kind::Pv => "PersistentVolume",
            Kind::Sc => "StorageClass",
            Kind::Event => "Event",
        }
    }
    fn api_version(self) -> &'static str {
        match self {
            Kind::Sc => "storage.k8s.io/v1",
            _ => "v1",
        }
    }
}

#[derive(Default)]
struct Store {
    objects: BTreeMap<(Kind, String), Value>,
    rv: u64,
    /// (name, phase at deletion, by whom)
    deletions: Vec<(String, Option<String>, &'static str)>,
    faults: VecDeque<u16>,
    /// PV that a claim binds right before the next delete of it is handled.
    race_bind: Option<String>,
    /// Like the real server's `kubernetes.io/pv-protection` finalizer: a deleted PV stays,
    /// terminating, this long before it goes (None: gone at once).
    pv_protection: Option<std::time::Duration>,
    requests: u64,
    applies: u64,
    /// Events accepted.
    event_posts: u64,
}

pub struct Double {
    store: Mutex<Store>,
    events: broadcast::Sender<(Kind, &'static str, Value)>,
    restart: watch::Sender<u64>,
}

pub type Shared = Arc<Double>;

impl Double {
    pub fn new() -> Shared {
        let (events, _) = broadcast::channel(65536);
        let (restart, _) = watch::channel(0);
        Arc::new(Double {
            store: Mutex::new(Store::default()),
            events,
            restart,
        })
    }

    /// Serves on 127.0.0.1:`port` (0: any free port); returns the port.
    pub async fn serve(self: &Shared, port: u16) -> u16 {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = router(self.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        port
    }

    // ---- test controls -------------------------------------------------------------

    /// The next requests (not watches) answer these status codes, in order.
    pub fn fail_next(&self, codes: &[u16]) {
        self.store
            .lock()
            .unwrap()
            .faults
            .extend(codes.iter().copied());
    }

    /// Deleted PVs linger, terminating, for `delay` (kube-controller-manager removes the
    /// pv-protection finalizer of an unbound PV within about a second).
    pub fn pv_protection(&self, delay: std::time::Duration) {
        self.store.lock().unwrap().pv_protection = Some(delay);
    }

    /// The PV controller binds `name` between kvstrap's list and its delete.
    pub fn race_bind_on_delete(&self, name: &str) {
        self.store.lock().unwrap().race_bind = Some(name.to_string());
    }

    /// Ends every open watch stream.
    pub fn restart_watches(&self) {
        self.restart.send_modify(|g| *g += 1);
    }

    pub fn pvs(&self) -> BTreeMap<String, Value> {
        self.list_kind(Kind::Pv)
    }

    pub fn storage_classes(&self) -> BTreeMap<String, Value> {
        self.list_kind(Kind::Sc)
    }

    pub fn events(&self) -> Vec<Value> {
        self.list_kind(Kind::Event).into_values().collect()
    }

    pub fn deletions(&self) -> Vec<(String, Option<String>, &'static str)> {
        self.store.lock().unwrap().deletions.clone()
    }

    pub fn applies(&self) -> u64 {
        self.store.lock().unwrap().applies
    }

    pub fn event_posts(&self) -> u64 {
        self.store.lock().unwrap().event_posts
    }

    pub fn phase(&self, name: &str) -> Option<String> {
        self.pvs()
            .get(name)
            .and_then(|pv| pv["status"]["phase"].as_str().map(String::from))
    }

    fn list_kind(&self, kind: Kind) -> BTreeMap<String, Value> {
        let s = self.store.lock().unwrap();
        s.objects
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|((_, n), v)| (n.clone(), v.clone()))
            .collect()
    }

    /// What the PV controller does when a claim binds the PV.
    pub fn bind(&self, name: &str) {
        self.mutate_pv(name, |pv| {
            pv["spec"]["claimRef"] = json!({"kind": "PersistentVolumeClaim", "namespace": "vms", "name": format!("claim-{name}"), "uid": "claim-uid"});
            pv["status"] = json!({"phase": "Bound"});
        });
    }

    /// What kube-controller-manager's PV controller does when the bound claim is deleted:
    /// Released; then, for reclaim Delete, it looks for the deleter: an in-tree plugin for
    /// a `kubernetes.io/` provisioner name or none at all (none matches a local PV, so the PV
    /// goes Failed), otherwise the external provisioner named, which it leaves the PV to.
    pub fn release(&self, name: &str) {
        self.mutate_pv(name, |pv| {
            let by = pv["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"]
                .as_str()
                .unwrap_or_default();
            let external = !by.is_empty() && !by.starts_with("kubernetes.io/");
            if pv["spec"]["persistentVolumeReclaimPolicy"] == "Delete" && !external {
                pv["status"] = json!({"phase": "Failed", "message":
                    format!("error getting deleter volume plugin for volume \"{}\": no volume plugin matched", pv["metadata"]["name"].as_str().unwrap_or_default())});
            } else {
                pv["status"] = json!({"phase": "Released"});
            }
        });
    }

    /// `kubectl patch pv ... persistentVolumeReclaimPolicy`: the field now belongs to
    /// another field manager, as on the real server.
    pub fn set_reclaim(&self, name: &str, policy: &str) {
        self.mutate_pv(name, |pv| {
            pv["spec"]["persistentVolumeReclaimPolicy"] = json!(policy);
            pv["metadata"]["managedFields"] = json!([{"manager": "kubectl-patch", "operation": "Update",
                "apiVersion": "v1", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:spec": {"f:persistentVolumeReclaimPolicy": {}}}}]);
        });
    }

    /// `kubectl label pv NAME kvstrap.io/node-`.
    pub fn remove_label(&self, name: &str, label: &str) {
        self.mutate_pv(name, |pv| {
            pv["metadata"]["labels"]
                .as_object_mut()
                .unwrap()
                .remove(label);
        });
    }

    /// What an earlier kvstrap's PV (no provisioned-by annotation) went through when its
    /// claim was deleted: in one step, so no publisher pass sees it in between.
    pub fn release_unannotated(&self, name: &str) {
        self.remove_annotation(name, "pv.kubernetes.io/provisioned-by");
        self.release(name);
    }

    /// `kubectl annotate pv NAME KEY-`.
    pub fn remove_annotation(&self, name: &str, key: &str) {
        self.mutate_pv_quietly(name, |pv| {
            if let Some(a) = pv["metadata"]["annotations"].as_object_mut() {
                a.remove(key);
            }
        });
    }

    /// `kubectl delete sc`.
    pub fn delete_storage_class(&self, name: &str) {
        self.store
            .lock()
            .unwrap()
            .objects
            .remove(&(Kind::Sc, name.to_string()));
    }

    /// `kubectl delete pv` held by the pv-protection finalizer: the PV stays, terminating.
    pub fn mark_terminating(&self, name: &str) {
        self.mutate_pv(name, |pv| {
            pv["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z")
        });
    }

    /// `kubectl delete pv`.
    pub fn delete_by_hand(&self, name: &str) {
        let mut s = self.store.lock().unwrap();
        if let Some(old) = s.objects.remove(&(Kind::Pv, name.to_string())) {
            let phase = old["status"]["phase"].as_str().map(String::from);
            s.deletions.push((name.to_string(), phase, "admin"));
            let _ = self.events.send((Kind::Pv, "DELETED", old));
        }
    }

    /// A change no watcher hears of (the next one it makes is seen with it).
    fn mutate_pv_quietly(&self, name: &str, f: impl FnOnce(&mut Value)) {
        let mut s = self.store.lock().unwrap();
        if let Some(pv) = s.objects.get_mut(&(Kind::Pv, name.to_string())) {
            f(pv);
        }
    }

    fn mutate_pv(&self, name: &str, f: impl FnOnce(&mut Value)) {
        let mut s = self.store.lock().unwrap();
        s.rv += 1;
        let rv = s.rv.to_string();
        let pv = s
            .objects
            .get_mut(&(Kind::Pv, name.to_string()))
            .unwrap_or_else(|| panic!("no PV {name}"));
        f(pv);
        pv["metadata"]["resourceVersion"] = json!(rv);
        let pv = pv.clone();
        let _ = self.events.send((Kind::Pv, "MODIFIED", pv));
    }

    /// What kube-controller-manager does to a PV just created (answered Pending): the PV
    /// controller makes it Available and the protection controller adds its finalizer, in
    /// a write of their own (pinned by tests/kube_real.rs).
    fn settle_new_pv(&self, name: &str, uid: &Value) {
        let pending = {
            let s = self.store.lock().unwrap();
            s.objects
                .get(&(Kind::Pv, name.to_string()))
                .is_some_and(|pv| {
                    pv["metadata"]["uid"] == *uid && pv["status"]["phase"] == "Pending"
                })
        };
        if pending {
            self.mutate_pv(name, |pv| {
                pv["status"] = json!({"phase": "Available"});
                pv["metadata"]["finalizers"] = json!(["kubernetes.io/pv-protection"]);
            });
        }
    }

    fn take_fault(&self) -> Option<Response> {
        let mut s = self.store.lock().unwrap();
        s.requests += 1;
        let code = s.faults.pop_front()?;
        Some(status(code, "Injected", "injected failure"))
    }
}

fn router(d: Shared) -> Router {
    Router::new()
        .route("/api/v1/persistentvolumes", get(list_pv).post(create_pv))
        .route(
            "/api/v1/persistentvolumes/{name}",
            get(get_pv).patch(patch_pv).delete(delete_pv),
        )
        .route("/apis/storage.k8s.io/v1/storageclasses", get(list_sc))
        .route(
            "/apis/storage.k8s.io/v1/storageclasses/{name}",
            get(get_sc).patch(patch_sc).delete(delete_sc),
        )
        .route(
            "/api/v1/namespaces/{ns}/events",
            post(create_event).get(list_events),
        )
        .with_state(d)
}

type Q = Query<HashMap<String, String>>;

async fn list_pv(State(d): State<Shared>, q: Q) -> Response {
    list(d, Kind::Pv, q.0).await
}
async fn list_sc(State(d): State<Shared>, q: Q) -> Response {
    list(d, Kind::Sc, q.0).await
}
async fn list_events(State(d): State<Shared>, q: Q) -> Response {
    list(d, Kind::Event, q.0).await
}
async fn get_pv(State(d): State<Shared>, Path(n): Path<String>) -> Response {
    get_one(d, Kind::Pv, n)
}
async fn get_sc(State(d): State<Shared>, Path(n): Path<String>) -> Response {
    get_one(d, Kind::Sc, n)
}
async fn patch_pv(
    State(d): State<Shared>,
    Path(n): Path<String>,
    q: Q,
    h: HeaderMap,
    b: Bytes,
) -> Response {
    apply(d, Kind::Pv, n, q.0, h, b)
}
async fn patch_sc(
    State(d): State<Shared>,
    Path(n): Path<String>,
    q: Q,
    h: HeaderMap,
    b: Bytes,
) -> Response {
    apply(d, Kind::Sc, n, q.0, h, b)
}
async fn delete_pv(State(d): State<Shared>, Path(n): Path<String>, b: Bytes) -> Response {
    delete(d, Kind::Pv, n, b)
}
async fn delete_sc(State(d): State<Shared>, Path(n): Path<String>, b: Bytes) -> Response {
    delete(d, Kind::Sc, n, b)
}
async fn create_pv(State(_d): State<Shared>) -> Response {
    status(
        405,
        "MethodNotAllowed",
        "kvstrap must use server-side apply",
    )
}

async fn create_event(State(d): State<Shared>, Path(ns): Path<String>, b: Bytes) -> Response {
    if let Some(r) = d.take_fault() {
        return r;
    }
    let Ok(mut ev) = serde_json::from_slice::<Value>(&b) else {
        return status(400, "BadRequest", "not JSON");
    };
    let name = ev["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if ev["involvedObject"]["name"].as_str().is_none() || ev["reason"].as_str().is_none() {
        return status(422, "Invalid", "event needs involvedObject.name and reason");
    }
    // What the real server says (seen on v1.32) for a "new" Event missing these fields.
    if !ev["eventTime"].is_null() {
        for field in ["action", "reportingComponent", "reportingInstance"] {
            if ev[field].as_str().is_none_or(str::is_empty) {
                return status(
                    422,
                    "Invalid",
                    &format!("Event \"{name}\" is invalid: {field}: Required value"),
                );
            }
        }
    }
    if ev["metadata"]["namespace"].as_str() != Some(ns.as_str()) {
        return status(422, "Invalid", "namespace mismatch");
    }
    let mut s = d.store.lock().unwrap();
    if s.objects.contains_key(&(Kind::Event, name.clone())) {
        return status(
            409,
            "AlreadyExists",
            &format!("events \"{name}\" already exists"),
        );
    }
    s.event_posts += 1;
    s.rv += 1;
    ev["metadata"]["resourceVersion"] = json!(s.rv.to_string());
    s.objects.insert((Kind::Event, name), ev.clone());
    (StatusCode::CREATED, axum::Json(ev)).into_response()
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    (StatusCode::from_u16(code).unwrap(), axum::Json(body)).into_response()
}

fn matches_selector(obj: &Value, selector: Option<&String>) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    sel.split(',').all(|term| {
        let (k, v) = term.split_once('=').unwrap();
        obj["metadata"]["labels"][k].as_str() == Some(v)
    })
}

async fn list(d: Shared, kind: Kind, q: HashMap<String, String>) -> Response {
    if q.get("watch").map(String::as_str) == Some("true")
        || q.get("watch").map(String::as_str) == Some("1")
    {
        return watch_stream(d, kind, q.get("labelSelector").cloned());
    }
    if let Some(r) = d.take_fault() {
        return r;
    }
    let s = d.store.lock().unwrap();
    let items: Vec<Value> = s
        .objects
        .iter()
        .filter(|((k, _), o)| *k == kind && matches_selector(o, q.get("labelSelector")))
        .map(|(_, o)| o.clone())
        .collect();
    let body = json!({"kind": format!("{}List", kind.kind()), "apiVersion": kind.api_version(),
        "metadata": {"resourceVersion": s.rv.to_string()}, "items": items});
    axum::Json(body).into_response()
}

fn watch_stream(d: Shared, kind: Kind, selector: Option<String>) -> Response {
    let rx = d.events.subscribe();
    let mut restart = d.restart.subscribe();
    restart.mark_unchanged();
    let stream = futures::stream::unfold(
        (rx, restart, selector),
        move |(mut rx, mut restart, sel)| async move {
            loop {
                tokio::select! {
                    _ = restart.changed() => return None,
                    ev = rx.recv() => match ev {
                        Ok((k, ty, obj)) if k == kind && matches_selector(&obj, sel.as_ref()) => {
                            let mut line = serde_json::to_vec(&json!({"type": ty, "object": obj})).unwrap();
                            line.push(b'\n');
                            return Some((Ok::<_, std::convert::Infallible>(Bytes::from(line)), (rx, restart, sel)));
                        }
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return None,
                    }
                }
            }
        },
    );
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn get_one(d: Shared, kind: Kind, name: String) -> Response {
    if let Some(r) = d.take_fault() {
        return r;
    }
    match d.store.lock().unwrap().objects.get(&(kind, name.clone())) {
        Some(o) => axum::Json(o.clone()).into_response(),
        None => status(
            404,
            "NotFound",
            &format!("{} \"{name}\" not found", kind.kind()),
        ),
    }
}

fn apply(
    d: Shared,
    kind: Kind,
    name: String,
    q: HashMap<String, String>,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = d.take_fault() {
        return r;
    }
    let ct = h
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if ct != "application/apply-patch+yaml" {
        return status(
            415,
            "UnsupportedMediaType",
            &format!("only server-side apply is served, got {ct}"),
        );
    }
    if q.get("fieldManager").map(String::as_str) != Some("kvstrap")
        || q.get("force").map(String::as_str) != Some("true")
    {
        return status(
            422,
            "Invalid",
            "fieldManager=kvstrap and force=true expected",
        );
    }
    let Ok(applied) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "body is not JSON");
    };
    if applied["kind"] != kind.kind() || applied["apiVersion"] != kind.api_version() {
        return status(400, "BadRequest", "kind/apiVersion missing or wrong");
    }
    if applied["metadata"]["name"].as_str() != Some(name.as_str()) {
        return status(400, "BadRequest", "name in body differs from URL");
    }
    if !is_dns1123_subdomain(&name) {
        return status(
            422,
            "Invalid",
            &format!("metadata.name {name:?}: a lowercase RFC 1123 subdomain must ..."),
        );
    }
    let mut s = d.store.lock().unwrap();
    s.applies += 1;
    let existing = s.objects.get(&(kind, name.clone())).cloned();
    let merged = match &existing {
        None => create_from(kind, &applied, s.rv + 1),
        Some(old) => merge(kind, old, &applied),
    };
    if let Err(msg) =
        validate(kind, &merged).and_then(|()| immutable(kind, existing.as_ref(), &merged))
    {
        return status(422, "Invalid", &msg);
    }
    if existing.as_ref() == Some(&merged) {
        return axum::Json(merged).into_response();
    }
    s.rv += 1;
    let mut merged = merged;
    merged["metadata"]["resourceVersion"] = json!(s.rv.to_string());
    s.objects.insert((kind, name.clone()), merged.clone());
    if kind == Kind::Pv && existing.is_none() {
        let (d, uid) = (d.clone(), merged["metadata"]["uid"].clone());
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            d.settle_new_pv(&name, &uid);
        });
    }
    let ty = if existing.is_some() {
        "MODIFIED"
    } else {
        "ADDED"
    };
    let _ = d.events.send((kind, ty, merged.clone()));
    axum::Json(merged).into_response()
}

fn create_from(kind: Kind, applied: &Value, rv: u64) -> Value {
    let mut o = applied.clone();
    o["metadata"]["uid"] = json!(format!("uid-{rv}"));
    o["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    if kind == Kind::Pv {
        // The real server answers Pending; the PV controller settles it just after.
        o["status"] = json!({"phase": "Pending"});
    }
    o
}

/// Server-side apply with one manager: its fields replace, others (claimRef, status) stay.
fn merge(kind: Kind, old: &Value, applied: &Value) -> Value {
    let mut o = old.clone();
    for key in ["labels", "annotations"] {
        if let Some(m) = applied["metadata"][key].as_object() {
            for (k, v) in m {
                o["metadata"][key][k] = v.clone();
            }
        }
    }
    match kind {
        Kind::Pv => {
            let claim = old["spec"]["claimRef"].clone();
            o["spec"] = applied["spec"].clone();
            if !claim.is_null() {
                o["spec"]["claimRef"] = claim;
            }
        }
        _ => {
            for (k, v) in applied.as_object().unwrap() {
                if k != "metadata" {
                    o[k] = v.clone();
                }
            }
        }
    }
    o
}

fn validate(kind: Kind, o: &Value) -> Result<(), String> {
    match kind {
        Kind::Pv => {
            let spec = &o["spec"];
            let path = spec["local"]["path"]
                .as_str()
                .ok_or("spec.local.path: Required value")?;
            if !path.starts_with('/') {
                return Err(format!(
                    "spec.local.path: Invalid value: {path:?}: must be an absolute path"
                ));
            }
            let terms = spec["nodeAffinity"]["required"]["nodeSelectorTerms"].as_array();
            if terms.is_none_or(|t| t.is_empty()) {
                return Err(
                    "spec.nodeAffinity: Required value: Local volume requires node affinity".into(),
                );
            }
            if spec["capacity"]["storage"].as_str().is_none() {
                return Err("spec.capacity: Required value".into());
            }
            if spec["accessModes"].as_array().is_none_or(|a| a.is_empty()) {
                return Err("spec.accessModes: Required value".into());
            }
            if !matches!(spec["volumeMode"].as_str(), Some("Filesystem" | "Block")) {
                return Err("spec.volumeMode: Unsupported value".into());
            }
            Ok(())
        }
        Kind::Sc => {
            if o["provisioner"].as_str().is_none_or(str::is_empty) {
                return Err("provisioner: Required value".into());
            }
            Ok(())
        }
        Kind::Event => Ok(()),
    }
}

fn immutable(kind: Kind, old: Option<&Value>, new: &Value) -> Result<(), String> {
    let Some(old) = old else { return Ok(()) };
    let fields: &[&[&str]] = match kind {
        Kind::Pv => &[
            &["spec", "local"],
            &["spec", "nodeAffinity"],
            &["spec", "volumeMode"],
        ],
        Kind::Sc => &[
            &["provisioner"],
            &["parameters"],
            &["reclaimPolicy"],
            &["volumeBindingMode"],
        ],
        Kind::Event => &[],
    };
    for path in fields {
        let get = |v: &Value| path.iter().fold(v.clone(), |acc, k| acc[*k].clone());
        if get(old) != get(new) {
            return Err(format!(
                "{}: Invalid value: field is immutable",
                path.join(".")
            ));
        }
    }
    Ok(())
}

fn delete(d: Shared, kind: Kind, name: String, body: Bytes) -> Response {
    if let Some(r) = d.take_fault() {
        return r;
    }
    let opts: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&body).unwrap_or(json!({}))
    };
    let race = d.store.lock().unwrap().race_bind.take_if(|n| *n == name);
    if race.is_some() {
        d.bind(&name);
    }
    let mut s = d.store.lock().unwrap();
    let Some(old) = s.objects.get(&(kind, name.clone())).cloned() else {
        return status(
            404,
            "NotFound",
            &format!("{} \"{name}\" not found", kind.kind()),
        );
    };
    let pre = &opts["preconditions"];
    for (field, meta) in [("uid", "uid"), ("resourceVersion", "resourceVersion")] {
        if let Some(want) = pre[field].as_str() {
            if old["metadata"][meta].as_str() != Some(want) {
                return status(
                    409,
                    "Conflict",
                    &format!(
                        "Precondition failed: {field} in precondition: {want}, in object meta: {}",
                        old["metadata"][meta]
                    ),
                );
            }
        }
    }
    if kind == Kind::Pv {
        let phase = old["status"]["phase"].as_str().map(String::from);
        s.deletions.push((name.clone(), phase, "kvstrap"));
        if let Some(delay) = s.pv_protection {
            s.rv += 1;
            let rv = s.rv.to_string();
            let pv = s.objects.get_mut(&(kind, name.clone())).unwrap();
            pv["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            pv["metadata"]["resourceVersion"] = json!(rv);
            let terminating = pv.clone();
            let _ = d.events.send((kind, "MODIFIED", terminating.clone()));
            let uid = old["metadata"]["uid"].clone();
            let d2 = d.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let mut s = d2.store.lock().unwrap();
                let key = (Kind::Pv, name);
                if s.objects
                    .get(&key)
                    .is_some_and(|o| o["metadata"]["uid"] == uid)
                {
                    let gone = s.objects.remove(&key).unwrap();
                    let _ = d2.events.send((Kind::Pv, "DELETED", gone));
                }
            });
            return axum::Json(terminating).into_response();
        }
    }
    s.objects.remove(&(kind, name.clone()));
    let _ = d.events.send((kind, "DELETED", old.clone()));
    axum::Json(old).into_response()
}

fn is_dns1123_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// A kubeconfig that points at the double (no credentials: plain HTTP on loopback).
pub fn kubeconfig(dir: &std::path::Path, port: u16) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: http://127.0.0.1:{port}\n\
         users:\n- name: kvstrap\n  user: {{}}\ncontexts:\n- name: double\n  context:\n    cluster: double\n    user: kvstrap\n\
         current-context: double\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}
