//! Choices made when a GPU opens, as pure functions of what it reports (tested without one):
//! what to compile the kernels to, and whether its cuBLAS can run the grouped expert GEMM.

/// What NVRTC compiles the kernels to for one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelTarget {
    /// Machine code for `sm_N` (N = 10 x major + minor): nothing is left for the driver to
    /// compile, so a driver older than NVRTC cannot refuse it.
    Cubin(i32),
    /// PTX for `compute_N`, compiled by the driver at load time (it refuses a PTX version newer
    /// than itself); `None` is NVRTC's default virtual architecture.
    Ptx(Option<i32>),
}

impl KernelTarget {
    /// NVRTC's `--gpu-architecture` value.
    pub fn nvrtc_arch(&self) -> Option<String> {
        match self {
            KernelTarget::Cubin(n) => Some(format!("sm_{n}")),
            KernelTarget::Ptx(Some(n)) => Some(format!("compute_{n}")),
            KernelTarget::Ptx(None) => None,
        }
    }
}

/// The targets to try, best first, for a device of compute capability `(major, minor)` and an
/// NVRTC that supports `supported` (its `nvrtcGetSupportedArchs`, e.g. `[75, 80, 86, 89, 90]`):
/// a CUBIN for the device's own architecture when NVRTC knows it, then PTX for the newest
/// architecture NVRTC knows that the device can run, then NVRTC's default PTX.
pub fn kernel_targets(device: (i32, i32), supported: &[i32]) -> Vec<KernelTarget> {
    let own = device.0 * 10 + device.1;
    let mut targets = Vec::with_capacity(3);
    if supported.contains(&own) {
        targets.push(KernelTarget::Cubin(own));
    }
    if let Some(&newest) = supported.iter().filter(|&&a| a <= own).max() {
        targets.push(KernelTarget::Ptx(Some(newest)));
    }
    targets.push(KernelTarget::Ptx(None));
    targets
}

/// The grouped GEMM the experts use (`cublasGemmGroupedBatchedEx`) came with cuBLAS 12.5.
pub const GROUPED_GEMM_SINCE: (i32, i32) = (12, 5);

/// Refuses a cuBLAS that cannot run the grouped expert GEMM, before anything calls it (a
/// missing symbol would otherwise abort the process from inside cudarc).
pub fn check_cublas(version: (i32, i32, i32), has_grouped_gemm: bool) -> Result<(), String> {
    let (major, minor, patch) = version;
    if (major, minor) < GROUPED_GEMM_SINCE || !has_grouped_gemm {
        return Err(format!(
            "cuBLAS {major}.{minor}.{patch} found; the expert products need cuBLAS {}.{} or newer \
             (cublasGemmGroupedBatchedEx): install a newer CUDA toolkit or use --device cpu",
            GROUPED_GEMM_SINCE.0, GROUPED_GEMM_SINCE.1
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_nvrtc_knows_gets_its_own_cubin_first() {
        let nvrtc = [75, 80, 86, 89, 90, 100];
        assert_eq!(
            kernel_targets((9, 0), &nvrtc),
            [
                KernelTarget::Cubin(90),
                KernelTarget::Ptx(Some(90)),
                KernelTarget::Ptx(None)
            ]
        );
        assert_eq!(KernelTarget::Cubin(90).nvrtc_arch().as_deref(), Some("sm_90"));
        assert_eq!(KernelTarget::Ptx(Some(86)).nvrtc_arch().as_deref(), Some("compute_86"));
        assert_eq!(KernelTarget::Ptx(None).nvrtc_arch(), None);
    }

    #[test]
    fn a_device_newer_than_nvrtc_gets_the_newest_ptx_it_can_run() {
        // An sm_120 card with an NVRTC that stops at sm_90: PTX for compute_90, which the
        // driver compiles for the card.
        assert_eq!(
            kernel_targets((12, 0), &[80, 86, 90]),
            [KernelTarget::Ptx(Some(90)), KernelTarget::Ptx(None)]
        );
        // An architecture between NVRTC's (8.7): no CUBIN, PTX for compute_86.
        assert_eq!(
            kernel_targets((8, 7), &[80, 86, 90]),
            [KernelTarget::Ptx(Some(86)), KernelTarget::Ptx(None)]
        );
        // Older than anything NVRTC supports: only the default is left to try.
        assert_eq!(kernel_targets((6, 1), &[75, 80]), [KernelTarget::Ptx(None)]);
    }

    #[test]
    fn cublas_older_than_12_5_or_without_the_grouped_gemm_is_refused_by_name() {
        assert_eq!(check_cublas((12, 5, 0), true), Ok(()));
        assert_eq!(check_cublas((13, 0, 1), true), Ok(()));
        let old = check_cublas((12, 4, 5), true).unwrap_err();
        assert!(
            old.contains("12.4.5") && old.contains("12.5") && old.contains("cublasGemmGroupedBatchedEx"),
            "{old}"
        );
        assert!(check_cublas((12, 8, 0), false).is_err());
    }
}
