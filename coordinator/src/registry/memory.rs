//! The embedded registry: records live as long as the coordinator process. Nothing to install,
//! nothing survives a restart; the default for a single-command local cluster.

use std::collections::BTreeMap;

use moe_proto::v1::Placement;

use super::{Fence, Member, Registry, RegistryError, Snapshot};
use crate::Result;

#[derive(Debug, Default)]
pub struct InMemoryRegistry {
    model_id: Option<String>,
    members: BTreeMap<String, Member>,
    placement: Option<Placement>,
}

#[tonic::async_trait]
impl Registry for InMemoryRegistry {
    async fn claim(&mut self, model_id: &str) -> Result<()> {
        match &self.model_id {
            Some(held) if held != model_id => Err(RegistryError::OtherModel {
                place: "this registry".into(),
                held: held.clone(),
                wanted: model_id.to_owned(),
                hint: "",
            }
            .into()),
            _ => {
                self.model_id = Some(model_id.to_owned());
                Ok(())
            }
        }
    }

    async fn load(&mut self) -> Result<Snapshot> {
        let mut members: Vec<Member> = self.members.values().cloned().collect();
        members.sort_by_key(|m| m.seq);
        Ok(Snapshot {
            members,
            placement: self.placement.clone(),
        })
    }

    async fn put_member(&mut self, member: &Member) -> Result<()> {
        self.members.insert(member.id.clone(), member.clone());
        Ok(())
    }

    async fn keep_alive(&mut self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    async fn remove_member(&mut self, id: &str) -> Result<()> {
        self.members.remove(id);
        Ok(())
    }

    async fn put_placement(&mut self, placement: &Placement) -> Result<()> {
        self.placement = Some(placement.clone());
        Ok(())
    }

    fn set_fence(&mut self, _fence: Option<Fence>) {}
}
