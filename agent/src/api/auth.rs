//! Who is calling and what they may do: the caller's identity from its
//! TLS client certificate (or its address, on plaintext loopback), the
//! `[rights]` it holds (read or deploy), a request rate per identity, and
//! the audit line every mutating call leaves.

use std::time::Duration;

use reload_proto::v1 as pb;
use tonic::{Request, Status};

use super::AgentState;
use crate::audit::AuditEntry;

/// What a caller may do (see `[rights]` in the agent config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Right {
    Read,
    Deploy,
    /// ReadArtifact: a peer agent fetching a release's bytes.
    Fetch,
}

impl Right {
    fn name(self) -> &'static str {
        match self {
            Right::Read => "read",
            Right::Deploy => "deploy",
            Right::Fetch => "fetch",
        }
    }
}

/// The names a TLS client certificate carries: its common name and its
/// DNS and URI subject alternative names.
pub(crate) fn certificate_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(n)
                | x509_parser::extensions::GeneralName::URI(n) => names.push(n.to_string()),
                _ => {}
            }
        }
    }
    names
}

/// Who is calling.
struct Caller {
    /// For messages and the audit log: the certificate's first name, or
    /// `insecure:<address>:<port>`.
    shown: String,
    /// Every name the certificate carries, matched against `[rights]`.
    names: Vec<String>,
    /// Whose request-rate bucket the call takes a token from: the client
    /// identity with TLS, the peer's IP address in insecure mode. Never the
    /// connection: a client must not get a fresh bucket by reconnecting.
    rate_key: String,
}

impl AgentState {
    /// Who is calling, for checks, the rate limit and the audit log.
    fn caller<T>(&self, request: &Request<T>) -> Caller {
        if self.config.tls.is_none() {
            let peer = request.remote_addr();
            let ip = peer.map(|a| a.ip().to_string()).unwrap_or_default();
            let shown = peer.map(|a| a.to_string()).unwrap_or_default();
            return Caller {
                shown: format!("insecure:{shown}"),
                names: Vec::new(),
                rate_key: format!("address {ip}"),
            };
        }
        let names = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|leaf| certificate_names(leaf.as_ref())))
            .unwrap_or_default();
        let shown = names
            .first()
            .cloned()
            .unwrap_or_else(|| "unknown-certificate".into());
        Caller {
            rate_key: format!("identity {shown:?}"),
            shown,
            names,
        }
    }

    /// A token bucket per caller (see [`Caller::rate_key`]):
    /// `requests_per_second`, bursts of twice that. A runaway script cannot
    /// starve the agent or other callers.
    fn take_token(&self, rate_key: &str) -> Result<(), Status> {
        let rate = self.config.limits.requests_per_second as f64;
        let now = std::time::Instant::now();
        let mut buckets = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 10_000 {
            buckets.retain(|_, (_, seen)| now.duration_since(*seen) < Duration::from_secs(60));
        }
        let (tokens, seen) = buckets
            .entry(rate_key.to_string())
            .or_insert((2.0 * rate, now));
        *tokens = (*tokens + now.duration_since(*seen).as_secs_f64() * rate).min(2.0 * rate);
        *seen = now;
        if *tokens < 1.0 {
            return Err(Status::resource_exhausted(format!(
                "calls from {rate_key} are over {rate} per second ([limits] requests_per_second, counted across all its connections); slow down and retry"
            )));
        }
        *tokens -= 1.0;
        Ok(())
    }

    /// Checks `right` for the caller; returns who it is either way.
    pub(super) fn authorize<T>(
        &self,
        request: &Request<T>,
        right: Right,
        call: &str,
    ) -> (String, Result<(), Status>) {
        let Caller {
            shown,
            names,
            rate_key,
        } = self.caller(request);
        if let Err(status) = self.take_token(&rate_key) {
            return (shown, Err(status));
        }
        if self.config.tls.is_none() {
            // Plaintext is loopback-only by config: whoever is on this
            // machine may act, as the start-up warning says.
            return (shown, Ok(()));
        }
        let rights = &self.config.rights;
        let allowed: Vec<&String> = match right {
            Right::Deploy => rights.deploy.iter().collect(),
            Right::Read => rights.deploy.iter().chain(&rights.read).collect(),
            Right::Fetch => rights.deploy.iter().chain(&rights.fetch).collect(),
        };
        if names.iter().any(|n| allowed.contains(&n)) {
            return (shown, Ok(()));
        }
        let status = Status::permission_denied(format!(
            "identity {shown:?} (certificate names {names:?}) lacks the {} right needed for {call}; the agent config's [rights] grant it to {allowed:?}",
            right.name()
        ));
        (shown, Err(status))
    }

    pub(super) fn audit(
        &self,
        identity: &str,
        call: &str,
        service: &str,
        version: &str,
        sha256: &str,
        result: Result<(), String>,
    ) {
        self.audit_detailed(identity, call, service, version, sha256, result, "");
    }

    /// [`Self::audit`], with the call's `detail` (e.g. `allow_downgrade`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn audit_detailed(
        &self,
        identity: &str,
        call: &str,
        service: &str,
        version: &str,
        sha256: &str,
        result: Result<(), String>,
        detail: &str,
    ) {
        self.audit.record(AuditEntry {
            identity,
            call,
            service,
            version,
            sha256,
            result: result.err().unwrap_or_else(|| "ok".into()),
            detail,
        });
    }

    /// Read calls: checked, not audited.
    pub(super) fn check_read<T>(&self, request: &Request<T>, call: &str) -> Result<(), Status> {
        self.authorize(request, Right::Read, call).1
    }
}

/// A lease reference as the audit log shows it.
pub(super) fn describe_lease_ref(lease: Option<&pb::LeaseRef>) -> String {
    lease
        .map(|r| match r.token {
            0 => format!("rollout {} generation {}", r.rollout_id, r.generation),
            token => format!(
                "rollout {} generation {} token {token}",
                r.rollout_id, r.generation
            ),
        })
        .unwrap_or_default()
}

/// How a call ended, for the audit log.
pub(super) fn audit_result<T>(result: &Result<T, Status>) -> Result<(), String> {
    match result {
        Ok(_) => Ok(()),
        Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
    }
}

/// A reload that ran is audited with its outcome.
pub(super) fn reload_audit<T>(
    result: &Result<(pb::ReloadResult, T), Status>,
) -> (String, Result<(), String>) {
    match result {
        Ok((reload, _)) if reload.outcome == pb::ReloadOutcome::Succeeded as i32 => {
            (reload.to_version.clone(), Ok(()))
        }
        Ok((reload, _)) => {
            let outcome = pb::ReloadOutcome::try_from(reload.outcome).unwrap_or_default();
            (
                reload.to_version.clone(),
                Err(format!("{}: {}", outcome.as_str_name(), reload.reason)),
            )
        }
        Err(_) => (String::new(), audit_result(result)),
    }
}

/// A refusal of the agent's own (SIGHUP's config reload) as the audit log
/// shows a refused call: its status code, then the message.
pub fn audit_refusal(err: crate::selfupgrade::UpgradeError) -> String {
    let status = Status::from(err);
    format!("{:?}: {}", status.code(), status.message())
}
