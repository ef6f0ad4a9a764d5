//! Counts the lifecycle tasks that hold a slot lease (streams, saves) so
//! that shutdown, tests and the demo can wait until kvgate is idle.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Counts running lifecycle tasks so shutdown can wait for them.
#[derive(Debug, Default)]
pub struct TaskCounter {
    running: AtomicUsize,
    idle: Notify,
}

/// Held by a running task; dropping it ends the task's count.
#[derive(Debug)]
pub struct TaskGuard(Arc<TaskCounter>);

impl TaskCounter {
    /// Counts one more running task.
    pub fn start(self: &Arc<Self>) -> TaskGuard {
        self.running.fetch_add(1, Ordering::SeqCst);
        TaskGuard(Arc::clone(self))
    }

    /// Tasks running now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Waits until no task runs.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.running() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
