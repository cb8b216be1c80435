//! Write-behind access to the [`Registry`]: the cluster state hands writes over and goes on, so a
//! slow or unreachable etcd never stalls heartbeats, request placement or serving. Writes are
//! applied in order; one that fails for a transient reason stays queued and is retried (with
//! everything after it) on the next tick. Only the latest placement matters, so a newer one
//! replaces a queued older one.

use std::time::Duration;

use moe_proto::v1::Placement;
use tokio::sync::{mpsc, oneshot};

use crate::Result;
use crate::registry::{Fence, Registry, Snapshot};

enum Op {
    Placement(Placement),
    Load(oneshot::Sender<Result<Snapshot>>),
    Claim(String, oneshot::Sender<Result<()>>),
    Fence(Option<Fence>, oneshot::Sender<()>),
}

/// Cheap, cloneable handle to the store task.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::UnboundedSender<Op>,
}

impl Store {
    /// Starts the task; `tick` paces lease renewal and retries.
    pub fn spawn(registry: Box<dyn Registry>, tick: Duration) -> Store {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(registry, rx, tick));
        Store { tx }
    }

    pub fn put_placement(&self, p: Placement) {
        let _ = self.tx.send(Op::Placement(p));
    }

    /// Reads what is recorded, after every write handed over before this call.
    pub async fn load(&self) -> Result<Snapshot> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Load(reply))
            .map_err(|_| crate::registry::RegistryError::StoreStopped)?;
        rx.await.map_err(|_| crate::registry::RegistryError::StoreStopped)?
    }

    /// Claims the prefix for `model_id` (again: etcd may have lost the claim with its data).
    pub async fn claim(&self, model_id: &str) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Claim(model_id.to_owned(), reply))
            .map_err(|_| crate::registry::RegistryError::StoreStopped)?;
        rx.await.map_err(|_| crate::registry::RegistryError::StoreStopped)?
    }

    /// Fences later writes on `fence` (see [`Registry::set_fence`]); queued writes are dropped,
    /// as they were made under the previous term.
    pub async fn set_fence(&self, fence: Option<Fence>) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Op::Fence(fence, reply)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// Writes the queued placement unless it fails for a reason worth retrying.
async fn drain(registry: &mut dyn Registry, queued: &mut Option<Placement>) {
    let Some(p) = queued else { return };
    match registry.put_placement(p).await {
        Ok(()) => {}
        Err(e @ crate::Error::NotLeader(_)) => tracing::warn!(error = %e, "registry write dropped"),
        Err(e) => {
            tracing::warn!(error = %e, version = p.version, "recording the placement failed; will retry");
            return;
        }
    }
    *queued = None;
}

async fn run(mut registry: Box<dyn Registry>, mut rx: mpsc::UnboundedReceiver<Op>, tick: Duration) {
    let mut queued: Option<Placement> = None;
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            op = rx.recv() => match op {
                None => return,
                Some(Op::Placement(p)) => {
                    queued = Some(p);
                    drain(registry.as_mut(), &mut queued).await;
                }
                Some(Op::Load(reply)) => {
                    drain(registry.as_mut(), &mut queued).await;
                    let _ = reply.send(registry.load().await);
                }
                Some(Op::Claim(model_id, reply)) => {
                    let _ = reply.send(registry.claim(&model_id).await);
                }
                Some(Op::Fence(fence, reply)) => {
                    queued = None;
                    registry.set_fence(fence);
                    let _ = reply.send(());
                }
            },
            _ = ticker.tick() => drain(registry.as_mut(), &mut queued).await,
        }
    }
}
