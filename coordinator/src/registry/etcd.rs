//! The etcd registry. Layout under the cluster prefix:
//!
//! | key | value | lease | written by |
//! |---|---|---|---|
//! | `{prefix}/model` | the model identity the cluster serves | none | the first coordinator |
//! | `{prefix}/members/{id}` | [`Member`] as JSON | the worker's own | each worker, for itself |
//! | `{prefix}/placement` | the active placement, protobuf | none | the leader |
//! | `{prefix}/leader/…` | the election (see [`crate::leader`]) | each candidate's own | candidates |
//!
//! The leader's writes are fenced on its election key, so a deposed leader's late writes are
//! refused by etcd itself.

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use moe_proto::v1::Placement;
use moe_runtime::etcd::{EtcdOptions, call};
use prost::Message;

use super::{Fence, Member, Registry, RegistryError, Snapshot};
use crate::{Error, Result};

pub struct EtcdRegistry {
    client: Client,
    options: EtcdOptions,
    fence: Option<Fence>,
}

impl EtcdRegistry {
    pub async fn connect(options: EtcdOptions) -> Result<Self> {
        Ok(EtcdRegistry {
            client: options.connect().await?,
            options,
            fence: None,
        })
    }

    /// Applies `ops` in one transaction, fenced on leadership when a fence is set.
    async fn write(&mut self, ops: Vec<TxnOp>, what: &str) -> Result<()> {
        let mut txn = Txn::new();
        if let Some(f) = &self.fence {
            txn = txn.when([Compare::create_revision(
                f.key.clone(),
                CompareOp::Equal,
                f.create_revision,
            )]);
        }
        let txn = txn.and_then(ops);
        let resp = call(self.options.request_timeout, what, self.client.txn(txn)).await?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(Error::NotLeader(what.to_owned()))
        }
    }
}

/// The member records under `prefix`, oldest first, each with its create revision as `seq`;
/// unreadable ones are skipped with a warning (one bad record must not keep a coordinator from
/// leading). Also returns the revision the listing was taken at.
pub(crate) async fn list_members(client: &mut Client, options: &EtcdOptions) -> Result<(Vec<Member>, i64)> {
    let prefix = options.key("members/");
    let resp = call(
        options.request_timeout,
        "listing members",
        client.get(prefix, Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut members: Vec<Member> = resp.kvs().iter().filter_map(decode_member).collect();
    members.sort_by_key(|m| m.seq);
    Ok((members, revision))
}

/// A member record as read from etcd, its `seq` the key's create revision.
pub(crate) fn decode_member(kv: &etcd_client::KeyValue) -> Option<Member> {
    match serde_json::from_slice::<Member>(kv.value()) {
        Ok(mut m) => {
            m.seq = kv.create_revision().max(0) as u64;
            Some(m)
        }
        Err(e) => {
            tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "unreadable member record: ignored");
            None
        }
    }
}

#[tonic::async_trait]
impl Registry for EtcdRegistry {
    async fn claim(&mut self, model_id: &str) -> Result<()> {
        let key = self.options.key("model");
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), model_id, None)]);
        let timeout = self.options.request_timeout;
        call(timeout, "claiming the cluster prefix", self.client.txn(txn)).await?;
        let held = call(
            timeout,
            "reading the cluster's model",
            self.client.get(key.clone(), None),
        )
        .await?;
        let held = held.kvs().first().map(|kv| kv.value().to_vec()).unwrap_or_default();
        if held != model_id.as_bytes() {
            return Err(RegistryError::OtherModel {
                place: format!("etcd prefix {}", self.options.prefix),
                held: String::from_utf8_lossy(&held).into_owned(),
                wanted: model_id.to_owned(),
                hint: ": use another --etcd-prefix",
            }
            .into());
        }
        Ok(())
    }

    async fn load(&mut self) -> Result<Snapshot> {
        let (members, _) = list_members(&mut self.client, &self.options).await?;
        let key = self.options.key("placement");
        let timeout = self.options.request_timeout;
        let resp = call(timeout, "reading the placement", self.client.get(key, None)).await?;
        let placement = match resp.kvs().first() {
            Some(kv) => Some(Placement::decode(kv.value()).map_err(RegistryError::from)?),
            None => None,
        };
        Ok(Snapshot { members, placement })
    }

    async fn put_placement(&mut self, placement: &Placement) -> Result<()> {
        let key = self.options.key("placement");
        self.write(
            vec![TxnOp::put(key, placement.encode_to_vec(), None)],
            &format!("recording placement {}", placement.version),
        )
        .await
    }

    fn set_fence(&mut self, fence: Option<Fence>) {
        self.fence = fence;
    }
}
