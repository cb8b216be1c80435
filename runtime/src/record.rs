//! A worker's own member record in etcd: `{prefix}/members/{id}` under a lease the worker keeps
//! alive. The record is how coordinators learn of a worker without it calling them first (the
//! autoscaling path: a new pod records itself and is given experts), and it lives exactly as
//! long as the worker: a worker killed with `kill -9` stops renewing and its record is gone
//! within the TTL; one that leaves revokes its lease and the record goes at once.
//!
//! etcd being away never stops the worker: renewal failures are logged and retried, and a lease
//! that expired meanwhile (or an etcd that lost its data) is replaced by a new one, under which
//! the same record is written again.

use std::time::Duration;

use etcd_client::{Client, PutOptions};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::etcd::{self, EtcdError, EtcdOptions};
use crate::member::Member;

/// The task keeping the record; [`RecordKeeper::remove`] takes the record out of etcd.
pub struct RecordKeeper {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl RecordKeeper {
    /// Starts recording `member` and keeping its lease alive.
    pub fn spawn(options: EtcdOptions, member: Member) -> RecordKeeper {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(keep(options, member, stopped));
        RecordKeeper { stop, task }
    }

    /// Stops renewing without revoking anything, as if the process had died: the record goes
    /// when its lease expires.
    pub fn abort(self) {
        self.task.abort();
    }

    /// Stops renewing and revokes the lease, so the record is gone now rather than after the TTL.
    pub async fn remove(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// A record written under a live lease.
struct Held {
    client: Client,
    lease: i64,
}

async fn keep(options: EtcdOptions, member: Member, mut stopped: oneshot::Receiver<()>) {
    let period = (options.member_ttl / 3).max(Duration::from_millis(500));
    let mut held: Option<Held> = None;
    loop {
        if held.is_none() {
            match record(&options, &member).await {
                Ok(h) => {
                    tracing::info!(worker = %member.id, lease = format!("{:x}", h.lease), "recorded in etcd");
                    held = Some(h);
                }
                Err(e) => {
                    tracing::warn!(worker = %member.id, error = %e, "recording this worker in etcd failed; retrying")
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = &mut stopped => break,
        }
        if let Some(h) = &mut held {
            // A renewal slower than the period would let a short lease lapse unseen.
            match etcd::renew(&mut h.client, h.lease, options.request_timeout.min(period)).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(worker = %member.id, "etcd no longer has this worker's lease; recording it again");
                    held = None;
                }
                Err(e) => {
                    tracing::warn!(worker = %member.id, error = %e, "renewing this worker's lease failed; retrying")
                }
            }
        }
    }
    if let Some(mut h) = held {
        let revoked = etcd::call(
            options.request_timeout,
            "revoking the member lease",
            h.client.lease_revoke(h.lease),
        )
        .await;
        match revoked {
            Ok(_) => tracing::info!(worker = %member.id, "record removed from etcd"),
            Err(e) => tracing::warn!(worker = %member.id, error = %e, "the record stays until its lease expires"),
        }
    }
}

/// Grants a lease and writes the record under it.
async fn record(options: &EtcdOptions, member: &Member) -> Result<Held, EtcdError> {
    let mut client = options.connect().await?;
    let ttl = options.member_ttl.as_secs().max(2) as i64;
    let timeout = options.request_timeout;
    let lease = etcd::call(timeout, "granting the member lease", client.lease_grant(ttl, None))
        .await?
        .id();
    let value = serde_json::to_vec(member).expect("a member record always encodes");
    let put = client.put(
        options.member_key(&member.id),
        value,
        Some(PutOptions::new().with_lease(lease)),
    );
    etcd::call(timeout, "writing the member record", put).await?;
    Ok(Held { client, lease })
}
