//! The embedded registry: records live as long as the coordinator process. Nothing to install,
//! nothing survives a restart; the default for a single-command local cluster. Workers keep no
//! records of their own here (they have no etcd): the one coordinator knows them from their
//! registrations.

use moe_proto::v1::Placement;

use super::{Fence, Registry, RegistryError, Snapshot};
use crate::Result;

#[derive(Debug, Default)]
pub struct InMemoryRegistry {
    model_id: Option<String>,
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
        Ok(Snapshot {
            members: Vec::new(),
            placement: self.placement.clone(),
        })
    }

    async fn put_placement(&mut self, placement: &Placement) -> Result<()> {
        self.placement = Some(placement.clone());
        Ok(())
    }

    fn set_fence(&mut self, _fence: Option<Fence>) {}
}
