//! The knobs of a rollout, declared once.
//!
//! [`RolloutSettings`] is the `[rollout]` section of `reloadctl.toml` (every
//! field defaulted, unknown keys refused) and the `settings` of the journal's
//! plan record (so `resume` runs with exactly what `push` planned). The push
//! flags are [`RolloutOverrides`]: the same names, each optional, applied on
//! top of the project file by [`RolloutSettings::with`]. Adding a knob means
//! a field here and a field there, nothing else.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Every knob of a rollout. The serialized form is part of the journal
/// format: existing journals must keep deserializing.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutSettings {
    pub canary: usize,
    pub waves: String,
    pub max_parallel: usize,
    pub healthy_checks: u32,
    #[serde(with = "humantime_serde")]
    pub min_healthy_time: Duration,
    #[serde(with = "humantime_serde")]
    pub healthy_deadline: Duration,
    #[serde(with = "humantime_serde")]
    pub progress_deadline: Duration,
    pub max_failures: String,
    pub auto_revert: bool,
    #[serde(with = "humantime_serde")]
    pub pause_between_waves: Duration,
    /// Peer fetch: the release goes to one host, and every other host
    /// fetches it from hosts that hold it (FetchArtifact `peers`), each
    /// serving at most this many at once (a tree of this degree). 0: the
    /// CLI uploads to every host. Left out of the journal when 0, so
    /// journals from before it keep their form.
    #[serde(skip_serializing_if = "is_zero")]
    pub peer_fetch: usize,
    /// Stage every host before the first wave starts, so a host that
    /// cannot take the release (disk full, wrong key) stops the push with
    /// no host changed, at the price of the whole fleet's transfer time
    /// before the canary. Off: later waves stage while earlier ones run,
    /// and a host that fails to stage once a host changed counts against
    /// the failure budget. Left out of the journal when off.
    #[serde(skip_serializing_if = "is_false")]
    pub stage_first: bool,
}

fn is_zero(value: &usize) -> bool {
    *value == 0
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl Default for RolloutSettings {
    fn default() -> Self {
        RolloutSettings {
            canary: 1,
            waves: "1,10%,50%,100%".into(),
            max_parallel: 4,
            healthy_checks: 3,
            min_healthy_time: Duration::from_secs(10),
            healthy_deadline: Duration::from_secs(120),
            progress_deadline: Duration::from_secs(30 * 60),
            max_failures: "0".into(),
            auto_revert: true,
            pause_between_waves: Duration::ZERO,
            peer_fetch: 0,
            stage_first: false,
        }
    }
}

/// The `push` flags that override the project file; an unset flag keeps
/// the file's value (or its default).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct RolloutOverrides {
    /// Hosts in the first wave, alone.
    #[arg(long)]
    pub canary: Option<usize>,
    /// Cumulative wave sizes after the canary: counts or percentages.
    #[arg(long)]
    pub waves: Option<String>,
    /// Hosts changed at once within a wave.
    #[arg(long)]
    pub max_parallel: Option<usize>,
    /// Consecutive healthy results a host needs.
    #[arg(long)]
    pub healthy_checks: Option<u32>,
    /// The healthy results must span at least this long (a failure resets it).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub min_healthy_time: Option<Duration>,
    /// A host not healthy this long after its reload has failed.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub healthy_deadline: Option<Duration>,
    /// Bound on the whole rollout; past it the rollout halts.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub progress_deadline: Option<Duration>,
    /// Failed hosts tolerated before halting: a count or a percentage.
    #[arg(long)]
    pub max_failures: Option<String>,
    /// Roll back changed hosts when the rollout halts (default true).
    #[arg(long)]
    pub auto_revert: Option<bool>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub pause_between_waves: Option<Duration>,
    /// Hosts fetch the release from each other, each serving at most N at
    /// once (agents need `[fetch] peers = true`); 0: upload to every host.
    #[arg(long, value_name = "N")]
    pub peer_fetch: Option<usize>,
    /// Stage every host before the first wave (a host that cannot be
    /// staged then stops the push with nothing changed); by default later
    /// waves stage while the canary runs.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub stage_first: Option<bool>,
}

impl RolloutSettings {
    /// These settings with the flags that were given applied on top. At
    /// least one host at a time and one healthy check: zero would wait
    /// forever or pass a host nobody looked at.
    pub fn with(&self, flags: &RolloutOverrides) -> RolloutSettings {
        let o = flags.clone();
        RolloutSettings {
            canary: o.canary.unwrap_or(self.canary),
            waves: o.waves.unwrap_or_else(|| self.waves.clone()),
            max_parallel: o.max_parallel.unwrap_or(self.max_parallel).max(1),
            healthy_checks: o.healthy_checks.unwrap_or(self.healthy_checks).max(1),
            min_healthy_time: o.min_healthy_time.unwrap_or(self.min_healthy_time),
            healthy_deadline: o.healthy_deadline.unwrap_or(self.healthy_deadline),
            progress_deadline: o.progress_deadline.unwrap_or(self.progress_deadline),
            max_failures: o.max_failures.unwrap_or_else(|| self.max_failures.clone()),
            auto_revert: o.auto_revert.unwrap_or(self.auto_revert),
            pause_between_waves: o.pause_between_waves.unwrap_or(self.pause_between_waves),
            peer_fetch: o.peer_fetch.unwrap_or(self.peer_fetch),
            stage_first: o.stage_first.unwrap_or(self.stage_first),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_only_what_they_set_and_zero_is_raised_to_one() {
        let file: RolloutSettings = toml::from_str("canary = 2\nmax_failures = \"10%\"\n").unwrap();
        assert_eq!(file.canary, 2);
        assert_eq!(file.max_parallel, 4, "unset keys keep their default");
        let merged = file.with(&RolloutOverrides {
            canary: Some(0),
            max_parallel: Some(0),
            auto_revert: Some(false),
            ..RolloutOverrides::default()
        });
        assert_eq!(merged.canary, 0);
        assert_eq!(merged.max_parallel, 1);
        assert_eq!(merged.healthy_checks, 3);
        assert_eq!(merged.max_failures, "10%");
        assert!(!merged.auto_revert);
        assert!(toml::from_str::<RolloutSettings>("canaries = 1\n").is_err());
    }

    #[test]
    fn the_journal_form_is_unchanged() {
        // A plan record's settings as journals written before this type
        // existed carry them; they must still resume.
        let old = r#"{"canary":1,"waves":"1,10%,50%,100%","max_parallel":4,"healthy_checks":3,"min_healthy_time":"10s","healthy_deadline":"2m","progress_deadline":"30m","max_failures":"0","auto_revert":true,"pause_between_waves":"0s"}"#;
        let settings: RolloutSettings = serde_json::from_str(old).unwrap();
        assert_eq!(settings, RolloutSettings::default());
        assert_eq!(serde_json::to_string(&settings).unwrap(), old);
    }
}
