//! The member's background tasks, in one named set with an ordered shutdown.
//!
//! Every long-running task of a member (lease clocks and checkpoints, membership
//! watchers, peers' attribute learners) is spawned here with a name. Shutdown stops
//! them in the order they were started, each one finished before the next is stopped,
//! so the tasks that propose (leases) are gone before the ones they may rely on, and
//! none is still running when the Raft node and the store are closed.

use std::future::Future;
use std::sync::{Mutex, PoisonError};

use tokio::task::JoinHandle;

/// A named set of tasks on the current tokio runtime.
#[derive(Default)]
pub struct Tasks {
    tasks: Mutex<Vec<(&'static str, JoinHandle<()>)>>,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.lock().iter().map(|t| t.0).collect();
        f.debug_struct("Tasks").field("tasks", &names).finish()
    }
}

impl Tasks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(&'static str, JoinHandle<()>)>> {
        self.tasks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts `fut` as task `name`.
    pub fn spawn(&self, name: &'static str, fut: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.lock();
        // Tasks that ended on their own need no stopping.
        tasks.retain(|t| !t.1.is_finished());
        tasks.push((name, tokio::spawn(fut)));
    }

    /// The names of the tasks still running, in start order.
    pub fn running(&self) -> Vec<&'static str> {
        self.lock()
            .iter()
            .filter(|t| !t.1.is_finished())
            .map(|t| t.0)
            .collect()
    }

    /// Stops every task, in start order, each one ended before the next is stopped.
    pub async fn shutdown(&self) {
        let tasks = std::mem::take(&mut *self.lock());
        for (name, task) in tasks {
            task.abort();
            if let Err(e) = task.await
                && e.is_panic()
            {
                tracing::error!(task = name, "member task panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_stops_tasks_in_start_order() {
        let tasks = Tasks::default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        struct Report(
            &'static str,
            tokio::sync::mpsc::UnboundedSender<&'static str>,
        );
        impl Drop for Report {
            fn drop(&mut self) {
                let _ = self.1.send(self.0);
            }
        }
        for name in ["first", "second", "third"] {
            // Dropped with the task's future, whether it ever ran or not.
            let report = Report(name, tx.clone());
            tasks.spawn(name, async move {
                let _report = report;
                std::future::pending::<()>().await;
            });
        }
        tasks.spawn("done", async {});
        assert!(tasks.running().len() >= 3);
        tasks.shutdown().await;
        drop(tx);
        let mut order = Vec::new();
        while let Some(n) = rx.recv().await {
            order.push(n);
        }
        assert_eq!(order, ["first", "second", "third"]);
        assert!(tasks.running().is_empty());
    }
}
