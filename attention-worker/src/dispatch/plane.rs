//! How one layer's rows travel to the expert workers: in the gRPC messages, or over NCCL with
//! only the headers on gRPC. Chosen once per layer dispatch, for the whole layer.

use std::collections::HashMap;
use std::sync::Arc;

use moe_model::cuda::NcclComm;
use moe_proto::tensor::WireDtype;
use moe_proto::v1::NcclGroup;
use moe_runtime::dispatch::Rows;
use moe_runtime::nccl::NcclAgent;

#[derive(Clone)]
pub(crate) enum DataPlane {
    /// Rows in the messages, packed as this dtype; answers come back the same way.
    Grpc(WireDtype),
    /// Rows and answers over NCCL (bf16) on this communicator; each expert worker by its rank.
    Nccl {
        comm: Arc<NcclComm>,
        epoch: u64,
        ranks: HashMap<String, usize>,
    },
}

impl DataPlane {
    /// NCCL while this worker's group is ready and holds every expert worker the layer goes
    /// to; gRPC in `wire` otherwise.
    pub fn choose<'a>(nccl: Option<&NcclAgent>, wire: WireDtype, workers: impl IntoIterator<Item = &'a str>) -> Self {
        let over_nccl = nccl.and_then(NcclAgent::ready).and_then(|(comm, group)| {
            let ranks = nccl_ranks(&group, workers)?;
            Some(DataPlane::Nccl {
                comm,
                epoch: group.epoch,
                ranks,
            })
        });
        over_nccl.unwrap_or(DataPlane::Grpc(wire))
    }

    /// How `values`, bound for `worker`, travel: the message's rows field and, over NCCL, the
    /// peer rank and the rows to send it.
    pub fn route(&self, worker: &str, values: Vec<f32>) -> (Rows, Option<(usize, Vec<f32>)>) {
        match self {
            DataPlane::Grpc(dtype) => (Rows::Inline { values, dtype: *dtype }, None),
            DataPlane::Nccl { comm, epoch, ranks } => {
                let rows = Rows::Nccl {
                    epoch: *epoch,
                    sender_rank: comm.rank(),
                };
                (rows, Some((ranks[worker], values)))
            }
        }
    }

    pub fn communicator(&self) -> Option<&Arc<NcclComm>> {
        match self {
            DataPlane::Grpc(_) => None,
            DataPlane::Nccl { comm, .. } => Some(comm),
        }
    }

    /// Gives up the NCCL communicator (its peers' pending operations end with it), so the next
    /// attempt goes over gRPC.
    pub fn abandon(&self, why: &str) {
        if let Some(comm) = self.communicator() {
            comm.abort(why);
        }
    }
}

/// The NCCL rank of each expert worker a layer dispatch goes to, when the group holds them all.
fn nccl_ranks<'a>(group: &NcclGroup, workers: impl IntoIterator<Item = &'a str>) -> Option<HashMap<String, usize>> {
    let mut ranks = HashMap::new();
    for id in workers {
        let peer = group.peers.iter().find(|p| p.worker_id == id)?;
        ranks.insert(id.to_owned(), peer.rank as usize);
    }
    Some(ranks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_goes_over_nccl_only_when_the_group_holds_every_worker_it_is_sent_to() {
        let peer = |id: &str, rank| moe_proto::v1::NcclPeer {
            worker_id: id.into(),
            rank,
        };
        let group = NcclGroup {
            epoch: 3,
            rank: 0,
            world_size: 3,
            peers: vec![peer("a1", 0), peer("w0", 1), peer("w1", 2)],
            ..Default::default()
        };
        let ranks = nccl_ranks(&group, ["w1", "w0", "w1"]).unwrap();
        assert_eq!(ranks.len(), 2);
        assert_eq!((ranks["w0"], ranks["w1"]), (1, 2));
        // An expert worker outside the group (it joined after the group was formed, or has
        // no GPU): the whole layer goes over gRPC.
        assert!(nccl_ranks(&group, ["w0", "w2"]).is_none());
    }

    #[test]
    fn without_a_data_plane_rows_go_in_the_messages_in_the_wire_dtype() {
        let plane = DataPlane::choose(None, WireDtype::Bf16, ["w0"]);
        assert!(plane.communicator().is_none());
        let (rows, nccl) = plane.route("w0", vec![1.0]);
        assert_eq!(
            rows,
            Rows::Inline {
                values: vec![1.0],
                dtype: WireDtype::Bf16
            }
        );
        assert!(nccl.is_none());
    }
}
