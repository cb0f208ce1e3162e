//! Rollout leases and fencing tokens: fencing between rollouts.
//!
//! A rollout takes the lease on every agent before it changes anything.
//! Each grant gets the next value of one counter per agent, the *fencing
//! token* (Chubby's sequencers, Kleppmann's fencing tokens), persisted and
//! never reused. Every mutating call carries its `LeaseRef` (rollout id,
//! generation, token), and the agent checks it twice: when the call comes
//! in, and again at the commit point, holding the lease table's lock across
//! the commit ([`Fence::hold`]), so no grant can slip between the check and
//! the change.
//!
//! The rules:
//! - a token below the highest ever granted is *superseded*: refused
//!   whatever the lease state is, so a rollout that was taken over cannot act
//!   again even after its successor released or lost its lease;
//! - a call that carries a ref needs the lease it names held and unexpired;
//! - a call without a ref (an operator's `reloadctl activate`) passes only
//!   while no lease is held;
//! - a generation is granted once per rollout id: two resumes of one
//!   journal cannot both hold generation 2.
//!
//! The lease, the highest token and the generations seen per rollout are
//! persisted (fsync + rename), so an agent restart forgets none of them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use reload_proto::prost_types;
use reload_proto::v1 as pb;
use serde::{Deserialize, Serialize};

/// A lease lasts at most this long without renewal.
const MAX_TTL: Duration = Duration::from_secs(600);
const DEFAULT_TTL: Duration = Duration::from_secs(60);
/// Rollout ids remembered for their generations; the oldest are forgotten
/// first (the token fences them anyway).
const REMEMBERED_ROLLOUTS: usize = 256;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct HeldLease {
    rollout_id: String,
    generation: u64,
    #[serde(default)]
    token: u64,
    holder: String,
    acquired: SystemTime,
    expires: SystemTime,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LeaseFile {
    lease: Option<HeldLease>,
    /// Highest generation seen per rollout id, with when it was seen.
    generations: BTreeMap<String, (u64, SystemTime)>,
    /// The last grant, which holds the highest token (it outlives the
    /// lease: a released or expired lease still fences older tokens).
    #[serde(default)]
    last_grant: Option<HeldLease>,
}

impl LeaseFile {
    fn highest_token(&self) -> u64 {
        self.last_grant.as_ref().map_or(0, |g| g.token)
    }
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
    /// The caller's token is below one this agent granted since: a later
    /// rollout (or a later run of the same one) superseded it, for good.
    #[error("superseded: fencing token {token} of rollout {rollout} is below token {highest}, granted since to {by}; this rollout must stop (see `reloadctl rollouts`)")]
    Superseded {
        token: u64,
        rollout: String,
        highest: u64,
        by: String,
    },
    #[error("cannot persist the lease: {0}")]
    Persist(std::io::Error),
}

/// Whether a save's rename must survive a crash: a grant's must (its
/// token is never to be granted again); a renewal's and a release's need
/// not (see [`Leases::renew`] and [`Leases::release`]).
#[derive(Clone, Copy)]
enum Rename {
    Durable,
    MayBeLost,
}

pub struct Leases {
    path: PathBuf,
    state: Mutex<LeaseFile>,
}

fn ref_of(lease: &HeldLease) -> pb::LeaseRef {
    pb::LeaseRef {
        rollout_id: lease.rollout_id.clone(),
        generation: lease.generation,
        token: lease.token,
    }
}

fn to_pb(lease: &HeldLease) -> pb::Lease {
    pb::Lease {
        r#ref: Some(ref_of(lease)),
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
        "rollout {} (generation {}, token {}) held by {:?}, expires in {left}",
        lease.rollout_id, lease.generation, lease.token, lease.holder
    )
}

fn ttl_of(ttl: Option<prost_types::Duration>) -> Duration {
    ttl.and_then(|d| Duration::try_from(d).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(DEFAULT_TTL)
        .min(MAX_TTL)
}

/// Proof that a call passed its fence, held while the change it guards is
/// committed: no lease can be granted or taken over meanwhile. Hold it
/// only across synchronous work (it is a `std` mutex guard).
pub struct FenceHold<'a> {
    _table: Option<MutexGuard<'a, LeaseFile>>,
    /// The caller's token (0: an unfenced call).
    pub token: u64,
}

/// The fencing check of one call, run when it comes in, under the
/// service's reload lock, and at its commit point (see the module docs).
pub trait Fence: Send + Sync {
    fn hold(&self) -> Result<FenceHold<'_>, LeaseError>;
}

/// The fence of a call from a client: its lease ref, checked against the
/// agent's leases.
pub struct CallerFence {
    leases: Arc<Leases>,
    lease: Option<pb::LeaseRef>,
}

impl CallerFence {
    pub fn new(leases: Arc<Leases>, lease: Option<pb::LeaseRef>) -> CallerFence {
        CallerFence { leases, lease }
    }
}

impl Fence for CallerFence {
    fn hold(&self) -> Result<FenceHold<'_>, LeaseError> {
        let table = self.leases.check_mutation(self.lease.as_ref())?;
        Ok(FenceHold {
            _table: Some(table),
            token: self.lease.as_ref().map_or(0, |l| l.token),
        })
    }
}

/// What the agent does by itself (a crash-loop revert, SIGHUP).
pub struct Unfenced;

impl Fence for Unfenced {
    fn hold(&self) -> Result<FenceHold<'_>, LeaseError> {
        Ok(FenceHold {
            _table: None,
            token: 0,
        })
    }
}

pub const UNFENCED: &Unfenced = &Unfenced;

impl Leases {
    pub fn open(state_dir: &Path) -> anyhow::Result<Leases> {
        let path = state_dir.join("lease.json");
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|err| {
                anyhow::anyhow!(
                    "{} is damaged ({err}); remove it to forget the lease (and the fencing tokens granted: only do so with no rollout running)",
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

    /// Writes the table to a temp file, fsyncs it and renames it over the
    /// lease file; with [`Rename::Durable`] the folder is fsync'd too, so
    /// the rename itself survives a crash.
    fn save(&self, state: &LeaseFile, rename: Rename) -> Result<(), LeaseError> {
        let bytes = serde_json::to_vec_pretty(state).expect("lease state serializes");
        let dir = self.path.parent().expect("lease file has a folder");
        let temp = dir.join(format!(".lease.json.{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&temp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&temp, &self.path)?;
            match rename {
                Rename::Durable => std::fs::File::open(dir)?.sync_all(),
                Rename::MayBeLost => Ok(()),
            }
        };
        write().map_err(LeaseError::Persist)
    }

    fn lock(&self) -> MutexGuard<'_, LeaseFile> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The unexpired lease, if any.
    fn current(state: &LeaseFile) -> Option<&HeldLease> {
        state
            .lease
            .as_ref()
            .filter(|l| l.expires > SystemTime::now())
    }

    /// A ref whose token is below the highest granted is superseded.
    fn check_token(state: &LeaseFile, lease: &pb::LeaseRef) -> Result<(), LeaseError> {
        match &state.last_grant {
            Some(last) if lease.token < last.token => Err(LeaseError::Superseded {
                token: lease.token,
                rollout: lease.rollout_id.clone(),
                highest: last.token,
                by: format!(
                    "rollout {} generation {} ({:?})",
                    last.rollout_id, last.generation, last.holder
                ),
            }),
            _ => Ok(()),
        }
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
        if let Some((highest, _)) = state.generations.get(&lease.rollout_id) {
            if lease.generation <= *highest {
                return Err(LeaseError::Fenced(format!(
                    "rollout {} generation {} was granted already (highest: {highest}); a second run of the same rollout must take the next generation (`reloadctl resume` does)",
                    lease.rollout_id, lease.generation
                )));
            }
        }
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
            token: state.highest_token() + 1,
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
        state.last_grant = Some(held.clone());
        self.save(&state, Rename::Durable)?;
        // Logged under the table's lock, so the log orders grants and
        // commits as they happened.
        tracing::info!(token = held.token, rollout = %held.rollout_id, generation = held.generation, holder = %held.holder, "fencing token granted");
        Ok(pb::AcquireLeaseResponse {
            lease: Some(to_pb(&held)),
            displaced,
        })
    }

    /// The lease must be held by exactly this rollout, generation and
    /// token.
    fn held_by<'a>(
        state: &'a mut LeaseFile,
        lease: Option<&pb::LeaseRef>,
    ) -> Result<&'a mut HeldLease, LeaseError> {
        let lease = lease.ok_or(LeaseError::BadRequest(
            "this call needs `ref` (rollout_id, generation and token)",
        ))?;
        Self::check_token(state, lease)?;
        Self::check_generation(state, lease)?;
        match state.lease.as_mut() {
            Some(held)
                if held.rollout_id == lease.rollout_id
                    && held.generation == lease.generation
                    && held.token == lease.token
                    && held.expires > SystemTime::now() =>
            {
                Ok(held)
            }
            Some(held) if held.expires > SystemTime::now() => Err(LeaseError::Fenced(format!(
                "rollout {} generation {} token {} does not hold this agent's lease: {}",
                lease.rollout_id,
                lease.generation,
                lease.token,
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
        // A crash that loses this rename brings back the expiry of the
        // grant or renewal before: earlier, never later, so the lease can
        // only end sooner than the holder was told (its next call is
        // refused, the safe side of fencing). The tokens are untouched. A
        // push renews every host's lease every ten seconds; at a thousand
        // hosts on one disk the folder fsyncs competed with the waves.
        self.save(&state, Rename::MayBeLost)?;
        Ok(pb::RenewLeaseResponse {
            lease: Some(renewed),
        })
    }

    pub fn release(&self, request: pb::ReleaseLeaseRequest) -> Result<(), LeaseError> {
        let mut state = self.lock();
        Self::held_by(&mut state, request.r#ref.as_ref())?;
        state.lease = None;
        // The only change is the lease gone; the tokens and generations
        // stay as the grant made them durable. A crash that loses this
        // rename brings back the file before it: the same lease, held until
        // its expiry, which fences exactly as a CLI that died before
        // releasing does. The file's own fsync stays, so the rename never
        // exposes a file whose bytes are not on disk. A push releases every
        // host's lease at its end: at a thousand hosts on one disk the
        // folder fsyncs were a visible part of the push's wall time.
        self.save(&state, Rename::MayBeLost)
    }

    pub fn get(&self) -> pb::GetLeaseResponse {
        let state = self.lock();
        pb::GetLeaseResponse {
            lease: Self::current(&state).map(to_pb),
            highest_token: state.highest_token(),
            highest_ref: state.last_grant.as_ref().map(ref_of),
            highest_holder: state
                .last_grant
                .as_ref()
                .map(|g| g.holder.clone())
                .unwrap_or_default(),
        }
    }

    /// Fencing for mutating calls (the rules of the module docs). On
    /// success the lease table stays locked until the returned guard goes,
    /// so the caller can commit under it.
    pub fn check_mutation(
        &self,
        lease: Option<&pb::LeaseRef>,
    ) -> Result<MutexGuard<'_, LeaseFile>, LeaseError> {
        let mut state = self.lock();
        match lease {
            Some(_) => {
                Self::held_by(&mut state, lease)?;
            }
            None => {
                if let Some(held) = Self::current(&state) {
                    return Err(LeaseError::Fenced(format!(
                        "a rollout holds this agent's lease ({}); act through that rollout, or wait until it ends",
                        describe(held)
                    )));
                }
            }
        }
        Ok(state)
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
                token: 0,
            }),
            holder: format!("{rollout}-holder"),
            ttl: None,
            force_takeover: force,
        }
    }

    /// The ref a granted lease hands back (with its token).
    fn granted(leases: &Leases, rollout: &str, generation: u64, force: bool) -> pb::LeaseRef {
        leases
            .acquire(acquire(rollout, generation, force))
            .unwrap()
            .lease
            .unwrap()
            .r#ref
            .unwrap()
    }

    fn release(leases: &Leases, lease: &pb::LeaseRef) -> Result<(), LeaseError> {
        leases.release(pb::ReleaseLeaseRequest {
            r#ref: Some(lease.clone()),
        })
    }

    #[test]
    fn one_rollout_at_a_time_and_stale_generations_are_fenced() {
        let dir = tempfile::tempdir().unwrap();
        let leases = Leases::open(dir.path()).unwrap();
        let a1 = granted(&leases, "a", 1, false);
        let err = leases.acquire(acquire("b", 1, false)).unwrap_err();
        assert!(matches!(err, LeaseError::Fenced(_)), "{err}");
        assert!(err.to_string().contains("a-holder"), "{err}");
        leases.check_mutation(Some(&a1)).map(drop).unwrap();
        assert!(leases.check_mutation(None).is_err());
        let b_forged = pb::LeaseRef {
            rollout_id: "b".into(),
            ..a1.clone()
        };
        assert!(leases.check_mutation(Some(&b_forged)).is_err());
        // The same rollout resumed: a higher generation takes over itself.
        let a2 = granted(&leases, "a", 2, false);
        assert!(a2.token > a1.token);
        let err = leases.check_mutation(Some(&a1)).unwrap_err();
        assert!(err.to_string().starts_with("superseded"), "{err}");
        // Forced takeover by another rollout, remembered across a reopen.
        let taken = leases.acquire(acquire("b", 1, true)).unwrap();
        assert_eq!(taken.displaced.unwrap().holder, "a-holder");
        let b1 = taken.lease.unwrap().r#ref.unwrap();
        let reopened = Leases::open(dir.path()).unwrap();
        assert!(reopened.check_mutation(Some(&a2)).is_err());
        reopened.check_mutation(Some(&b1)).map(drop).unwrap();
        release(&reopened, &b1).unwrap();
        reopened.check_mutation(None).map(drop).unwrap();
        let after = reopened.get();
        assert!(after.lease.is_none());
        assert_eq!(after.highest_token, b1.token);
        assert_eq!(after.highest_holder, "b-holder");
    }

    /// A renewal and a release are on disk without the folder fsync: an
    /// agent started again (a reopen of the file) sees the renewed expiry,
    /// then the lease gone with the tokens kept.
    #[test]
    fn a_renewal_and_a_release_are_what_a_restarted_agent_reads() {
        let dir = tempfile::tempdir().unwrap();
        let leases = Leases::open(dir.path()).unwrap();
        let held = granted(&leases, "a", 1, false);
        let granted_until = Leases::open(dir.path())
            .unwrap()
            .lock()
            .lease
            .clone()
            .unwrap()
            .expires;
        std::thread::sleep(Duration::from_millis(20));
        leases
            .renew(pb::RenewLeaseRequest {
                r#ref: Some(held.clone()),
                ttl: None,
            })
            .unwrap();
        let renewed_until = Leases::open(dir.path())
            .unwrap()
            .lock()
            .lease
            .clone()
            .unwrap()
            .expires;
        assert!(renewed_until > granted_until);
        release(&leases, &held).unwrap();
        let reopened = Leases::open(dir.path()).unwrap();
        assert!(reopened.get().lease.is_none());
        assert_eq!(reopened.get().highest_token, held.token);
        // No temp file is left beside it.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with(".lease.json.")),
            "{names:?}"
        );
    }

    /// Hole (a) of the fencing issue: once the rollout that displaced it
    /// released its lease, a displaced rollout could act again (no lease
    /// held let any ref pass). Its token keeps it out, across a restart.
    #[test]
    fn a_displaced_rollout_stays_superseded_after_its_successor_released_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let leases = Leases::open(dir.path()).unwrap();
        let old = granted(&leases, "old", 1, false);
        let new = granted(&leases, "new", 1, true);
        release(&leases, &new).unwrap();
        for leases in [&leases, &Leases::open(dir.path()).unwrap()] {
            let err = leases.check_mutation(Some(&old)).unwrap_err();
            assert!(
                matches!(err, LeaseError::Superseded { token, highest, .. } if token == old.token && highest == new.token),
                "{err}"
            );
            assert!(err.to_string().contains("rollout new"), "{err}");
            // Not even its lease calls pass.
            assert!(leases
                .renew(pb::RenewLeaseRequest {
                    r#ref: Some(old.clone()),
                    ttl: None
                })
                .is_err());
            assert!(release(leases, &old).is_err());
        }
    }

    /// Also hole (a): an expired lease of the displacing rollout does not
    /// let the displaced one back in, and a lapsed lease fences its own
    /// holder until it acquires again.
    #[test]
    fn an_expired_lease_admits_neither_the_displaced_rollout_nor_its_own_holder() {
        let dir = tempfile::tempdir().unwrap();
        let leases = Leases::open(dir.path()).unwrap();
        let old = granted(&leases, "old", 1, false);
        let new = granted(&leases, "new", 1, true);
        leases.lock().lease.as_mut().unwrap().expires = SystemTime::now() - Duration::from_secs(1);
        assert!(matches!(
            leases.check_mutation(Some(&old)).unwrap_err(),
            LeaseError::Superseded { .. }
        ));
        let err = leases.check_mutation(Some(&new)).unwrap_err();
        assert!(err.to_string().contains("expired or was released"), "{err}");
        // An operator's call without a ref is fine with no lease held.
        leases.check_mutation(None).map(drop).unwrap();
    }

    /// Hole (d): the same generation of one rollout was granted twice (two
    /// resumes of one journal both held generation 2).
    #[test]
    fn a_generation_is_granted_once() {
        let dir = tempfile::tempdir().unwrap();
        let leases = Leases::open(dir.path()).unwrap();
        let first = granted(&leases, "r", 2, false);
        let err = leases.acquire(acquire("r", 2, false)).unwrap_err();
        assert!(err.to_string().contains("granted already"), "{err}");
        // Even with force, and after a restart.
        assert!(leases.acquire(acquire("r", 2, true)).is_err());
        assert!(Leases::open(dir.path())
            .unwrap()
            .acquire(acquire("r", 2, true))
            .is_err());
        leases.check_mutation(Some(&first)).map(drop).unwrap();
    }

    /// The hold keeps grants out until the commit is done: a takeover that
    /// races a commit waits for it, and then supersedes the committer.
    #[test]
    fn a_takeover_waits_for_a_commit_under_the_fence() {
        let dir = tempfile::tempdir().unwrap();
        let leases = Arc::new(Leases::open(dir.path()).unwrap());
        let old = granted(&leases, "old", 1, false);
        let fence = CallerFence::new(leases.clone(), Some(old.clone()));
        let hold = fence.hold().unwrap();
        assert_eq!(hold.token, old.token);
        let (tx, rx) = std::sync::mpsc::channel();
        let taker = {
            let leases = leases.clone();
            std::thread::spawn(move || {
                let taken = leases.acquire(acquire("new", 1, true));
                tx.send(()).unwrap();
                taken.unwrap()
            })
        };
        // The takeover cannot be granted while the commit holds the fence.
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        drop(hold);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        taker.join().unwrap();
        assert!(matches!(
            fence.hold().err().unwrap(),
            LeaseError::Superseded { .. }
        ));
    }
}
