//! The NVRTC kernel source and its compilation. Compiling needs only NVRTC (no GPU, no driver),
//! so CI checks the source compiles (`scripts/install-nvrtc.sh` fetches NVRTC from PyPI).

use cudarc::nvrtc::{CompileOptions, Ptx};

use super::device_err;
use crate::{Error, Result};

pub const SOURCE: &str = include_str!("../kernels.cu");

/// Every kernel in [`SOURCE`], loaded by name when a device opens.
pub const KERNELS: [&str; 7] = [
    "rms_norm",
    "rope_qk_norm",
    "kv_write",
    "paged_attention",
    "router_topk",
    "swiglu",
    "combine_add",
];

/// NVRTC's `--gpu-architecture` for a compute capability; `None` leaves NVRTC's default PTX
/// target, which the driver compiles for whatever GPU it finds.
pub fn arch(major: i32, minor: i32) -> Option<&'static str> {
    match (major, minor) {
        (8, 0) => Some("compute_80"),
        (8, 6) => Some("compute_86"),
        (8, 9) => Some("compute_89"),
        (9, 0) => Some("compute_90"),
        _ => None,
    }
}

pub fn nvrtc_present() -> bool {
    // SAFETY: only probes for the shared library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles [`SOURCE`] to PTX for `arch` (precise division and square root: the CPU path's
/// results are what the GPU is compared against).
pub fn compile(arch: Option<&'static str>) -> Result<Ptx> {
    if !nvrtc_present() {
        return Err(Error::Device("NVRTC (libnvrtc) not found".into()));
    }
    let opts = CompileOptions {
        arch,
        prec_div: Some(true),
        prec_sqrt: Some(true),
        use_fast_math: Some(false),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts).map_err(|e| device_err("compiling the CUDA kernels", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs NVRTC, not a GPU: `.ci/run` installs it and runs this with `--ignored`.
    #[test]
    #[ignore = "needs NVRTC (scripts/install-nvrtc.sh); .ci/run runs it"]
    fn every_kernel_compiles_for_ampere_and_hopper() {
        for arch in [Some("compute_80"), Some("compute_90"), None] {
            let ptx = compile(arch).unwrap_or_else(|e| panic!("{arch:?}: {e}"));
            let text = ptx.to_src();
            for name in KERNELS {
                assert!(
                    text.contains(&format!(".entry {name}(")),
                    "{arch:?}: no entry point {name} in the PTX"
                );
            }
        }
    }
}
