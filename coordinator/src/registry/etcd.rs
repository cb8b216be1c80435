//! The etcd registry. Layout under the cluster prefix:
//!
//! | key | value | lease |
//! |---|---|---|
//! | `{prefix}/model` | the model identity the cluster serves | none |
//! | `{prefix}/members/{id}` | [`Member`] as JSON | the leader's member lease |
//! | `{prefix}/placement` | the active placement, protobuf | none |
//! | `{prefix}/leader/…` | the election (see [`crate::leader`]) | each candidate's own |
//!
//! Member records hang on one lease that the leader keeps alive; when no coordinator is left
//! they expire together. A new leader records them again under its own lease. Writes are fenced
//! on the leader's election key, so a deposed leader's late writes are refused by etcd itself.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};
use moe_proto::v1::Placement;
use prost::Message;

use super::{Fence, Member, Registry, RegistryError, Snapshot};
use crate::{Error, Result};

/// How to reach etcd and where the cluster lives in it.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// Key prefix of this cluster, e.g. `/hunyuan-moe/prod`.
    pub prefix: String,
    /// Lease of the member records: how long they outlive the last coordinator.
    pub member_ttl: Duration,
    /// Longest any single etcd call may take.
    pub request_timeout: Duration,
    /// etcd user name and password, when etcd has authentication on.
    pub credentials: Option<(String, String)>,
    /// TLS to etcd (`https://` endpoints): the CA etcd's certificate chains to, and a client
    /// certificate when etcd requires one.
    pub tls: Option<moe_runtime::tls::ClientTls>,
}

impl EtcdOptions {
    pub fn key(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.prefix.trim_end_matches('/'))
    }

    /// Connects (lazily: an etcd that is down now is retried by each call).
    pub async fn connect(&self) -> Result<Client> {
        if self.endpoints.is_empty() {
            return Err(RegistryError::NoEndpoint.into());
        }
        if !self.prefix.starts_with('/') {
            return Err(RegistryError::Prefix(self.prefix.clone()).into());
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.request_timeout)
            .with_keep_alive(Duration::from_secs(2), self.request_timeout);
        if let Some((user, password)) = &self.credentials {
            options = options.with_user(user.clone(), password.clone());
        }
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.config());
        }
        let connect = Client::connect(&self.endpoints, Some(options));
        match tokio::time::timeout(self.request_timeout, connect).await {
            Ok(client) => client.map_err(|source| Error::Etcd {
                context: format!("connecting to {}", self.endpoints.join(",")),
                source,
            }),
            Err(_) => Err(RegistryError::NoAnswer {
                context: format!("etcd at {}", self.endpoints.join(",")),
                timeout: self.request_timeout,
            }
            .into()),
        }
    }
}

/// Runs one etcd call under the request timeout, naming what it was for in the error.
pub(crate) async fn call<T>(
    timeout: Duration,
    context: &str,
    f: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r.map_err(|source| Error::Etcd {
            context: context.to_owned(),
            source,
        }),
        Err(_) => Err(RegistryError::NoAnswer {
            context: context.to_string(),
            timeout,
        }
        .into()),
    }
}

/// Renews `lease` once: `Ok(false)` when etcd no longer has it (expired or lost).
pub(crate) async fn renew(client: &mut Client, lease: i64, timeout: Duration) -> Result<bool> {
    match tokio::time::timeout(timeout, client.lease_keep_alive(lease)).await {
        Ok(Ok(_)) => Ok(true),
        Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => Ok(false),
        Ok(Err(source)) => Err(Error::Etcd {
            context: format!("renewing lease {lease:x}"),
            source,
        }),
        Err(_) => Err(RegistryError::NoAnswer {
            context: format!("renewing lease {lease:x}"),
            timeout,
        }
        .into()),
    }
}

pub struct EtcdRegistry {
    client: Client,
    options: EtcdOptions,
    /// The lease member records hang on, once granted.
    lease: Option<i64>,
    /// What this coordinator recorded, to record again if the lease is lost.
    members: BTreeMap<String, Member>,
    fence: Option<Fence>,
}

impl EtcdRegistry {
    pub async fn connect(options: EtcdOptions) -> Result<Self> {
        Ok(EtcdRegistry {
            client: options.connect().await?,
            options,
            lease: None,
            members: BTreeMap::new(),
            fence: None,
        })
    }

    fn member_key(&self, id: &str) -> String {
        self.options.key(&format!("members/{id}"))
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

    async fn member_lease(&mut self) -> Result<i64> {
        if let Some(lease) = self.lease {
            return Ok(lease);
        }
        let ttl = self.options.member_ttl.as_secs().max(2) as i64;
        let granted = call(
            self.options.request_timeout,
            "granting the member lease",
            self.client.lease_grant(ttl, None),
        )
        .await?;
        self.lease = Some(granted.id());
        Ok(granted.id())
    }

    async fn write_member(&mut self, member: &Member) -> Result<()> {
        let lease = self.member_lease().await?;
        let value = serde_json::to_vec(member).map_err(RegistryError::from)?;
        let put = TxnOp::put(
            self.member_key(&member.id),
            value,
            Some(PutOptions::new().with_lease(lease)),
        );
        self.write(vec![put], &format!("recording member {}", member.id)).await
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
        let timeout = self.options.request_timeout;
        let prefix = self.options.key("members/");
        let resp = call(
            timeout,
            "listing members",
            self.client.get(prefix, Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let mut members = Vec::new();
        for kv in resp.kvs() {
            match serde_json::from_slice::<Member>(kv.value()) {
                Ok(m) => members.push(m),
                // One bad record must not keep a coordinator from leading; its worker will
                // register again.
                Err(e) => {
                    tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "unreadable member record: ignored")
                }
            }
        }
        members.sort_by_key(|m| m.seq);
        let key = self.options.key("placement");
        let resp = call(timeout, "reading the placement", self.client.get(key, None)).await?;
        let placement = match resp.kvs().first() {
            Some(kv) => Some(Placement::decode(kv.value()).map_err(RegistryError::from)?),
            None => None,
        };
        Ok(Snapshot { members, placement })
    }

    async fn put_member(&mut self, member: &Member) -> Result<()> {
        self.members.insert(member.id.clone(), member.clone());
        self.write_member(member).await
    }

    async fn keep_alive(&mut self) -> Result<Vec<String>> {
        if let Some(lease) = self.lease
            && renew(&mut self.client, lease, self.options.request_timeout).await?
        {
            return Ok(Vec::new());
        }
        if self.members.is_empty() {
            return Ok(Vec::new());
        }
        // The lease is gone (etcd lost it, or it expired while etcd was unreachable): record
        // every member again under a new one.
        self.lease = None;
        let members: Vec<Member> = self.members.values().cloned().collect();
        for m in &members {
            self.write_member(m).await?;
        }
        Ok(members.into_iter().map(|m| m.id).collect())
    }

    async fn remove_member(&mut self, id: &str) -> Result<()> {
        self.members.remove(id);
        let key = self.member_key(id);
        self.write(vec![TxnOp::delete(key, None)], &format!("removing member {id}"))
            .await
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
