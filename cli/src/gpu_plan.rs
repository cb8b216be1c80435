//! Which GPU each worker of `moectl up --gpus` gets, and whether they can form the NCCL data
//! plane. Pure, so it is tested without GPUs.

/// Where each worker runs: `Some(gpu)` per expert worker and per attention worker, or `None`
/// (the CPU) when no GPUs were given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuPlan {
    pub experts: Vec<Option<String>>,
    pub attention: Vec<Option<String>>,
    /// Every worker has a GPU of its own, so they join the NCCL data plane.
    pub nccl: bool,
}

/// GPUs go out round robin, expert workers first. NCCL refuses two ranks of one communicator on
/// one GPU, so the workers join the NCCL data plane only when each has a GPU to itself;
/// otherwise they still compute on their GPUs and talk over gRPC.
pub fn plan(gpus: &[String], experts: usize, attention: usize) -> GpuPlan {
    let mut next = gpus.iter().cycle();
    let mut take = |n: usize| -> Vec<Option<String>> { (0..n).map(|_| next.next().cloned()).collect() };
    let experts = take(experts);
    let attention = take(attention);
    let assigned: Vec<&String> = experts.iter().chain(&attention).flatten().collect();
    let distinct: std::collections::HashSet<&String> = assigned.iter().copied().collect();
    let nccl = !assigned.is_empty() && distinct.len() == assigned.len();
    GpuPlan {
        experts,
        attention,
        nccl,
    }
}

impl GpuPlan {
    /// The flags of a worker placed on `gpu`.
    pub fn flags(&self, gpu: &Option<String>) -> Vec<String> {
        let Some(gpu) = gpu else { return Vec::new() };
        let mut flags = vec!["--device".to_owned(), gpu.clone()];
        if self.nccl {
            flags.extend(["--nccl-device".to_owned(), gpu.clone()]);
        }
        flags
    }

    /// One line for the operator, when GPUs were given.
    pub fn summary(&self) -> Option<String> {
        let workers = self.experts.len() + self.attention.len();
        let gpus: std::collections::HashSet<&String> = self.experts.iter().chain(&self.attention).flatten().collect();
        if gpus.is_empty() {
            return None;
        }
        Some(if self.nccl {
            format!(
                "GPUS {workers} workers on {} GPUs, one each: NCCL data plane on",
                gpus.len()
            )
        } else {
            format!(
                "GPUS {workers} workers on {} GPUs: NCCL needs a GPU per worker, so layers go over gRPC",
                gpus.len()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpus(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("cuda:{i}")).collect()
    }

    #[test]
    fn a_gpu_per_worker_puts_every_worker_on_the_nccl_plane() {
        let p = plan(&gpus(3), 2, 1);
        assert_eq!(p.experts, [Some("cuda:0".into()), Some("cuda:1".into())]);
        assert_eq!(p.attention, [Some("cuda:2".into())]);
        assert!(p.nccl);
        assert_eq!(
            p.flags(&p.attention[0]),
            ["--device", "cuda:2", "--nccl-device", "cuda:2"]
        );
        assert!(p.summary().unwrap().contains("NCCL data plane on"));
    }

    #[test]
    fn more_workers_than_gpus_share_them_without_nccl_and_say_so() {
        let p = plan(&gpus(2), 2, 1);
        assert_eq!(
            p.attention,
            [Some("cuda:0".into())],
            "round robin, expert workers first"
        );
        assert!(!p.nccl, "two ranks on cuda:0 would be refused by NCCL every epoch");
        assert_eq!(p.flags(&p.experts[0]), ["--device", "cuda:0"]);
        assert!(p.summary().unwrap().contains("over gRPC"));
        // The same GPU named twice is one GPU.
        assert!(!plan(&["cuda:0".into(), "cuda:0".into()], 1, 1).nccl);
    }

    #[test]
    fn without_gpus_everything_stays_on_the_cpu() {
        let p = plan(&[], 2, 1);
        assert!(p.experts.iter().chain(&p.attention).all(Option::is_none));
        assert!(!p.nccl);
        assert!(p.flags(&None).is_empty());
        assert_eq!(p.summary(), None);
    }
}
