//! Paged KV cache: fixed-size blocks from a preallocated pool, a block table per sequence.
//!
//! Keys are stored after RoPE and **before** QK-norm, values raw. That is what makes CLA's
//! saving real: one cache slot serves every layer of a CLA group, and each layer applies its own
//! key norm as it reads (see `attention`). Without CLA each layer has its own slot.

use std::collections::HashMap;

use crate::config::ModelConfig;
use crate::error::{Error, Result};

pub type SeqId = u64;

/// Capacity of a cache: `num_blocks` blocks of `block_size` token positions each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheConfig {
    pub block_size: usize,
    pub num_blocks: usize,
}

impl KvCacheConfig {
    /// Enough blocks for `tokens` positions.
    pub fn for_tokens(tokens: usize, block_size: usize) -> Self {
        KvCacheConfig {
            block_size,
            num_blocks: tokens.div_ceil(block_size),
        }
    }
}

#[derive(Debug, Default)]
struct SeqState {
    blocks: Vec<u32>,
    len: usize,
}

pub struct KvCache {
    block_size: usize,
    num_blocks: usize,
    kv_dim: usize,
    /// Per cache slot: `[num_blocks, block_size, kv_dim]` for K and for V.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    free: Vec<u32>,
    seqs: HashMap<SeqId, SeqState>,
}

impl KvCache {
    pub fn new(model: &ModelConfig, config: KvCacheConfig) -> Result<Self> {
        if config.block_size == 0 || config.num_blocks == 0 {
            return Err(Error::InvalidInput(format!(
                "KV cache needs a positive block size and block count, got {config:?}"
            )));
        }
        let kv_dim = model.kv_dim();
        let slot_len = config.num_blocks * config.block_size * kv_dim;
        let slots = model.num_kv_cache_slots();
        Ok(KvCache {
            block_size: config.block_size,
            num_blocks: config.num_blocks,
            kv_dim,
            keys: (0..slots).map(|_| vec![0.0; slot_len]).collect(),
            values: (0..slots).map(|_| vec![0.0; slot_len]).collect(),
            free: (0..config.num_blocks as u32).rev().collect(),
            seqs: HashMap::new(),
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn num_slots(&self) -> usize {
        self.keys.len()
    }

    /// Bytes held by the pool (K and V, all slots).
    pub fn size_in_bytes(&self) -> usize {
        2 * self.keys.iter().map(|k| k.len() * 4).sum::<usize>()
    }

    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// Cached positions of `seq` (0 for an unknown sequence).
    pub fn seq_len(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.len)
    }

    pub fn blocks_needed(&self, seq: SeqId, new_len: usize) -> usize {
        let have = self.seqs.get(&seq).map_or(0, |s| s.blocks.len());
        new_len.div_ceil(self.block_size).saturating_sub(have)
    }

    /// Grows `seq` to `new_len` positions, taking blocks from the pool. All or nothing: on a
    /// full pool nothing is taken.
    pub fn reserve(&mut self, seq: SeqId, new_len: usize) -> Result<()> {
        let needed = self.blocks_needed(seq, new_len);
        if needed > self.free.len() {
            return Err(Error::KvCacheFull {
                seq,
                needed,
                free: self.free.len(),
            });
        }
        let state = self.seqs.entry(seq).or_default();
        for _ in 0..needed {
            state.blocks.push(self.free.pop().expect("checked above"));
        }
        state.len = state.len.max(new_len);
        Ok(())
    }

    /// Shrinks `seq` back to `len` positions (undoing a reservation), freeing whole blocks.
    pub fn truncate(&mut self, seq: SeqId, len: usize) {
        let block_size = self.block_size;
        if let Some(state) = self.seqs.get_mut(&seq) {
            let keep = len.div_ceil(block_size);
            while state.blocks.len() > keep {
                self.free.push(state.blocks.pop().expect("len checked"));
            }
            state.len = state.len.min(len);
        }
    }

    /// The block ids of `seq`, in position order (empty for an unknown sequence): what a
    /// device-side cache with the same layout is addressed by.
    pub fn block_table(&self, seq: SeqId) -> &[u32] {
        self.seqs.get(&seq).map_or(&[], |s| s.blocks.as_slice())
    }

    /// Returns the blocks of `seq` to the pool.
    pub fn release(&mut self, seq: SeqId) {
        if let Some(state) = self.seqs.remove(&seq) {
            self.free.extend(state.blocks);
        }
    }

    fn offset(&self, seq: &SeqState, pos: usize) -> usize {
        let block = seq.blocks[pos / self.block_size] as usize;
        (block * self.block_size + pos % self.block_size) * self.kv_dim
    }

    /// Writes K (post-RoPE, pre-norm) and V rows for consecutive positions starting at `start`.
    /// The positions must have been reserved.
    pub fn write(&mut self, slot: usize, seq: SeqId, start: usize, keys: &[f32], values: &[f32]) {
        let d = self.kv_dim;
        let state = &self.seqs[&seq];
        let n = keys.len() / d;
        assert!(start + n <= state.len, "KV write past the reserved length");
        for i in 0..n {
            let off = self.offset(state, start + i);
            self.keys[slot][off..off + d].copy_from_slice(&keys[i * d..(i + 1) * d]);
            self.values[slot][off..off + d].copy_from_slice(&values[i * d..(i + 1) * d]);
        }
    }

    /// Copies positions `0..len` of `seq` into contiguous `[len, kv_dim]` buffers.
    pub fn gather(&self, slot: usize, seq: SeqId, len: usize, keys: &mut Vec<f32>, values: &mut Vec<f32>) {
        let d = self.kv_dim;
        let state = &self.seqs[&seq];
        assert!(len <= state.len, "KV read past the reserved length");
        keys.clear();
        values.clear();
        let mut pos = 0;
        for &block in &state.blocks {
            if pos >= len {
                break;
            }
            let take = self.block_size.min(len - pos);
            let off = block as usize * self.block_size * d;
            keys.extend_from_slice(&self.keys[slot][off..off + take * d]);
            values.extend_from_slice(&self.values[slot][off..off + take * d]);
            pos += take;
        }
    }
}
