//! The plan of a rollout ([`RolloutPlan`]: what goes where, fixed before
//! any host is contacted) and the arithmetic behind it: waves and the
//! failure budget over the host list.

use std::path::PathBuf;

use anyhow::{bail, Context};

use super::settings::RolloutSettings;

/// Everything fixed at plan time; a resume rebuilds it from the journal's
/// plan record.
#[derive(Clone, Debug)]
pub struct RolloutPlan {
    /// The service, or [`super::project::AGENT_SERVICE`] for `push --agent`.
    pub service: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
    pub artifact: PathBuf,
    /// `host:port`, in hosts-file order; the engine names hosts by index.
    pub hosts: Vec<String>,
    /// Host indexes per wave, the canary first.
    pub waves: Vec<Vec<usize>>,
    pub settings: RolloutSettings,
    /// Failed hosts tolerated; one more halts the rollout.
    pub budget: usize,
    /// `push --allow-downgrade`: asked explicitly, journaled, and sent
    /// with every activation (the agents audit it).
    pub allow_downgrade: bool,
    /// Where the agents fetch the release (`artifact_url` with the
    /// version); `None`: the CLI uploads it.
    pub fetch_url: Option<String>,
}

/// How many hosts a wave spec reaches in total (cumulative).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Amount {
    Count(usize),
    Percent(u32),
}

impl Amount {
    pub fn parse(text: &str) -> anyhow::Result<Amount> {
        let text = text.trim();
        if let Some(pct) = text.strip_suffix('%') {
            let pct: u32 = pct
                .trim()
                .parse()
                .with_context(|| format!("{text:?} is not a percentage like 10%"))?;
            if pct == 0 || pct > 100 {
                bail!("{text:?}: a percentage must be 1% to 100%");
            }
            Ok(Amount::Percent(pct))
        } else {
            let count: usize = text
                .parse()
                .with_context(|| format!("{text:?} is not a count or a percentage like 10%"))?;
            Ok(Amount::Count(count))
        }
    }

    /// Of `total` hosts; percentages round up so that 10% of 8 is 1.
    pub fn of(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => n.min(total),
            Amount::Percent(p) => (total * p as usize).div_ceil(100),
        }
    }
}

pub fn parse_waves(text: &str) -> anyhow::Result<Vec<Amount>> {
    let waves = text
        .split(',')
        .filter(|w| !w.trim().is_empty())
        .map(Amount::parse)
        .collect::<anyhow::Result<Vec<_>>>()
        .with_context(|| format!("--waves {text:?}"))?;
    if waves.is_empty() {
        bail!("--waves is empty; write e.g. 1,10%,50%,100%");
    }
    Ok(waves)
}

/// Splits host indexes into waves: the canary hosts first, then each wave
/// up to its cumulative amount, and a last wave for any remainder. Empty
/// waves are dropped.
pub fn plan_waves(total: usize, canary: usize, waves: &[Amount]) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut done = 0;
    let mut push_until = |target: usize, out: &mut Vec<Vec<usize>>| {
        let target = target.min(total);
        if target > done {
            out.push((done..target).collect());
            done = target;
        }
    };
    push_until(canary, &mut out);
    for wave in waves {
        push_until(wave.of(total), &mut out);
    }
    push_until(total, &mut out);
    out
}

/// `--max-failures`: how many hosts may fail before the rollout halts.
pub fn failure_budget(text: &str, total: usize) -> anyhow::Result<usize> {
    match Amount::parse(text).with_context(|| format!("--max-failures {text:?}"))? {
        Amount::Count(n) => Ok(n),
        // Here 10% of 8 is 0: the budget rounds down, in the safe direction.
        Amount::Percent(p) => Ok(total * p as usize / 100),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_then_cumulative_waves() {
        let waves = parse_waves("1,10%,50%,100%").unwrap();
        assert_eq!(
            plan_waves(8, 1, &waves),
            vec![vec![0], vec![1, 2, 3], vec![4, 5, 6, 7]]
        );
        assert_eq!(
            plan_waves(3, 0, &parse_waves("1").unwrap()),
            vec![vec![0], vec![1, 2]]
        );
        assert_eq!(plan_waves(2, 5, &waves), vec![vec![0, 1]]);
    }

    #[test]
    fn budgets_and_bad_specs() {
        assert_eq!(failure_budget("1", 8).unwrap(), 1);
        assert_eq!(failure_budget("25%", 8).unwrap(), 2);
        assert_eq!(failure_budget("10%", 8).unwrap(), 0);
        assert!(parse_waves("1,x").is_err());
        assert!(parse_waves("0%").is_err());
        assert!(failure_budget("-1", 3).is_err());
    }
}
