//! The connection to the API server: where the credentials come from, its errors in
//! words, and where kvstrap's Events go. Every other part of `kube` builds on it.

use crate::policy::types::KubernetesSettings;
use ::kube::config::{KubeConfigOptions, Kubeconfig};
use ::kube::{Client, Config};
use std::path::{Path, PathBuf};

/// Namespace of the Events kvstrap reports about (cluster-scoped) PVs, as kubelet does.
pub const EVENT_NAMESPACE: &str = "default";

/// kubelet's own credentials: present on every node that joined a cluster.
pub const DEFAULT_KUBECONFIG: &str = "/etc/kubernetes/kubelet.conf";

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot read kubeconfig {path}: {detail} (set kubernetes.kubeconfig in the policy, or kubernetes.publish = false)")]
    Kubeconfig { path: PathBuf, detail: String },
    #[error("not running in a pod with a service account: {0}")]
    InCluster(String),
    #[error("cannot build a Kubernetes client: {0}")]
    Client(String),
    #[error("publication failed: {0}")]
    Pass(String),
    #[error("the publisher needs a tokio runtime; start it from async code")]
    NoRuntime,
}

/// Where the API server and credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientSource {
    Kubeconfig(PathBuf),
    /// The service account of the pod kvstrap runs in.
    InCluster,
}

impl ClientSource {
    /// The policy's kubeconfig; else in-cluster config inside a pod; else kubelet's.
    pub fn from_policy(k: &KubernetesSettings) -> ClientSource {
        match &k.kubeconfig {
            Some(path) => ClientSource::Kubeconfig(path.clone()),
            None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => {
                ClientSource::InCluster
            }
            None => ClientSource::Kubeconfig(PathBuf::from(DEFAULT_KUBECONFIG)),
        }
    }

    pub async fn client(&self) -> Result<Client, PublishError> {
        let config = match self {
            ClientSource::Kubeconfig(path) => kubeconfig(path).await?,
            ClientSource::InCluster => {
                Config::incluster().map_err(|e| PublishError::InCluster(e.to_string()))?
            }
        };
        Client::try_from(config).map_err(|e| PublishError::Client(describe(&e)))
    }
}

async fn kubeconfig(path: &Path) -> Result<Config, PublishError> {
    let err = |detail: String| PublishError::Kubeconfig {
        path: path.to_path_buf(),
        detail,
    };
    let kc = Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
    Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| err(e.to_string()))
}

/// One line: API errors with their code and message, others as they print.
pub fn describe(e: &::kube::Error) -> String {
    match e {
        ::kube::Error::Api(s) => {
            format!("API server answered {} {}: {}", s.code, s.reason, s.message)
        }
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_kubeconfig_wins() {
        let k = KubernetesSettings {
            publish: true,
            kubeconfig: Some("/etc/k.conf".into()),
            ..KubernetesSettings::local_only()
        };
        assert_eq!(
            ClientSource::from_policy(&k),
            ClientSource::Kubeconfig("/etc/k.conf".into())
        );
    }
}
