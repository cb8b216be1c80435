//! The NCCL communicator between two GPUs: rank 0 makes the unique id, both ranks join, then
//! exchange buffers with grouped sends and receives. Needs two NVIDIA GPUs, NCCL
//! (`libnccl.so`) and a build with the `cuda` feature
//! (`cargo test -p moe-tests --features cuda --test gpu_nccl -- --ignored`); elsewhere it is
//! reported as ignored, never as passed. NCCL refuses two ranks on one GPU, so a one-GPU host
//! cannot run it either.

#[test]
#[ignore = "needs two NVIDIA GPUs, NCCL and --features cuda"]
fn two_ranks_join_through_a_unique_id_and_exchange_rows() {
    #[cfg(feature = "cuda")]
    {
        use moe_model::cuda::NcclComm;
        use moe_model::device::Device;

        let id = NcclComm::unique_id().expect("NCCL present");
        let ranks: Vec<_> = (0..2usize)
            .map(|rank| {
                let id = id.clone();
                std::thread::spawn(move || {
                    let Ok(Device::Cuda(gpu)) = Device::open(&format!("cuda:{rank}")) else {
                        panic!("GPU {rank} is needed");
                    };
                    let comm = NcclComm::join(&gpu, rank, 2, &id).expect("joining");
                    assert_eq!((comm.rank(), comm.world_size()), (rank, 2));
                    let peer = 1 - rank;
                    let mine: Vec<f32> = (0..1000).map(|i| (rank * 10_000 + i) as f32).collect();
                    // Rank 0 sends first then receives, rank 1 the other way round, as the
                    // attention and expert workers of the data plane do.
                    if rank == 0 {
                        comm.send_all(&[(peer, &mine)]).unwrap();
                        comm.recv_all(&[(peer, 1000)]).unwrap().remove(0)
                    } else {
                        let got = comm.recv_all(&[(peer, 1000)]).unwrap().remove(0);
                        comm.send_all(&[(peer, &mine)]).unwrap();
                        got
                    }
                })
            })
            .collect();
        let got: Vec<Vec<f32>> = ranks.into_iter().map(|t| t.join().unwrap()).collect();
        for (rank, values) in got.iter().enumerate() {
            let peer = 1 - rank;
            let want: Vec<f32> = (0..1000).map(|i| (peer * 10_000 + i) as f32).collect();
            assert_eq!(values, &want, "rank {rank} received rank {peer}'s buffer");
        }
    }
    #[cfg(not(feature = "cuda"))]
    panic!("built without --features cuda: nothing to test");
}
