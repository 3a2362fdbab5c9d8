//! Named tasks: the agent's health names a watcher or server task that ended or panicked.

/// The agent's tasks (watchers, pollers, the probe, the HTTP server), by name: one that ends or
/// panics is reported dead by the agent's status (and `/healthz` fails).
pub struct Tasks {
    set: tokio::task::JoinSet<()>,
    names: std::collections::HashMap<tokio::task::Id, String>,
}

impl Tasks {
    #[must_use]
    pub fn new() -> Self {
        Self { set: tokio::task::JoinSet::new(), names: std::collections::HashMap::new() }
    }

    /// Runs `task`, named `name` in health reports.
    pub fn spawn(
        &mut self,
        name: impl Into<String>,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name.into());
    }

    /// Stops every task.
    pub fn abort_all(&mut self) {
        self.set.abort_all();
    }

    /// The next task that ended, and how; `None` when none is left.
    pub async fn next_ended(&mut self) -> Option<(String, &'static str)> {
        let (id, how) = match self.set.join_next_with_id().await? {
            Ok((id, ())) => (id, "ended"),
            Err(e) if e.is_panic() => (e.id(), "panicked"),
            Err(e) => (e.id(), "was cancelled"),
        };
        Some((self.names.remove(&id).unwrap_or_else(|| "a task".to_owned()), how))
    }
}

impl Default for Tasks {
    fn default() -> Self {
        Self::new()
    }
}
