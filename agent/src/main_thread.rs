//! Work that must run on the process's main thread: forking services and
//! the agent's own execve.
//!
//! Services are started with PR_SET_PDEATHSIG so they drain when the agent
//! dies. The kernel ties that signal to the *thread* that forked the child,
//! not to the process, and execve ends every thread but the caller. A
//! service forked by a tokio worker would therefore get SIGTERM when the
//! agent re-executes itself in place. So every fork and the execve happen on
//! one thread, the main one, which is also the thread that continues as the
//! main thread of the new image; the tokio runtime runs on the others and
//! sends its forks here.

use std::sync::mpsc;

type Job = Box<dyn FnOnce() + Send>;

/// What the main thread is asked to do.
pub enum MainJob {
    Run(Job),
    /// The agent is done; the main thread leaves its loop.
    Finish,
}

/// A handle to send forks (and the end of the agent) to the main thread.
#[derive(Clone)]
pub struct Launcher {
    jobs: mpsc::Sender<MainJob>,
}

impl Launcher {
    /// The handle, and the receiving end the main thread loops on (see
    /// [`run_jobs`]).
    pub fn new() -> (Launcher, mpsc::Receiver<MainJob>) {
        let (jobs, receiver) = mpsc::channel();
        (Launcher { jobs }, receiver)
    }

    /// Runs `job` on the main thread and returns what it returned; `None`
    /// when the main thread no longer takes work (the agent is ending).
    pub async fn run<R: Send + 'static>(
        &self,
        job: impl FnOnce() -> R + Send + 'static,
    ) -> Option<R> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = reply.send(job());
        });
        self.jobs.send(MainJob::Run(job)).ok()?;
        answer.await.ok()
    }

    /// Ends the main thread's loop.
    pub fn finish(&self) {
        let _ = self.jobs.send(MainJob::Finish);
    }
}

/// The main thread's loop: runs jobs until one says finish (or every
/// handle is gone).
pub fn run_jobs(receiver: mpsc::Receiver<MainJob>) {
    for job in receiver {
        match job {
            MainJob::Run(job) => job(),
            MainJob::Finish => return,
        }
    }
}
