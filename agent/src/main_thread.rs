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
pub enum MainJob<T> {
    Run(Job),
    /// The agent is done; the main thread leaves its loop with this.
    Finish(T),
}

/// A handle to send work to the main thread.
pub struct MainThread<T> {
    jobs: mpsc::Sender<MainJob<T>>,
}

impl<T> Clone for MainThread<T> {
    fn clone(&self) -> Self {
        MainThread {
            jobs: self.jobs.clone(),
        }
    }
}

impl<T: Send + 'static> MainThread<T> {
    /// The handle, and the receiving end the main thread loops on (see
    /// [`run_jobs`]).
    pub fn new() -> (MainThread<T>, mpsc::Receiver<MainJob<T>>) {
        let (jobs, receiver) = mpsc::channel();
        (MainThread { jobs }, receiver)
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

    /// Ends the main thread's loop with `value`.
    pub fn finish(&self, value: T) {
        let _ = self.jobs.send(MainJob::Finish(value));
    }
}

/// The main thread's loop: runs jobs until one says finish.
pub fn run_jobs<T>(receiver: mpsc::Receiver<MainJob<T>>) -> Option<T> {
    for job in receiver {
        match job {
            MainJob::Run(job) => job(),
            MainJob::Finish(value) => return Some(value),
        }
    }
    None
}
