//! The NCCL communicator between two GPUs: rank 0 makes the unique id, both ranks join, then
//! exchange buffers the way the data plane does (the attention side sends, then receives; the
//! expert side receives, then sends: each direction a group of its own on both sides, which
//! NCCL's lazy connection set-up needs), and an exchange whose peer never comes is
//! aborted at its deadline instead of hanging. Needs two NVIDIA GPUs, NCCL (`libnccl.so`) and
//! a build with the `cuda` feature
//! (`cargo test -p moe-tests --features cuda --test gpu_nccl -- --ignored`); elsewhere it is
//! reported as ignored, never as passed. NCCL refuses two ranks on one GPU, so a one-GPU host
//! cannot run it either.

#[test]
#[ignore = "needs two NVIDIA GPUs, NCCL and --features cuda"]
fn two_ranks_join_through_a_unique_id_exchange_rows_and_abort_on_a_missing_peer() {
    #[cfg(feature = "cuda")]
    {
        use std::time::Duration;

        use moe_model::cuda::NcclComm;
        use moe_model::device::Device;

        const LONG: Duration = Duration::from_secs(60);
        // Small integers are exact in bf16, the dtype on the wire.
        let values = |rank: usize| -> Vec<f32> { (0..1000).map(|i| ((rank * 7 + i) % 256) as f32).collect() };
        let id = NcclComm::unique_id().expect("NCCL present");
        // Rank 1 keeps its communicator until rank 0 has seen its receive time out (dropping
        // it would abort it, and rank 0 could see that instead of its own deadline).
        let done = std::sync::Arc::new(std::sync::Barrier::new(2));
        let ranks: Vec<_> = (0..2usize)
            .map(|rank| {
                let id = id.clone();
                let done = done.clone();
                std::thread::spawn(move || {
                    let Ok(Device::Cuda(gpu)) = Device::open(&format!("cuda:{rank}")) else {
                        panic!("GPU {rank} is needed");
                    };
                    let comm = NcclComm::join(&gpu, rank, 2, &id, LONG).expect("joining");
                    assert_eq!((comm.rank(), comm.world_size()), (rank, 2));
                    let peer = 1 - rank;
                    let mine = values(rank);
                    let got = if rank == 0 {
                        comm.exchange(&[(peer, &mine)], &[(peer, 1000)], LONG)
                            .unwrap()
                            .remove(0)
                    } else {
                        let got = comm.exchange(&[], &[(peer, 1000)], LONG).unwrap().remove(0);
                        comm.exchange(&[(peer, &mine)], &[], LONG).unwrap();
                        got
                    };
                    if rank == 0 {
                        // Rank 1 sends nothing more: the receive must end at its deadline.
                        let err = comm
                            .exchange(&[], &[(peer, 10)], Duration::from_millis(500))
                            .expect_err("nobody sends")
                            .to_string();
                        assert!(err.contains("did not complete in time"), "{err}");
                        assert!(comm.aborted().is_some());
                        let refused = comm.exchange(&[(peer, &mine)], &[], LONG).expect_err("aborted");
                        assert!(refused.to_string().contains("aborted"), "{refused}");
                    }
                    done.wait();
                    got
                })
            })
            .collect();
        let got: Vec<Vec<f32>> = ranks.into_iter().map(|t| t.join().unwrap()).collect();
        for (rank, received) in got.iter().enumerate() {
            let peer = 1 - rank;
            assert_eq!(received, &values(peer), "rank {rank} received rank {peer}'s buffer");
        }
    }
    #[cfg(not(feature = "cuda"))]
    panic!("built without --features cuda: nothing to test");
}
