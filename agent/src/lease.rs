//! Rollout leases: fencing between rollouts.
//!
//! A rollout takes the lease on every agent before it changes anything, and
//! sends its `LeaseRef` (rollout id + generation) with every Activate and
//! Rollback. While an unexpired lease is held, the agent refuses a second
//! rollout (naming the holder) and any call with another rollout id or an
//! older generation: a rollout paused or partitioned and then taken over
//! can no longer act. A resumed rollout re-acquires with a higher
//! generation, which is allowed even while its own lease is unexpired.
//!
//! The lease and the highest generation seen per rollout are persisted
//! (fsync + rename), so an agent restart does not forget who holds it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use reload_proto::prost_types;
use reload_proto::v1 as pb;
use serde::{Deserialize, Serialize};

/// A lease lasts at most this long without renewal.
const MAX_TTL: Duration = Duration::from_secs(600);
const DEFAULT_TTL: Duration = Duration::from_secs(60);
/// Rollout ids remembered for fencing; the oldest are forgotten first.
const REMEMBERED_ROLLOUTS: usize = 256;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct HeldLease {
    rollout_id: String,
    generation: u64,
    holder: String,
    acquired: SystemTime,
    expires: SystemTime,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct LeaseFile {
    lease: Option<HeldLease>,
    /// Highest generation seen per rollout id, with when it was seen.
    generations: BTreeMap<String, (u64, SystemTime)>,
}

/// Why a lease call or a fenced mutation was refused.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The request itself is malformed.
    #[error("{0}")]
    BadRequest(&'static str),
    /// Another rollout, a newer generation or no lease at all: the caller
    /// is fenced out and must stop.
    #[error("{0}")]
    Fenced(String),
    #[error("cannot persist the lease: {0}")]
    Persist(std::io::Error),
}

pub struct Leases {
    path: PathBuf,
    state: Mutex<LeaseFile>,
}

fn to_pb(lease: &HeldLease) -> pb::Lease {
    pb::Lease {
        r#ref: Some(pb::LeaseRef {
            rollout_id: lease.rollout_id.clone(),
            generation: lease.generation,
        }),
        holder: lease.holder.clone(),
        acquired: Some(lease.acquired.into()),
        expires: Some(lease.expires.into()),
    }
}

fn describe(lease: &HeldLease) -> String {
    let left = lease
        .expires
        .duration_since(SystemTime::now())
        .map(|d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string())
        .unwrap_or_else(|_| "0s".into());
    format!(
        "rollout {} (generation {}) held by {:?}, expires in {left}",
        lease.rollout_id, lease.generation, lease.holder
    )
}

fn ttl_of(ttl: Option<prost_types::Duration>) -> Duration {
    ttl.and_then(|d| Duration::try_from(d).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(DEFAULT_TTL)
        .min(MAX_TTL)
}

impl Leases {
    pub fn open(state_dir: &Path) -> anyhow::Result<Leases> {
        let path = state_dir.join("lease.json");
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|err| {
                anyhow::anyhow!(
                    "{} is damaged ({err}); remove it to forget the lease",
                    path.display()
                )
            })?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => LeaseFile::default(),
            Err(err) => return Err(err.into()),
        };
        Ok(Leases {
            path,
            state: Mutex::new(state),
        })
    }

    fn save(&self, state: &LeaseFile) -> Result<(), LeaseError> {
        let bytes = serde_json::to_vec_pretty(state).expect("lease state serializes");
        let dir = self.path.parent().expect("lease file has a folder");
        let temp = dir.join(format!(".lease.json.{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&temp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&temp, &self.path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(LeaseError::Persist)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LeaseFile> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The unexpired lease, if any.
    fn current(state: &LeaseFile) -> Option<&HeldLease> {
        state
            .lease
            .as_ref()
            .filter(|l| l.expires > SystemTime::now())
    }

    fn check_generation(state: &LeaseFile, lease: &pb::LeaseRef) -> Result<(), LeaseError> {
        if let Some((highest, _)) = state.generations.get(&lease.rollout_id) {
            if lease.generation < *highest {
                return Err(LeaseError::Fenced(format!(
                    "rollout {} generation {} is stale: generation {highest} has taken over; this rollout must stop",
                    lease.rollout_id, lease.generation
                )));
            }
        }
        Ok(())
    }

    pub fn acquire(
        &self,
        request: pb::AcquireLeaseRequest,
    ) -> Result<pb::AcquireLeaseResponse, LeaseError> {
        let lease = request.r#ref.ok_or(LeaseError::BadRequest(
            "AcquireLease needs `ref` (rollout_id and generation)",
        ))?;
        if lease.rollout_id.is_empty() || lease.rollout_id.len() > 128 {
            return Err(LeaseError::BadRequest(
                "rollout_id must be 1-128 characters",
            ));
        }
        let mut state = self.lock();
        Self::check_generation(&state, &lease)?;
        let mut displaced = None;
        if let Some(held) = Self::current(&state) {
            let same_rollout = held.rollout_id == lease.rollout_id;
            if !same_rollout && !request.force_takeover {
                return Err(LeaseError::Fenced(format!(
                    "this agent is leased to another rollout: {}; wait for it, or take over with --force-takeover",
                    describe(held)
                )));
            }
            if !same_rollout {
                displaced = Some(to_pb(held));
                tracing::warn!(displaced = %describe(held), by = %lease.rollout_id, holder = %request.holder, "lease taken over");
            }
        }
        let now = SystemTime::now();
        let held = HeldLease {
            rollout_id: lease.rollout_id.clone(),
            generation: lease.generation,
            holder: request.holder,
            acquired: now,
            expires: now + ttl_of(request.ttl),
        };
        state
            .generations
            .insert(lease.rollout_id.clone(), (lease.generation, now));
        while state.generations.len() > REMEMBERED_ROLLOUTS {
            let oldest = state
                .generations
                .iter()
                .min_by_key(|(_, (_, seen))| *seen)
                .map(|(id, _)| id.clone())
                .expect("not empty");
            state.generations.remove(&oldest);
        }
        state.lease = Some(held.clone());
        self.save(&state)?;
        Ok(pb::AcquireLeaseResponse {
            lease: Some(to_pb(&held)),
            displaced,
        })
    }

    /// The lease must be held by exactly this rollout and generation.
    fn held_by<'a>(
        state: &'a mut LeaseFile,
        lease: Option<&pb::LeaseRef>,
    ) -> Result<&'a mut HeldLease, LeaseError> {
        let lease = lease.ok_or(LeaseError::BadRequest(
            "this call needs `ref` (rollout_id and generation)",
        ))?;
        Self::check_generation(state, lease)?;
        match state.lease.as_mut() {
            Some(held)
                if held.rollout_id == lease.rollout_id
                    && held.generation == lease.generation
                    && held.expires > SystemTime::now() =>
            {
                Ok(held)
            }
            Some(held) if held.expires > SystemTime::now() => Err(LeaseError::Fenced(format!(
                "rollout {} generation {} does not hold this agent's lease: {}",
                lease.rollout_id,
                lease.generation,
                describe(held)
            ))),
            _ => Err(LeaseError::Fenced(format!(
                "rollout {} holds no lease on this agent (it expired or was released); acquire it again",
                lease.rollout_id
            ))),
        }
    }

    pub fn renew(
        &self,
        request: pb::RenewLeaseRequest,
    ) -> Result<pb::RenewLeaseResponse, LeaseError> {
        let mut state = self.lock();
        let held = Self::held_by(&mut state, request.r#ref.as_ref())?;
        held.expires = SystemTime::now() + ttl_of(request.ttl);
        let renewed = to_pb(held);
        self.save(&state)?;
        Ok(pb::RenewLeaseResponse {
            lease: Some(renewed),
        })
    }

    pub fn release(&self, request: pb::ReleaseLeaseRequest) -> Result<(), LeaseError> {
        let mut state = self.lock();
        Self::held_by(&mut state, request.r#ref.as_ref())?;
        state.lease = None;
        self.save(&state)
    }

    pub fn get(&self) -> pb::GetLeaseResponse {
        let state = self.lock();
        pb::GetLeaseResponse {
            lease: Self::current(&state).map(to_pb),
        }
    }

    /// Fencing for mutating calls: while a lease is held, only its holder
    /// (same rollout, current generation) may act. Without a lease held,
    /// calls without a ref (an operator's manual activate) are allowed.
    pub fn check_mutation(&self, lease: Option<&pb::LeaseRef>) -> Result<(), LeaseError> {
        let mut state = self.lock();
        if let Some(lease) = lease {
            Self::check_generation(&state, lease)?;
        }
        if Self::current(&state).is_none() {
            return Ok(());
        }
        match lease {
            Some(_) => Self::held_by(&mut state, lease).map(|_| ()),
            None => {
                let held = Self::current(&state).expect("checked above");
                Err(LeaseError::Fenced(format!(
                    "a rollout holds this agent's lease ({}); act through that rollout, or wait until it ends",
                    describe(held)
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acquire(rollout: &str, generation: u64, force: bool) -> pb::AcquireLeaseRequest {
        pb::AcquireLeaseRequest {
            r#ref: Some(pb::LeaseRef {
                rollout_id: rollout.into(),
                generation,
            }),
            holder: format!("{rollout}-holder"),
            ttl: None,
            force_takeover: force,
        }
    }

    fn lref(rollout: &str, generation: u64) -> pb::LeaseRef {
        pb::LeaseRef {
            rollout_id: rollout.into(),
            generation,
        }
    }

    #[test]
    fn one_rollout_at_a_time_and_stale_generations_are_fenced() {
        let dir = tempfile::tempdir().unwrap();
        let leases = Leases::open(dir.path()).unwrap();
        leases.acquire(acquire("a", 1, false)).unwrap();
        let err = leases.acquire(acquire("b", 1, false)).unwrap_err();
        assert!(matches!(err, LeaseError::Fenced(_)), "{err}");
        assert!(err.to_string().contains("a-holder"), "{err}");
        leases.check_mutation(Some(&lref("a", 1))).unwrap();
        assert!(leases.check_mutation(None).is_err());
        assert!(leases.check_mutation(Some(&lref("b", 1))).is_err());
        // The same rollout resumed: a higher generation takes over itself.
        leases.acquire(acquire("a", 2, false)).unwrap();
        let err = leases.check_mutation(Some(&lref("a", 1))).unwrap_err();
        assert!(err.to_string().contains("stale"), "{err}");
        // Forced takeover by another rollout, remembered across a reopen.
        let taken = leases.acquire(acquire("b", 1, true)).unwrap();
        assert_eq!(taken.displaced.unwrap().holder, "a-holder");
        let reopened = Leases::open(dir.path()).unwrap();
        assert!(reopened.check_mutation(Some(&lref("a", 2))).is_err());
        reopened.check_mutation(Some(&lref("b", 1))).unwrap();
        reopened
            .release(pb::ReleaseLeaseRequest {
                r#ref: Some(lref("b", 1)),
            })
            .unwrap();
        reopened.check_mutation(None).unwrap();
        assert!(reopened.get().lease.is_none());
    }
}
