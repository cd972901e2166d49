//! Events on the Node: named after what they are about, so each is posted once.

use super::builders::{event, short_hash, EventText};
use super::client::{describe, EVENT_NAMESPACE};
use ::kube::api::{Api, PostParams};
use ::kube::Client;
use k8s_openapi::api::core::v1::{Event, ObjectReference};

/// Condition and Event messages stay short enough for `kubectl describe node`.
pub const MESSAGE_MAX: usize = 1024;

/// One Event to post: `key` makes its name, so the same thing is posted once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEvent {
    pub reason: &'static str,
    pub warning: bool,
    pub message: String,
    pub key: String,
}

/// At most [`MESSAGE_MAX`] bytes (the API server refuses longer Event notes).
pub fn shorten(mut message: String) -> String {
    if message.len() > MESSAGE_MAX {
        let mut cut = MESSAGE_MAX - 3;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str("...");
    }
    message
}

/// A core/v1 Event about Node `node` (in `default`, where kubelet reports about Nodes).
pub fn node_event(node: &str, e: &NodeEvent) -> Event {
    let id = short_hash(&format!("{node}\0{}\0{}", e.reason, e.key));
    let involved = ObjectReference {
        api_version: Some("v1".to_string()),
        kind: Some("Node".to_string()),
        name: Some(node.to_string()),
        // kubectl describe node finds a Node's Events by uid = name.
        uid: Some(node.to_string()),
        ..ObjectReference::default()
    };
    let message = shorten(e.message.clone());
    let text = EventText {
        involved,
        reason: e.reason,
        action: e.reason,
        warning: e.warning,
        message: &message,
    };
    event(
        format!("{node}.{}.{id}", e.reason.to_ascii_lowercase()),
        node,
        text,
    )
}

/// Posts `e` unless posted before (by this process, or by another: the name is the same,
/// and the server answers 409).
pub async fn post_event(client: &Client, node: &str, e: &NodeEvent) -> Result<(), String> {
    let api: Api<Event> = Api::namespaced(client.clone(), EVENT_NAMESPACE);
    match api
        .create(&PostParams::default(), &node_event(node, e))
        .await
    {
        Ok(_) => Ok(()),
        Err(::kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(err) => Err(format!(
            "cannot post Event {} on Node {node}: {}",
            e.reason,
            describe(&err)
        )),
    }
}
