//! Prometheus metrics, served as text on the health endpoint's `/metrics`.
//!
//! Counters and histograms are updated where things happen (reloads in the
//! handoff, uploads in the API, refusals in the artifact verifier); the gauges that
//! describe current state (service up, healthy, running version, lease) are
//! set from the services' status at each scrape, so they cannot drift.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use reload_proto::v1 as pb;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceResult {
    pub service: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServicePhase {
    pub service: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Result_ {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Service {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceVersion {
    pub service: String,
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Version {
    pub version: String,
}

/// What this agent process runs, and how its last in-place upgrade went.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentImage {
    pub executable_sha256: String,
    /// The signed agent release it runs; empty for the installed binary.
    pub artifact_version: String,
    /// `none`, `succeeded` or `fell_back`.
    pub last_upgrade: String,
}

/// One of the agent's own ports: `grpc` or `health`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Port {
    pub port: String,
}

/// Why the agent closed a connection on one of its ports (see
/// `crate::connections::CloseReason`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortReason {
    pub port: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseHolder {
    pub rollout: String,
    pub holder: String,
}

fn handoff_histogram() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

pub struct Metrics {
    registry: Registry,
    pub reloads: Family<ServiceResult, Counter>,
    pub handoff_seconds: Family<ServicePhase, Histogram, fn() -> Histogram>,
    pub uploads: Family<Result_, Counter>,
    pub upload_bytes: Family<Result_, Counter>,
    pub verification_failures: Family<Reason, Counter>,
    service_up: Family<Service, Gauge>,
    service_healthy: Family<Service, Gauge>,
    service_info: Family<ServiceVersion, Gauge>,
    lease: Family<LeaseHolder, Gauge>,
    pub agent_image: Family<AgentImage, Gauge>,
    pub connections_open: Family<Port, Gauge>,
    pub connections_closed: Family<PortReason, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(Counter::default())
    }
}

impl Metrics {
    /// The agent's metrics; `store_quarantined` is the artifact store's
    /// own count of damaged entries it set aside (it counts from its
    /// opening, before the metrics exist).
    pub fn new(store_quarantined: Counter) -> Self {
        let mut registry = Registry::with_prefix("reload");
        let metrics = Metrics {
            reloads: Family::default(),
            handoff_seconds: Family::new_with_constructor(handoff_histogram as fn() -> Histogram),
            uploads: Family::default(),
            upload_bytes: Family::default(),
            verification_failures: Family::default(),
            service_up: Family::default(),
            service_healthy: Family::default(),
            service_info: Family::default(),
            lease: Family::default(),
            agent_image: Family::default(),
            connections_open: Family::default(),
            connections_closed: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "reloads",
            "Reloads by service and result",
            metrics.reloads.clone(),
        );
        registry.register(
            "handoff_duration_seconds",
            "Handoff phases: start_to_ready (spawn to READY) and drain (signal to exit of the old process)",
            metrics.handoff_seconds.clone(),
        );
        registry.register(
            "uploads",
            "Artifact uploads by result",
            metrics.uploads.clone(),
        );
        registry.register(
            "upload_bytes",
            "Bytes received by uploads, by result",
            metrics.upload_bytes.clone(),
        );
        registry.register(
            "verification_failures",
            "Refused artifacts by reason",
            metrics.verification_failures.clone(),
        );
        registry.register(
            "service_up",
            "1 while the service has a serving process",
            metrics.service_up.clone(),
        );
        registry.register(
            "service_healthy",
            "1 while the service's health probe passes",
            metrics.service_healthy.clone(),
        );
        registry.register(
            "service_build_info",
            "The version each service runs (value 1)",
            metrics.service_info.clone(),
        );
        registry.register(
            "lease_held",
            "The rollout holding this agent's lease (value 1)",
            metrics.lease.clone(),
        );
        registry.register(
            "agent_image_info",
            "The executable this agent process runs, its release, and how its last in-place upgrade ended (value 1); alert on last_upgrade=\"fell_back\"",
            metrics.agent_image.clone(),
        );
        registry.register(
            "connections_open",
            "Connections open now on the agent's own ports (grpc, health), handshakes in progress included",
            metrics.connections_open.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections the agent closed on its own ports, by reason: per_peer_limit and total_limit (refused at accept), evicted (an unfinished handshake closed to make room), handshake_timeout, handshake_failed, idle",
            metrics.connections_closed.clone(),
        );
        registry.register(
            "store_quarantined",
            "Damaged store entries (an envelope that does not parse, a file without its envelope's hash) moved to the store's quarantine folder since the agent started; each is logged with its hash",
            store_quarantined,
        );
        let agent: Family<Version, Gauge> = Family::default();
        agent
            .get_or_create(&Version {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        registry.register("agent_build_info", "The agent's version (value 1)", agent);
        Metrics {
            registry,
            ..metrics
        }
    }
}

impl Metrics {
    /// The text exposition, with the state gauges set from `services` and
    /// `lease` first.
    pub fn render(&self, services: &[pb::ServiceStatus], lease: Option<&pb::Lease>) -> String {
        self.service_info.clear();
        self.lease.clear();
        for status in services {
            let service = Service {
                service: status.name.clone(),
            };
            self.service_up
                .get_or_create(&service)
                .set(i64::from(status.pid != 0));
            let healthy = status.health == pb::HealthState::Healthy as i32;
            self.service_healthy
                .get_or_create(&service)
                .set(i64::from(healthy));
            if !status.current_version.is_empty() {
                self.service_info
                    .get_or_create(&ServiceVersion {
                        service: status.name.clone(),
                        version: status.current_version.clone(),
                    })
                    .set(1);
            }
        }
        if let Some(lease) = lease {
            let rollout = lease
                .r#ref
                .as_ref()
                .map(|r| r.rollout_id.clone())
                .unwrap_or_default();
            self.lease
                .get_or_create(&LeaseHolder {
                    rollout,
                    holder: lease.holder.clone(),
                })
                .set(1);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// A reload outcome as a label value.
pub fn outcome_label(outcome: i32) -> String {
    pb::ReloadOutcome::try_from(outcome)
        .unwrap_or_default()
        .as_str_name()
        .trim_start_matches("RELOAD_OUTCOME_")
        .to_lowercase()
}

pub type SharedMetrics = Arc<Metrics>;
