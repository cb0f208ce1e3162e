//! `h2load` (nghttp2's load generator, Debian's nghttp2-client) run back to
//! back against one address while a test reloads the server behind it.
//!
//! Why back to back, each run with as many requests as it has streams in
//! flight (`-n c*m -c c -m m`): an `h2load` client never opens a new
//! connection after a GOAWAY. Whatever it had left to send when one arrived
//! is counted as failed, however well the server drained; a long run
//! through a reload measures only that (see [`crate::h2`]). A client whose
//! requests are all in flight at once has nothing left to send when a
//! GOAWAY comes, so each of its streams is counted by what the server did
//! with it: answered, refused or reset. Runs follow each other without a
//! pause, so every reload lands on some runs' open connections, and the
//! next runs connect through the handoff of the listening socket.
//!
//! Each run's own totals line is parsed and kept with when the run began
//! and ended; a run that printed no totals (it crashed, could not connect,
//! or did not speak h2c) is kept as a failure with its output. The
//! latencies come from `h2load --log-file` (per request, from the stream's
//! start to the end of its response: without the connection's set-up).

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::load::LoadReport;

/// The counts of `h2load`'s `requests:` line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct H2loadCounts {
    pub total: u64,
    pub started: u64,
    pub done: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub timeout: u64,
}

impl H2loadCounts {
    /// Parses `requests: 200 total, 200 started, 200 done, 200 succeeded,
    /// 0 failed, 0 errored, 0 timeout` out of `h2load`'s output.
    pub fn parse(output: &str) -> Option<H2loadCounts> {
        let line = output.lines().find_map(|l| l.strip_prefix("requests: "))?;
        let mut counts = H2loadCounts::default();
        for part in line.split(", ") {
            let (number, name) = part.trim().split_once(' ')?;
            let number: u64 = number.parse().ok()?;
            let field = match name {
                "total" => &mut counts.total,
                "started" => &mut counts.started,
                "done" => &mut counts.done,
                "succeeded" => &mut counts.succeeded,
                "failed" => &mut counts.failed,
                "errored" => &mut counts.errored,
                "timeout" => &mut counts.timeout,
                _ => return None,
            };
            *field = number;
        }
        Some(counts)
    }

    fn add(&mut self, other: &H2loadCounts) {
        self.total += other.total;
        self.started += other.started;
        self.done += other.done;
        self.succeeded += other.succeeded;
        self.failed += other.failed;
        self.errored += other.errored;
        self.timeout += other.timeout;
    }

    /// Every request asked for was started and answered with a 2xx or 3xx.
    pub fn all_succeeded(&self) -> bool {
        self.total > 0
            && self.started == self.total
            && self.succeeded == self.total
            && self.failed == 0
            && self.errored == 0
            && self.timeout == 0
    }
}

/// One `h2load` run: when, and what it counted (or what it printed, when
/// it printed no totals or did not speak h2c).
#[derive(Debug, Clone)]
pub struct H2loadRunRecord {
    pub began: Instant,
    pub ended: Instant,
    pub outcome: Result<H2loadCounts, String>,
    /// Of each request answered with a status (from `--log-file`).
    pub latencies: Vec<Duration>,
}

/// The latencies of `h2load --log-file` rows (start in microseconds since
/// the epoch, status, microseconds to the end of the response), leaving
/// out failed streams (status -1).
fn logged_latencies(log: &str) -> Vec<Duration> {
    log.lines()
        .filter_map(|line| {
            let mut columns = line.split('\t');
            let _start = columns.next()?;
            let status: i32 = columns.next()?.trim().parse().ok()?;
            let micros: u64 = columns.next()?.trim().parse().ok()?;
            (status > 0).then(|| Duration::from_micros(micros))
        })
        .collect()
}

/// `h2load` run back to back on a thread until [`H2loadLoop::stop`].
pub struct H2loadLoop {
    stop: Arc<AtomicBool>,
    finished: Arc<AtomicUsize>,
    /// Taken by [`H2loadLoop::stop`]; a loop dropped without it (a test
    /// that failed half-way) is told to stop and not waited for.
    thread: Option<JoinHandle<Vec<H2loadRunRecord>>>,
}

impl Drop for H2loadLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Where Debian's nghttp2-client puts `h2load`; a missing one fails the
/// test with what installs it.
pub fn h2load_path() -> &'static str {
    ["/usr/bin/h2load", "/bin/h2load"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect(
            "h2load is missing: .ci/run installs the Debian package nghttp2-client for this test",
        )
}

impl H2loadLoop {
    /// Starts runs of `connections` clients with `streams` requests each,
    /// all in flight at once, over h2c prior knowledge. A connection idle
    /// for 10 s is counted as timed out by `h2load` itself, so a server that
    /// stops answering ends the run instead of hanging the test.
    pub fn start(addr: SocketAddr, connections: u32, streams: u32) -> H2loadLoop {
        let h2load = h2load_path();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let finished = Arc::new(AtomicUsize::new(0));
        let counting = finished.clone();
        let thread = std::thread::spawn(move || {
            let scratch = tempfile::tempdir().expect("a folder for h2load's request log");
            let log_file = scratch.path().join("requests.tsv");
            let mut runs = Vec::new();
            while !stopping.load(Ordering::Relaxed) {
                let _ = std::fs::remove_file(&log_file);
                let began = Instant::now();
                let output = Command::new(h2load)
                    .args(["-c", &connections.to_string()])
                    .args(["-m", &streams.to_string()])
                    .args(["-n", &(connections * streams).to_string()])
                    .args(["-N", "10s"])
                    .arg(format!("--log-file={}", log_file.display()))
                    .arg(format!("http://{addr}/"))
                    .stdin(Stdio::null())
                    .output();
                let ended = Instant::now();
                let outcome = match output {
                    Err(e) => Err(format!("could not run {h2load}: {e}")),
                    Ok(output) => {
                        let said = format!(
                            "{}{}",
                            String::from_utf8_lossy(&output.stdout),
                            String::from_utf8_lossy(&output.stderr)
                        );
                        match H2loadCounts::parse(&said) {
                            Some(counts)
                                if output.status.success()
                                    && said.contains("Application protocol: h2c") =>
                            {
                                Ok(counts)
                            }
                            _ => Err(format!("{h2load} exited with {}:\n{said}", output.status)),
                        }
                    }
                };
                let latencies =
                    logged_latencies(&std::fs::read_to_string(&log_file).unwrap_or_default());
                runs.push(H2loadRunRecord {
                    began,
                    ended,
                    outcome,
                    latencies,
                });
                counting.fetch_add(1, Ordering::Relaxed);
            }
            runs
        });
        H2loadLoop {
            stop,
            finished,
            thread: Some(thread),
        }
    }

    /// Waits until `n` more runs have finished (30 s at most, then the test
    /// fails: a run is only a few hundred requests).
    pub async fn wait_for_runs(&self, n: usize) {
        let start = self.finished.load(Ordering::Relaxed);
        crate::wait_for(
            format!("{n} more h2load runs to finish"),
            Duration::from_secs(30),
            || self.finished.load(Ordering::Relaxed) >= start + n,
        )
        .await;
    }

    /// Lets the run in progress finish and returns every run.
    pub fn stop(mut self) -> H2loadReport {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("stop takes the loop once");
        H2loadReport {
            runs: thread.join().expect("the h2load thread panicked"),
        }
    }
}

/// Every run of an [`H2loadLoop`].
#[derive(Debug)]
pub struct H2loadReport {
    pub runs: Vec<H2loadRunRecord>,
}

impl H2loadReport {
    /// The counts of every run that printed them, added up.
    pub fn totals(&self) -> H2loadCounts {
        let mut sum = H2loadCounts::default();
        for run in &self.runs {
            if let Ok(counts) = &run.outcome {
                sum.add(counts);
            }
        }
        sum
    }

    /// The runs as a [`LoadReport`], for tables beside the other clients:
    /// `requests` are the requests that succeeded, `failures` every other
    /// request asked for (failed, errored, timed out or never started; a
    /// run without totals counts the `c*m` it asked for), latencies those
    /// `h2load` logged.
    pub fn load_report(&self, requests_per_run: u64) -> LoadReport {
        let mut report = LoadReport::default();
        for run in &self.runs {
            match &run.outcome {
                Ok(counts) => {
                    report.requests += counts.succeeded;
                    report.failures += counts.total - counts.succeeded.min(counts.total);
                }
                Err(said) => {
                    report.failures += requests_per_run;
                    if report.failure_samples.len() < 20 {
                        report.failure_samples.push(said.clone());
                    }
                }
            }
            for latency in &run.latencies {
                report.latencies.record(*latency);
            }
        }
        if let (Some(first), Some(last)) = (self.runs.first(), self.runs.last()) {
            report.elapsed = last.ended - first.began;
        }
        report
    }

    /// How many runs were under way at some moment between `from` and `to`.
    pub fn runs_during(&self, from: Instant, to: Instant) -> usize {
        self.runs
            .iter()
            .filter(|r| r.began <= to && from <= r.ended)
            .count()
    }

    /// One line: the runs, the added-up counts and how long the runs took.
    pub fn summary(&self) -> String {
        let t = self.totals();
        let longest = self
            .runs
            .iter()
            .map(|r| r.ended - r.began)
            .max()
            .unwrap_or(Duration::ZERO);
        format!(
            "{} h2load runs (longest {longest:.2?}): requests: {} total, {} started, {} done, \
             {} succeeded, {} failed, {} errored, {} timeout",
            self.runs.len(),
            t.total,
            t.started,
            t.done,
            t.succeeded,
            t.failed,
            t.errored,
            t.timeout
        )
    }

    /// Fails the test, naming the first bad runs, unless every run printed
    /// its totals and every request of every run succeeded.
    pub fn assert_all_succeeded(&self) {
        let bad: Vec<String> = self
            .runs
            .iter()
            .filter_map(|r| match &r.outcome {
                Ok(counts) if counts.all_succeeded() => None,
                Ok(counts) => Some(format!("{counts:?}")),
                Err(said) => Some(said.clone()),
            })
            .collect();
        assert!(
            bad.is_empty() && !self.runs.is_empty(),
            "{}\n{} runs did not have every request succeed; the first ones:\n{}",
            self.summary(),
            bad.len(),
            bad.iter().take(3).cloned().collect::<Vec<_>>().join("\n")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_totals_line_of_h2load_is_read_field_by_field() {
        let output = "finished in 7.30ms, 27397.26 req/s, 1.10MB/s\n\
            requests: 2000 total, 1868 started, 1868 done, 1868 succeeded, 132 failed, 132 errored, 0 timeout\n\
            status codes: 1868 2xx, 0 3xx, 0 4xx, 0 5xx\n";
        let counts = H2loadCounts::parse(output).unwrap();
        assert_eq!(
            counts,
            H2loadCounts {
                total: 2000,
                started: 1868,
                done: 1868,
                succeeded: 1868,
                failed: 132,
                errored: 132,
                timeout: 0,
            }
        );
        assert!(!counts.all_succeeded());
        let good = "requests: 200 total, 200 started, 200 done, 200 succeeded, 0 failed, 0 errored, 0 timeout";
        assert!(H2loadCounts::parse(good).unwrap().all_succeeded());
        assert_eq!(H2loadCounts::parse("no totals here"), None);
        assert_eq!(
            H2loadCounts::parse("requests: 200 total, 200 vanished"),
            None
        );
    }

    #[test]
    fn the_request_log_gives_the_latencies_of_answered_streams_only() {
        let log = "1733616000000000\t200\t1500\n1733616000000100\t-1\t9000\n1733616000000200\t200\t250\tmore\n";
        assert_eq!(
            logged_latencies(log),
            vec![Duration::from_micros(1500), Duration::from_micros(250)]
        );
    }
}
