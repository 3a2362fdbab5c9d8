//! What the sources hand the reconciler: the changes they saw ([`Change`]: objects applied and
//! deleted, complete lists), queued in the order seen. Sources decode objects into the model's
//! compact form on their own threads; the reconciler takes the whole queue at each pass, so a
//! burst of events costs one pass.

use std::{
    sync::{Arc, Mutex, mpsc::Sender},
    time::{Duration, Instant},
};

use crate::model::Change;

/// What wakes the reconciler.
#[derive(Debug)]
pub enum Wake {
    /// A source or the lanes config changed.
    Changed,
    /// Stop: leave the datapath as it is.
    Stop,
}

/// The queue of changes not yet taken by the reconciler.
#[derive(Debug, Default)]
pub struct Inputs {
    changes: Vec<Change>,
    /// When the oldest queued change was queued.
    since: Option<Instant>,
}

impl Inputs {
    /// Queues changes; returns whether the queue was empty (the reconciler then needs waking:
    /// otherwise a wake is already on its way for the queued ones).
    pub fn push(&mut self, changes: impl IntoIterator<Item = Change>) -> bool {
        let was_empty = self.changes.is_empty();
        self.changes.extend(changes);
        if was_empty && !self.changes.is_empty() {
            self.since = Some(Instant::now());
        }
        was_empty
    }

    /// Takes every queued change, with how long the oldest waited.
    pub fn take(&mut self) -> (Vec<Change>, Duration) {
        let waited = self.since.take().map_or(Duration::ZERO, |t| t.elapsed());
        (std::mem::take(&mut self.changes), waited)
    }
}

/// Queues changes and wakes the reconciler when needed.
pub fn send(inputs: &Mutex<Inputs>, wake: &Sender<Wake>, changes: impl IntoIterator<Item = Change>) {
    let was_empty = inputs.lock().expect("inputs lock").push(changes);
    if was_empty {
        let _ = wake.send(Wake::Changed);
    }
}

/// Where the reconciler takes its inputs from.
#[derive(Clone)]
pub enum InputsHandle {
    /// The file source's queue.
    Shared(Arc<Mutex<Inputs>>),
    /// The Kubernetes watchers' queue.
    Kube(Arc<Mutex<Inputs>>),
}

impl InputsHandle {
    /// Takes every queued change, with how long the oldest waited.
    pub fn take(&self) -> (Vec<Change>, Duration) {
        match self {
            InputsHandle::Shared(m) | InputsHandle::Kube(m) => m.lock().expect("inputs lock").take(),
        }
    }
}
