//! Where expert products run: the CPU (always) or an NVIDIA GPU (builds with the `cuda` feature;
//! the CUDA libraries are loaded at run time, so such a build still starts on machines without
//! them and says why it cannot use the GPU). Call sites pass a [`Device`] around and never
//! branch on the feature.

use crate::cuda::CudaDevice;
use crate::{Error, Result};

#[derive(Clone)]
pub enum Device {
    Cpu,
    Cuda(CudaDevice),
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(d) => write!(f, "cuda:{}", d.ordinal()),
        }
    }
}

impl Device {
    /// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`. Opening a GPU fails with a clear error when this
    /// build has no CUDA support, the CUDA driver is missing, or there is no such device.
    pub fn open(spec: &str) -> Result<Device> {
        match spec {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(CudaDevice::open(0)?)),
            _ => {
                let ordinal = spec
                    .strip_prefix("cuda:")
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| Error::InvalidInput(format!("device `{spec}`: use cpu, cuda or cuda:N")))?;
                Ok(Device::Cuda(CudaDevice::open(ordinal)?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_opens_and_nonsense_is_refused_by_name() {
        assert!(matches!(Device::open("cpu").unwrap(), Device::Cpu));
        for bad in ["gpu", "cuda:", "cuda:x", "CUDA:0"] {
            let err = Device::open(bad).expect_err(bad).to_string();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn a_gpu_that_is_not_there_is_a_clear_error_not_a_panic() {
        // Runs everywhere: on a machine without an NVIDIA driver (or a build without the `cuda`
        // feature) this must be an error that says so. With a GPU, cuda:4096 does not exist.
        let err = Device::open("cuda:4096")
            .expect_err("no machine has 4097 GPUs")
            .to_string();
        eprintln!("cuda:4096 -> {err}");
        assert!(
            err.contains("--features cuda") || err.contains("libcuda") || err.contains("4096"),
            "{err}"
        );
    }
}
