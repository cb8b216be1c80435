//! Leadership. With etcd, coordinators campaign on `{prefix}/leader` (etcd's election API, each
//! candidate on its own lease); the winner takes over the recorded state and serves, the others
//! stand by and answer UNAVAILABLE so clients and workers move on to the leader. A leader that
//! cannot renew its lease within the TTL stops serving at once (fail fast): by then a standby
//! may have won. Without etcd the single coordinator leads from the start.

use std::time::{Duration, Instant};

use etcd_client::Client;
use moe_runtime::shutdown::Shutdown;
use tokio::sync::watch;
use tonic::{Request, Status};

use crate::registry::{EtcdOptions, Fence};
use crate::state::StateHandle;

/// Why a term ended (or never began) before shutdown; the candidate campaigns again.
#[derive(Debug, thiserror::Error)]
enum TermEnded {
    #[error(transparent)]
    Lease(crate::Error),
    #[error("campaign: {0}")]
    Campaign(etcd_client::Error),
    #[error("campaign won without a leader key")]
    NoLeaderKey,
    #[error("etcd no longer has lease {0:x}")]
    LeaseGone(i64),
    #[error("lease {lease:x} could not be renewed within its TTL: {source}")]
    NotRenewed { lease: i64, source: crate::Error },
}

/// Whether this coordinator serves; read by [`LeaderGate`].
pub type Serving = watch::Receiver<bool>;

/// Lets requests through only while this coordinator leads.
#[derive(Clone)]
pub struct LeaderGate {
    pub serving: Serving,
}

impl tonic::service::Interceptor for LeaderGate {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if *self.serving.borrow() {
            Ok(request)
        } else {
            Err(Status::unavailable(
                "this coordinator is a standby (not the leader); retry on another coordinator",
            ))
        }
    }
}

/// Leads from the start (embedded registry, one coordinator).
pub async fn lead_alone(state: &StateHandle) -> Serving {
    state.lead(None).await;
    watch::channel(true).1
}

pub struct Election {
    pub etcd: EtcdOptions,
    /// What this candidate announces (its advertised address).
    pub candidate: String,
    pub ttl: Duration,
}

impl Election {
    /// Campaigns until shutdown, in a task; the receiver says when this coordinator serves.
    pub fn spawn(self, state: StateHandle, shutdown: Shutdown) -> Serving {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move { self.run(state, tx, shutdown).await });
        rx
    }

    async fn run(self, state: StateHandle, serving: watch::Sender<bool>, shutdown: Shutdown) {
        let retry = Duration::from_millis(500);
        while !shutdown.is_triggered() {
            let client = match self.etcd.connect().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "etcd unreachable; campaigning again shortly");
                    tokio::time::sleep(retry).await;
                    continue;
                }
            };
            match self.term(client, &state, &serving, &shutdown).await {
                Ok(()) => return,
                Err(why) => {
                    if serving.send_replace(false) {
                        tracing::error!(%why, "lost leadership: standing by");
                    } else {
                        tracing::warn!(%why, "campaign interrupted; campaigning again");
                    }
                    tokio::time::sleep(retry).await;
                }
            }
        }
    }

    /// One term: campaign on a fresh lease, lead while the lease holds. Ok at shutdown (after
    /// resigning, so a standby takes over at once); Err when the lease or campaign failed.
    async fn term(
        &self,
        mut client: Client,
        state: &StateHandle,
        serving: &watch::Sender<bool>,
        shutdown: &Shutdown,
    ) -> Result<(), TermEnded> {
        let timeout = self.etcd.request_timeout;
        let ttl_s = self.ttl.as_secs().max(2) as i64;
        let lease =
            crate::registry::etcd::call(timeout, "granting the election lease", client.lease_grant(ttl_s, None))
                .await
                .map_err(TermEnded::Lease)?
                .id();
        let name = self.etcd.key("leader");
        let mut campaigner = client.clone();
        let campaign = campaigner.campaign(name.clone(), self.candidate.clone(), lease);
        tracing::info!(candidate = %self.candidate, "campaigning for leadership");
        // One renewal loop for the whole term: the lease must stay alive while the campaign
        // waits on the current leader, while the state is taken over, and while leading.
        let holding = hold(client.clone(), lease, self.ttl, timeout);
        tokio::pin!(holding);
        let won = tokio::select! {
            r = campaign => r.map_err(TermEnded::Campaign)?,
            why = &mut holding => return Err(why),
            _ = shutdown.clone().wait() => {
                let _ = client.lease_revoke(lease).await;
                return Ok(());
            }
        };
        let key = won.leader().ok_or(TermEnded::NoLeaderKey)?;
        let fence = Fence {
            key: key.key().to_vec(),
            create_revision: key.rev(),
        };
        tracing::info!(candidate = %self.candidate, "elected leader");
        tokio::select! {
            () = state.lead(Some(fence)) => {}
            why = &mut holding => return Err(why),
        }
        serving.send_replace(true);
        tokio::select! {
            why = &mut holding => Err(why),
            _ = shutdown.clone().wait() => {
                serving.send_replace(false);
                // Revoking deletes the election key: a standby wins without waiting a TTL.
                let _ = tokio::time::timeout(timeout, client.lease_revoke(lease)).await;
                tracing::info!("resigned leadership");
                Ok(())
            }
        }
    }
}

/// Keeps `lease` alive; returns why once it can no longer be trusted: etcd says it is gone, or
/// it could not be renewed before it would have expired.
async fn hold(mut client: Client, lease: i64, ttl: Duration, timeout: Duration) -> TermEnded {
    let mut valid_until = Instant::now() + ttl;
    loop {
        tokio::time::sleep(ttl / 4).await;
        let sent = Instant::now();
        match crate::registry::etcd::renew(&mut client, lease, timeout.min(ttl / 4)).await {
            Ok(true) => valid_until = sent + ttl,
            Ok(false) => return TermEnded::LeaseGone(lease),
            Err(source) if Instant::now() + ttl / 4 >= valid_until => {
                return TermEnded::NotRenewed { lease, source };
            }
            Err(e) => tracing::warn!(error = %e, "renewing the leadership lease failed; retrying"),
        }
    }
}
