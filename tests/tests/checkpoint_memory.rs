//! A weight copied out of a checkpoint is resident once: the mapped file pages it was read from
//! leave this process's resident memory (the loader advises them away chunk by chunk as it
//! copies), so a worker's resident size follows the weights it holds, not twice them, and even
//! its peak while loading stays at the copy plus one chunk. Its own test binary, one test:
//! nothing else allocates while it measures.

#![cfg(target_os = "linux")]

use moe_model::checkpoint::Checkpoint;
use moe_runtime::memory::{ProcessMemory, reset_peak};
use safetensors::tensor::{Dtype, TensorView};

/// 64 MiB of f32: far above the allocator's and the test harness's own noise.
const ROWS: usize = 4096;
const COLS: usize = 4096;

#[test]
fn a_loaded_matrix_is_resident_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    {
        let data: Vec<u8> = (0..ROWS * COLS).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let view = TensorView::new(Dtype::F32, vec![ROWS, COLS], &data).unwrap();
        safetensors::serialize_to_file([("w", view)], None, &path).unwrap();
    } // the file's bytes are in the page cache now, not in this process
    let ckpt = Checkpoint::open(&path).unwrap();
    reset_peak();
    let before = ProcessMemory::read();
    // The peak starts afresh here, or the peak check below would measure nothing.
    assert!(
        before.peak_resident_bytes < before.resident_bytes + (8 << 20),
        "the peak did not reset: {before:?}"
    );
    let w = ckpt.matrix("w", ROWS, COLS).unwrap();
    let after = ProcessMemory::read();
    let grown = after.resident_bytes.saturating_sub(before.resident_bytes);
    let peak_grown = after.peak_resident_bytes.saturating_sub(before.resident_bytes);
    let bytes = (ROWS * COLS * 4) as u64;
    // The copy (64 MiB) and not the mapped pages it was read from (another 64 MiB).
    assert!(
        grown >= bytes * 9 / 10 && grown < bytes * 3 / 2,
        "resident grew by {grown} bytes loading a {bytes}-byte matrix"
    );
    // Nor at any moment while loading: the copy plus one 16 MiB chunk of mapped pages (up to
    // 128 MiB when a tensor's pages are advised away only once it is all copied).
    assert!(
        peak_grown < bytes * 3 / 2,
        "the peak grew by {peak_grown} bytes loading a {bytes}-byte matrix"
    );
    // The copy is intact (and reading the evicted map again gives the same bytes).
    let mut row = vec![0.0; COLS];
    w.row_to_f32(ROWS - 1, &mut row);
    assert_eq!(row[COLS - 1], (ROWS * COLS - 1) as f32);
    let again = ckpt.matrix("w", ROWS, COLS).unwrap();
    let mut row_again = vec![0.0; COLS];
    again.row_to_f32(ROWS - 1, &mut row_again);
    assert_eq!(row, row_again);
}
