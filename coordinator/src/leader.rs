//! Leadership. With etcd, coordinators campaign on `{prefix}/leader` (etcd's election API, each
//! candidate on its own lease); the winner takes over the recorded state, follows the workers'
//! records and serves, the others stand by and answer UNAVAILABLE so clients and workers move on
//! to the leader. Without etcd the single coordinator leads from the start.
//!
//! Serving does not depend on etcd being up. A leader that cannot reach etcd keeps serving on
//! the placement it has (nobody can be elected while etcd is away); it steps down only once etcd
//! answers that its lease is gone *and* another candidate has won meanwhile. If nobody has, it
//! wins again on a new lease and goes on, its state unchanged. (A leader cut off from an etcd
//! that the others still reach serves on until it reaches etcd again, beside the new leader;
//! its registry writes are fenced, so etcd keeps the successor's state.)

use std::time::{Duration, Instant};

use etcd_client::Client;
use moe_runtime::shutdown::Shutdown;
use tokio::sync::watch;
use tonic::{Request, Status};

use crate::registry::watch::follow;
use crate::registry::{EtcdOptions, Fence};
use crate::state::StateHandle;
use moe_runtime::etcd::{call, renew};

/// Why a term ended (or never began) before shutdown; the candidate campaigns again.
#[derive(Debug, thiserror::Error)]
enum TermEnded {
    #[error(transparent)]
    Lease(moe_runtime::etcd::EtcdError),
    #[error("campaign: {0}")]
    Campaign(etcd_client::Error),
    #[error("campaign won without a leader key")]
    NoLeaderKey,
    #[error("etcd no longer has lease {0:x}")]
    LeaseGone(i64),
    #[error("lease {0:x} expired and another coordinator was elected meanwhile")]
    Succeeded(i64),
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
                Ok(()) => {
                    serving.send_replace(false);
                    return;
                }
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

    async fn grant(&self, client: &mut Client) -> Result<i64, TermEnded> {
        let ttl_s = self.ttl.as_secs().max(2) as i64;
        let granted = call(
            self.etcd.request_timeout,
            "granting the election lease",
            client.lease_grant(ttl_s, None),
        )
        .await
        .map_err(TermEnded::Lease)?;
        Ok(granted.id())
    }

    /// Grants a lease and campaigns on it: the lease and the won election key, or `None` at
    /// shutdown.
    async fn campaign(&self, client: &mut Client, shutdown: &Shutdown) -> Result<Option<(i64, Fence)>, TermEnded> {
        let lease = self.grant(client).await?;
        self.campaign_on(client, lease, shutdown).await
    }

    async fn campaign_on(
        &self,
        client: &mut Client,
        lease: i64,
        shutdown: &Shutdown,
    ) -> Result<Option<(i64, Fence)>, TermEnded> {
        let timeout = self.etcd.request_timeout;
        let mut campaigner = client.clone();
        let campaign = campaigner.campaign(self.etcd.key("leader"), self.candidate.clone(), lease);
        tracing::info!(candidate = %self.candidate, "campaigning for leadership");
        // The lease must stay alive while the campaign waits on the current leader.
        let holding = hold(client.clone(), lease, self.ttl, timeout, |_| {});
        let won = tokio::select! {
            r = campaign => r.map_err(TermEnded::Campaign)?,
            why = holding => return Err(why),
            _ = shutdown.clone().wait() => {
                let _ = client.lease_revoke(lease).await;
                return Ok(None);
            }
        };
        let key = won.leader().ok_or(TermEnded::NoLeaderKey)?;
        let fence = Fence {
            key: key.key().to_vec(),
            create_revision: key.rev(),
        };
        Ok(Some((lease, fence)))
    }

    /// After the lease was lost while leading (etcd answers again): who leads now? Another
    /// coordinator: stand by. Nobody: campaign, which returns at once, and go on leading on the
    /// new lease. Meanwhile this coordinator serves on, as through an outage; an etcd that
    /// answers unreliably is asked again rather than taken as a successor.
    async fn win_again(
        &self,
        client: &mut Client,
        lost: i64,
        shutdown: &Shutdown,
    ) -> Result<Option<(i64, Fence)>, TermEnded> {
        let timeout = self.etcd.request_timeout;
        let name = self.etcd.key("leader");
        let retry = Duration::from_millis(500);
        loop {
            if shutdown.is_triggered() {
                return Ok(None);
            }
            match call(timeout, "reading the election", client.leader(name.clone())).await {
                Ok(resp) if resp.kv().is_some_and(|kv| kv.lease() != lost) => return Err(TermEnded::Succeeded(lost)),
                Ok(_) => {}
                // etcd's election answers "no leader" as an error.
                Err(e) if e.to_string().contains("no leader") => {}
                Err(e) => {
                    tracing::warn!(error = %e, "reading the election failed; asking again");
                    tokio::time::sleep(retry).await;
                    continue;
                }
            }
            let lease = match self.grant(client).await {
                Ok(lease) => lease,
                Err(e) => {
                    tracing::warn!(error = %e, "granting a new leadership lease failed; retrying");
                    tokio::time::sleep(retry).await;
                    continue;
                }
            };
            match tokio::time::timeout(timeout, self.campaign_on(client, lease, shutdown)).await {
                Ok(Ok(won)) => return Ok(won),
                Ok(Err(e)) => tracing::warn!(error = %e, "campaigning again failed; retrying"),
                // Waiting: another candidate's key came first. Withdraw (revoking the lease
                // deletes our key) and look again at who leads.
                Err(_) => {}
            }
            let _ = tokio::time::timeout(timeout, client.lease_revoke(lease)).await;
            tokio::time::sleep(retry).await;
        }
    }

    /// One term: campaign on a fresh lease, lead while it holds (or while etcd cannot say it
    /// does not). Ok at shutdown (after resigning, so a standby takes over at once); Err when
    /// the campaign failed or another coordinator leads now.
    async fn term(
        &self,
        mut client: Client,
        state: &StateHandle,
        serving: &watch::Sender<bool>,
        shutdown: &Shutdown,
    ) -> Result<(), TermEnded> {
        let timeout = self.etcd.request_timeout;
        let Some((mut lease, fence)) = self.campaign(&mut client, shutdown).await? else {
            return Ok(());
        };
        tracing::info!(candidate = %self.candidate, "elected leader");
        {
            let holding = hold(client.clone(), lease, self.ttl, timeout, |_| {});
            tokio::select! {
                () = state.lead(Some(fence)) => {}
                why = holding => return Err(why),
            }
        }
        state.set_registry_reachable(true);
        serving.send_replace(true);
        // The workers' records, followed for as long as this term lasts.
        let follower = {
            let state = state.clone();
            tokio::spawn(follow(self.etcd.clone(), move |event| state.member_event(event)))
        };
        let _stop_following = AbortOnDrop(follower);
        loop {
            tokio::select! {
                why = hold(client.clone(), lease, self.ttl, timeout, |up| state.set_registry_reachable(up)) => {
                    tracing::warn!(%why, "leadership lease lost; winning again unless another coordinator was elected");
                    let TermEnded::LeaseGone(lost) = why else { return Err(why) };
                    let Some((renewed, fence)) = self.win_again(&mut client, lost, shutdown).await? else {
                        return Ok(());
                    };
                    lease = renewed;
                    state.refence(fence).await;
                    tracing::info!(lease = format!("{lease:x}"), "leading again on a new lease, state unchanged");
                }
                _ = shutdown.clone().wait() => {
                    serving.send_replace(false);
                    // Revoking deletes the election key: a standby wins without waiting a TTL.
                    let _ = tokio::time::timeout(timeout, client.lease_revoke(lease)).await;
                    tracing::info!("resigned leadership");
                    return Ok(());
                }
            }
        }
    }
}

/// Aborts the task when dropped (the end of a term, however it ends).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps `lease` alive; returns only once etcd *answers* that the lease is gone. While etcd
/// cannot be reached the lease may expire unseen; nobody can be elected then either, so the
/// holder goes on (and learns the outcome when etcd is back).
/// `reachable` hears whether etcd answers, each time that changes.
async fn hold(mut client: Client, lease: i64, ttl: Duration, timeout: Duration, reachable: impl Fn(bool)) -> TermEnded {
    let mut unreachable_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(ttl / 4).await;
        let renewed = renew(&mut client, lease, timeout.min(ttl / 4)).await;
        if renewed.is_ok()
            && let Some(since) = unreachable_since.take()
        {
            tracing::info!(after = ?since.elapsed(), "etcd reachable again");
            reachable(true);
        }
        match renewed {
            Ok(true) => {}
            Ok(false) => return TermEnded::LeaseGone(lease),
            Err(e) => {
                if unreachable_since.is_none() {
                    tracing::error!(error = %e, "etcd unreachable: serving on with the current placement");
                    unreachable_since = Some(Instant::now());
                    reachable(false);
                }
            }
        }
    }
}
