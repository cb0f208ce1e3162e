//! The gRPC surface of the agent: `reload.v1` handlers, translating and
//! authorizing only. The work lives in the rooms that own it: the store and
//! its verifier, [`crate::services`], [`crate::lease`], and
//! [`crate::selfupgrade`] for `UpgradeAgent`. Nothing under `api/` forks or
//! execs.
//!
//! Layout: one file per gRPC service ([`artifacts`], [`control`],
//! [`leases`], [`agent`]), [`auth`] (identity, rights, rate, audit), and
//! [`status`], the one conversion from the agent's error types to
//! `tonic::Status`.

mod agent;
mod artifacts;
mod auth;
mod control;
mod leases;
mod status;

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::Semaphore;
use tonic::Status;

pub use artifacts::artifact_info;
pub(crate) use auth::certificate_names;
pub use auth::{audit_refusal, Right};

use crate::audit::AuditLog;
use crate::config::AgentConfig;
use crate::lease::Leases;
use crate::metrics::SharedMetrics;
use crate::selfupgrade::SelfUpgrade;
use crate::services::Services;
use crate::store::{ArtifactStore, ArtifactVerifier, StoreError};

/// The handlers: a cheap handle on the shared [`AgentState`].
#[derive(Clone)]
pub struct AgentApi(Arc<AgentState>);

impl std::ops::Deref for AgentApi {
    type Target = AgentState;
    fn deref(&self) -> &AgentState {
        &self.0
    }
}

/// What the handlers reach: each room they translate calls for.
pub struct ApiRooms {
    pub config: AgentConfig,
    pub verifier: Arc<ArtifactVerifier>,
    pub services: Arc<Services>,
    pub leases: Arc<Leases>,
    pub audit: Arc<AuditLog>,
    pub selfupgrade: Arc<SelfUpgrade>,
    pub metrics: SharedMetrics,
    /// FetchArtifact's repository client (`[fetch]`).
    pub fetcher: Arc<crate::fetch::Fetcher>,
}

/// Everything the handlers share.
pub struct AgentState {
    config: AgentConfig,
    store: Arc<ArtifactStore>,
    verifier: Arc<ArtifactVerifier>,
    /// One permit per upload allowed to run at once.
    upload_slots: Arc<Semaphore>,
    started: SystemTime,
    services: Arc<Services>,
    leases: Arc<Leases>,
    audit: Arc<AuditLog>,
    selfupgrade: Arc<SelfUpgrade>,
    metrics: SharedMetrics,
    fetcher: Arc<crate::fetch::Fetcher>,
    /// FetchArtifact's peer client (`[fetch] peers`).
    peers: crate::peers::PeerClient,
    /// One permit per ReadArtifact stream served to a peer at once.
    peer_read_slots: Arc<Semaphore>,
    /// The sha256s being fetched now (see `artifacts::FetchingGuard`).
    fetching: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Per client identity (per IP address in insecure mode): tokens left
    /// and when they were counted.
    rate: std::sync::Mutex<std::collections::HashMap<String, (f64, std::time::Instant)>>,
}

impl AgentApi {
    pub fn new(rooms: ApiRooms) -> AgentApi {
        let ApiRooms {
            config,
            verifier,
            services,
            leases,
            audit,
            selfupgrade,
            metrics,
            fetcher,
        } = rooms;
        let upload_slots = Arc::new(Semaphore::new(config.limits.max_concurrent_uploads));
        let peer_read_slots = Arc::new(Semaphore::new(config.limits.max_concurrent_peer_reads));
        let peers = crate::peers::PeerClient::new(config.fetch.peers.clone());
        AgentApi(Arc::new(AgentState {
            config,
            store: verifier.store().clone(),
            verifier,
            upload_slots,
            started: SystemTime::now(),
            services,
            leases,
            audit,
            selfupgrade,
            metrics,
            fetcher,
            peers,
            peer_read_slots,
            fetching: Default::default(),
            rate: Default::default(),
        }))
    }
}

impl AgentState {
    /// Runs blocking store work off the async threads.
    async fn with_store<T: Send + 'static>(
        &self,
        work: impl FnOnce(&ArtifactStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Status> {
        let store = self.store.clone();
        Ok(tokio::task::spawn_blocking(move || work(&store))
            .await
            .map_err(|err| Status::internal(format!("store task failed: {err}")))??)
    }
}
