//! Reading HuggingFace safetensors checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Files are memory-mapped; only the tensors asked for are
//! copied out, so a worker's resident memory follows what it owns.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, Metadata};

use crate::config::DType;
use crate::error::{Error, Result};
use crate::gptq::GptqTensors;
use crate::plan::Want;
use crate::progress::LoadSize;
use crate::weights::{Matrix, MatrixData, bf16_to_f32};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Start of the data section (8-byte length + JSON header).
    data_start: usize,
    metadata: Metadata,
}

/// Where a tensor lives and what it is.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub file: PathBuf,
}

/// An opened checkpoint directory (or single file). Cheap to keep open: nothing is read until a
/// tensor is requested.
pub struct Checkpoint {
    root: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name -> index into `shards`.
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("root", &self.root)
            .field("shards", &self.shards.len())
            .field("tensors", &self.index.len())
            .finish()
    }
}

#[derive(serde::Deserialize)]
struct IndexJson {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Opens a model directory: the index file if present, else `model.safetensors`.
    /// A path to a `.safetensors` file opens just that file.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_file() {
            let shard = open_shard(path)?;
            let index = shard.metadata.offset_keys().into_iter().map(|k| (k, 0)).collect();
            return Ok(Checkpoint {
                root: path.parent().unwrap_or(Path::new(".")).to_owned(),
                shards: vec![shard],
                index,
            });
        }
        let index_path = path.join(INDEX_FILE);
        if index_path.exists() {
            return Self::open_sharded(path, &index_path);
        }
        let single = path.join(SINGLE_FILE);
        if !single.exists() {
            return Err(Error::Checkpoint {
                path: path.to_owned(),
                reason: format!("neither {SINGLE_FILE} nor {INDEX_FILE} found"),
            });
        }
        let shard = open_shard(&single)?;
        let index = shard.metadata.offset_keys().into_iter().map(|k| (k, 0)).collect();
        Ok(Checkpoint {
            root: path.to_owned(),
            shards: vec![shard],
            index,
        })
    }

    fn open_sharded(dir: &Path, index_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index_path)
            .map_err(|e| Error::io(format!("reading {}", index_path.display()), e))?;
        let parsed: IndexJson = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path: index_path.to_owned(),
            reason: format!("invalid index JSON: {e}"),
        })?;
        let mut file_ids: BTreeMap<&str, usize> = BTreeMap::new();
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for (tensor, file) in &parsed.weight_map {
            if file.contains('/') || file.contains("..") {
                return Err(Error::Checkpoint {
                    path: index_path.to_owned(),
                    reason: format!("tensor `{tensor}` maps to `{file}`, which is not a file in this directory"),
                });
            }
            let id = match file_ids.get(file.as_str()) {
                Some(&id) => id,
                None => {
                    let shard = open_shard(&dir.join(file)).map_err(|e| {
                        let listed = parsed.weight_map.values().filter(|f| *f == file).count();
                        Error::Checkpoint {
                            path: dir.join(file),
                            reason: format!(
                                "a shard {INDEX_FILE} lists for `{tensor}` and {} more tensors: {e}",
                                listed - 1
                            ),
                        }
                    })?;
                    shards.push(shard);
                    file_ids.insert(file, shards.len() - 1);
                    shards.len() - 1
                }
            };
            if shards[id].metadata.info(tensor).is_none() {
                return Err(Error::Tensor {
                    tensor: tensor.clone(),
                    file: shards[id].path.clone(),
                    reason: format!("listed in {INDEX_FILE} but absent from the file"),
                });
            }
            index.insert(tensor.clone(), id);
        }
        Ok(Checkpoint {
            root: dir.to_owned(),
            shards,
            index,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn info(&self, name: &str) -> Result<TensorInfo> {
        let shard = self.shard_of(name)?;
        let info = shard.tensor_info(name);
        Ok(TensorInfo {
            dtype: convert_dtype(info.dtype, name, &shard.path)?,
            shape: info.shape.clone(),
            file: shard.path.clone(),
        })
    }

    /// The safetensors dtype of any tensor, as the file names it.
    pub fn stored_dtype(&self, name: &str) -> Result<String> {
        Ok(format!("{:?}", self.shard_of(name)?.tensor_info(name).dtype))
    }

    /// Shape of any tensor, whatever its dtype.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.shard_of(name)?.tensor_info(name).shape.clone())
    }

    fn shard_of(&self, name: &str) -> Result<&Shard> {
        let id = self.index.get(name).ok_or_else(|| Error::Tensor {
            tensor: name.to_owned(),
            file: self.describe_files(),
            reason: "missing from the checkpoint".into(),
        })?;
        Ok(&self.shards[*id])
    }

    /// An error about tensor `name`, naming the file that holds it (or the checkpoint's files
    /// when it holds none).
    pub(crate) fn tensor_error(&self, name: &str, reason: impl Into<String>) -> Error {
        Error::Tensor {
            tensor: name.to_owned(),
            file: self
                .shard_of(name)
                .map_or_else(|_| self.describe_files(), |s| s.path.clone()),
            reason: reason.into(),
        }
    }

    fn describe_files(&self) -> PathBuf {
        match self.shards.as_slice() {
            [one] => one.path.clone(),
            _ => self.root.join(INDEX_FILE),
        }
    }

    /// The header of tensor `name` after checking its shape and dtype; reads no data.
    fn checked(&self, name: &str, shape: &[usize]) -> Result<(&Shard, &safetensors::tensor::TensorInfo, DType)> {
        let shard = self.shard_of(name)?;
        let info = shard.tensor_info(name);
        if info.shape != shape {
            return Err(Error::Tensor {
                tensor: name.to_owned(),
                file: shard.path.clone(),
                reason: format!("shape {:?}, expected {:?}", info.shape, shape),
            });
        }
        let dtype = convert_dtype(info.dtype, name, &shard.path)?;
        Ok((shard, info, dtype))
    }

    /// Raw bytes and dtype of a tensor after checking its shape.
    pub(crate) fn bytes(&self, name: &str, shape: &[usize]) -> Result<(DType, &[u8], &Path)> {
        let (shard, info, dtype) = self.checked(name, shape)?;
        let (start, end) = info.data_offsets;
        let bytes = &shard.mmap[shard.data_start + start..shard.data_start + end];
        Ok((dtype, bytes, &shard.path))
    }

    /// Raw bytes of a tensor stored as exactly `want` (GPTQ's integer and f16 tensors), after
    /// checking its shape.
    fn raw(&self, name: &str, shape: &[usize], want: StDtype) -> Result<&[u8]> {
        let shard = self.shard_of(name)?;
        let info = shard.tensor_info(name);
        let refuse = |reason: String| {
            Err(Error::Tensor {
                tensor: name.to_owned(),
                file: shard.path.clone(),
                reason,
            })
        };
        if info.shape != shape {
            return refuse(format!("shape {:?}, expected {:?}", info.shape, shape));
        }
        if info.dtype != want {
            return refuse(format!("dtype {:?}, expected {want:?}", info.dtype));
        }
        let (start, end) = info.data_offsets;
        Ok(&shard.mmap[shard.data_start + start..shard.data_start + end])
    }

    pub(crate) fn raw_i32(&self, name: &str, shape: &[usize]) -> Result<&[u8]> {
        self.raw(name, shape, StDtype::I32)
    }

    pub(crate) fn raw_f16(&self, name: &str, shape: &[usize]) -> Result<&[u8]> {
        self.raw(name, shape, StDtype::F16)
    }

    /// The GPTQ tensors of the `[rows, cols]` weight `name` when it is stored as GPTQ (no
    /// `name` itself, a `<module>.qweight` instead).
    fn gptq(&self, name: &str, rows: usize, cols: usize) -> Result<Option<GptqTensors>> {
        match GptqTensors::qweight_of(name) {
            Some(q) if !self.contains(name) && self.contains(&q) => {
                GptqTensors::locate(self, name, rows, cols).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Bytes of tensor `name`'s data, from its header.
    pub(crate) fn data_len(&self, name: &str) -> Result<usize> {
        let (start, end) = self.shard_of(name)?.tensor_info(name).data_offsets;
        Ok(end - start)
    }

    /// Checks, from the headers only, that `want` can be loaded as [`Checkpoint::matrix`] or
    /// [`Checkpoint::vector`] would load it: present, shaped as expected, of a supported dtype,
    /// an FP8 weight with its scales beside it. Returns what loading it reads.
    pub fn check(&self, want: &Want) -> Result<LoadSize> {
        if let &[rows, cols] = want.shape.as_slice()
            && let Some(gptq) = self.gptq(&want.name, rows, cols)?
        {
            return gptq.size(self);
        }
        let (_, info, dtype) = self.checked(&want.name, &want.shape)?;
        let own = LoadSize::tensor(info.data_offsets.1 - info.data_offsets.0);
        match (dtype, want.shape.as_slice()) {
            (DType::F8E4M3, &[rows, cols]) => {
                Ok(own + crate::quant::Fp8Tensors::locate(self, &want.name, rows, cols)?.size(self)?)
            }
            (DType::F8E4M3, _) => {
                Err(self.tensor_error(&want.name, "stored as F8_E4M3, but only 2-D weights may be FP8"))
            }
            _ => Ok(own),
        }
    }

    /// A `[rows, cols]` matrix kept in its stored dtype; an FP8 one with its scale (see
    /// [`crate::quant`]), still one byte per weight; a GPTQ one dequantised to f16 (see
    /// [`crate::gptq`]).
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        if let Some(gptq) = self.gptq(name, rows, cols)? {
            let data = MatrixData::F16(gptq.dequantize(self, rows, cols)?);
            return Ok(Matrix { rows, cols, data });
        }
        let (dtype, bytes, _) = self.bytes(name, &[rows, cols])?;
        let data = match dtype {
            DType::F32 => MatrixData::F32(self.copy_evicting(name, bytes, f32::from_le_bytes)),
            DType::BF16 => MatrixData::BF16(self.copy_evicting(name, bytes, u16::from_le_bytes)),
            DType::F16 => MatrixData::F16(self.copy_evicting(name, bytes, u16::from_le_bytes)),
            DType::F8E4M3 => {
                let fp8 = crate::quant::load_fp8(self, name, rows, cols, bytes)?;
                self.evict(name);
                MatrixData::F8E4M3(Box::new(fp8))
            }
        };
        Ok(Matrix { rows, cols, data })
    }

    /// Takes the pages of tensor `name`, already copied out, off this process's resident memory.
    /// The file is mapped read-only and never written, so its pages stay in the OS page cache
    /// and a later read faults the same bytes back in; without this a worker's resident size
    /// would count every weight twice (its copy and the mapped file pages it read), not the
    /// weights it holds. Best effort: where the advice is refused nothing changes.
    pub(crate) fn evict(&self, name: &str) {
        let Ok(shard) = self.shard_of(name) else {
            return;
        };
        let (start, end) = shard.tensor_info(name).data_offsets;
        shard.evict(shard.data_start + start, end - start);
    }

    /// Copies tensor `name`'s bytes (`bytes`, its slice of the map) out element by element (`N` bytes each, through `convert`), in
    /// chunks whose mapped pages leave resident memory as soon as they are copied ([`evict`]
    /// at chunk granularity): loading an f32, bf16 or f16 tensor never holds it twice, so the
    /// peak stays at the weights held plus one chunk, not plus the largest tensor (a
    /// 128k-vocabulary embedding is 262 MB in bf16). FP8 and GPTQ tensors are still advised
    /// away whole, once converted.
    ///
    /// [`evict`]: Checkpoint::evict
    fn copy_evicting<T, const N: usize>(&self, name: &str, bytes: &[u8], convert: impl Fn([u8; N]) -> T) -> Vec<T> {
        let shard = self.shard_of(name).ok();
        let mut out = Vec::with_capacity(bytes.len() / N);
        for chunk in bytes.chunks(COPY_CHUNK_BYTES) {
            out.extend(
                chunk
                    .chunks_exact(N)
                    .map(|c| convert(c.try_into().expect("chunks_exact yields N bytes"))),
            );
            if let Some(shard) = shard {
                shard.evict(chunk.as_ptr() as usize - shard.mmap.as_ptr() as usize, chunk.len());
            }
        }
        out
    }

    /// A matrix widened to f32 whatever its stored dtype (the router, which computes in f32).
    pub fn matrix_f32(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        Ok(Matrix::from_f32(rows, cols, self.f32_tensor(name, &[rows, cols])?))
    }

    /// A vector widened to f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.f32_tensor(name, &[len])
    }

    /// Any tensor of the expected shape, widened to f32 (an FP8 matrix dequantised).
    pub fn f32_tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (dtype, bytes, _) = self.bytes(name, shape)?;
        let out = match dtype {
            DType::F8E4M3 => {
                let &[rows, cols] = shape else {
                    return Err(self.tensor_error(name, "stored as F8_E4M3, but only 2-D weights may be FP8"));
                };
                let mut out = vec![0.0; rows * cols];
                self.matrix(name, rows, cols)?.rows_to_f32(0, rows, &mut out);
                out
            }
            DType::F32 => self.copy_evicting(name, bytes, f32::from_le_bytes),
            DType::BF16 => self.copy_evicting(name, bytes, |b| bf16_to_f32(u16::from_le_bytes(b))),
            DType::F16 => self.copy_evicting(name, bytes, |b| half::f16::from_bits(u16::from_le_bytes(b)).to_f32()),
        };
        Ok(out)
    }
}

/// Reads an integer tensor (i64 or i32) as i64; used for fixture files.
pub fn read_i64(ckpt: &Checkpoint, name: &str) -> Result<(Vec<i64>, Vec<usize>)> {
    let shard = ckpt.shard_of(name)?;
    let info = shard.tensor_info(name);
    let (start, end) = info.data_offsets;
    let bytes = &shard.mmap[shard.data_start + start..shard.data_start + end];
    let values = match info.dtype {
        StDtype::I64 => bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        StDtype::I32 => bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
            .collect(),
        other => {
            return Err(Error::Tensor {
                tensor: name.to_owned(),
                file: shard.path.clone(),
                reason: format!("dtype {other:?}, expected an integer tensor"),
            });
        }
    };
    Ok((values, info.shape.clone()))
}

impl Shard {
    /// Callers have checked that `name` is in this shard (through `Checkpoint::index`).
    fn tensor_info(&self, name: &str) -> &safetensors::tensor::TensorInfo {
        self.metadata.info(name).expect("tensor indexed in this shard")
    }

    /// Takes the mapped pages of `len` bytes from `offset` (from the start of the map) off this process's
    /// resident memory; see [`Checkpoint::evict`]. Best effort: where the advice is refused
    /// nothing changes.
    fn evict(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        // memmap2 widens the range to whole pages; a page shared with a neighbouring tensor or
        // chunk is harmless to drop too (it is read back on demand).
        // SAFETY: MADV_DONTNEED on clean pages of a read-only file mapping (memmap2 maps it
        // shared, PROT_READ; nothing writes it) only drops page-table entries; the next access
        // reads the file's unchanged bytes again, so borrowed slices of the map keep their
        // contents.
        let _ = unsafe {
            self.mmap
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
        };
    }
}

/// Bytes of a tensor copied between two evictions of its mapped pages (see
/// `Checkpoint::copy_evicting`): small beside any worker's weights, large enough that the
/// advice costs nothing measurable.
const COPY_CHUNK_BYTES: usize = 16 << 20;

// Whole elements per chunk (2 and 4 bytes), or `chunks_exact` would drop a chunk's tail.
const _: () = assert!(COPY_CHUNK_BYTES.is_multiple_of(4));

fn open_shard(path: &Path) -> Result<Shard> {
    let file = File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    // SAFETY: the mapping is read-only and checkpoints are not modified while a worker runs;
    // a concurrent truncation would be a deployment error, as with every mmap-based loader.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(format!("mapping {}", path.display()), e))?;
    // read_metadata checks that the header parses and that the data section is exactly as long
    // as the header says, which catches truncated downloads before any tensor is used.
    let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| Error::Checkpoint {
        path: path.to_owned(),
        reason: format!("not a valid safetensors file ({e}); truncated or corrupt?"),
    })?;
    Ok(Shard {
        path: path.to_owned(),
        mmap,
        data_start: 8 + header_len,
        metadata,
    })
}

fn convert_dtype(dtype: StDtype, name: &str, file: &Path) -> Result<DType> {
    let refuse = |reason: String| {
        Err(Error::Tensor {
            tensor: name.to_owned(),
            file: file.to_owned(),
            reason,
        })
    };
    match dtype {
        StDtype::F32 => Ok(DType::F32),
        StDtype::BF16 => Ok(DType::BF16),
        StDtype::F16 => Ok(DType::F16),
        StDtype::F8_E4M3 => Ok(DType::F8E4M3),
        // Same byte size, other formats: reading them as e4m3fn would be silently wrong.
        other @ (StDtype::F8_E5M2 | StDtype::F8_E4M3FNUZ | StDtype::F8_E5M2FNUZ | StDtype::F8_E8M0) => refuse(format!(
            "dtype {other:?} is not supported: FP8 weights must be F8_E4M3 (float8_e4m3fn)"
        )),
        other => refuse(format!("dtype {other:?} is not supported (f32, bf16, f16 or F8_E4M3)")),
    }
}

pub(crate) fn le_u16(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes(c.try_into().unwrap()))
        .collect()
}
