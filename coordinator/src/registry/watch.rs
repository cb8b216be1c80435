//! Following the workers' own records in etcd (`{prefix}/members/`): a record that appears is a
//! worker joining (the autoscaling path: a new pod records itself and is given experts), one that
//! disappears is a worker whose lease ended. The leader follows them for as long as it leads.

use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use moe_runtime::etcd::{EtcdOptions, call};

use super::Member;
use super::etcd::{decode_member, list_members};
use crate::Result;

/// A change of the recorded membership.
#[derive(Debug, Clone, PartialEq)]
pub enum MemberEvent {
    /// A record written (a new worker, or one recording itself again).
    Recorded(Member),
    /// The record of this worker id is gone (its lease expired or was revoked).
    Gone(String),
}

/// Follows the member records until the future is dropped: lists them (each handed over as
/// [`MemberEvent::Recorded`]), then watches from the listing's revision. When the watch breaks
/// (etcd away or restarted), it waits a little, lists again and watches again, so nothing
/// written meanwhile is missed.
pub async fn follow(options: EtcdOptions, mut on: impl FnMut(MemberEvent) + Send) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match follow_once(&options, &mut on).await {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => {
                tracing::warn!(error = %e, "following the member records failed; listing them again shortly");
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

async fn follow_once(options: &EtcdOptions, on: &mut (impl FnMut(MemberEvent) + Send)) -> Result<()> {
    let mut client = options.connect().await?;
    let (members, revision) = list_members(&mut client, options).await?;
    for m in members {
        on(MemberEvent::Recorded(m));
    }
    let prefix = options.key("members/");
    let watch = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
    let mut stream = call(
        options.request_timeout,
        "watching the member records",
        client.watch(prefix.clone(), Some(watch)),
    )
    .await?;
    loop {
        let Some(resp) = stream
            .message()
            .await
            .map_err(|source| moe_runtime::etcd::EtcdError::Call {
                context: "watching the member records".into(),
                source,
            })?
        else {
            return Ok(());
        };
        if resp.canceled() {
            tracing::warn!(
                reason = resp.cancel_reason(),
                "etcd ended the watch of the member records"
            );
            return Ok(());
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            match event.event_type() {
                EventType::Put => {
                    if let Some(m) = decode_member(kv) {
                        on(MemberEvent::Recorded(m));
                    }
                }
                EventType::Delete => {
                    let key = String::from_utf8_lossy(kv.key());
                    if let Some(id) = key.strip_prefix(&prefix) {
                        on(MemberEvent::Gone(id.to_owned()));
                    }
                }
            }
        }
    }
}
