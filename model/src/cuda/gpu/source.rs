//! The NVRTC kernel source and its compilation. Compiling needs only NVRTC (no GPU, no driver),
//! so CI checks the source compiles (`scripts/install-nvrtc.sh` fetches NVRTC from PyPI).

use std::ffi::CString;

use cudarc::nvrtc::{Ptx, result, sys};

use crate::cuda::target::KernelTarget;

use super::device_err;
use crate::{Error, Result};

pub const SOURCE: &str = include_str!("../kernels.cu");

/// Every kernel in [`SOURCE`], loaded by name when a device opens.
pub const KERNELS: [&str; 8] = [
    "rms_norm",
    "rope_qk_norm",
    "kv_write",
    "paged_attention",
    "router_topk",
    "swiglu",
    "combine_rows",
    "fp8_e4m3_to_bf16",
];

pub fn nvrtc_present() -> bool {
    // SAFETY: only probes for the shared library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The architectures this NVRTC compiles for (`nvrtcGetSupportedArchs`, e.g. 75, 80, 90).
pub fn supported_archs() -> Result<Vec<i32>> {
    if !nvrtc_present() {
        return Err(Error::Device("NVRTC (libnvrtc) not found".into()));
    }
    // Before 11.2 NVRTC cannot list its architectures; cudarc would abort on the missing symbol.
    // SAFETY: only looks the symbol up in the loaded library.
    if unsafe { sys::culib().get::<*const ()>(b"nvrtcGetNumSupportedArchs") }.is_err() {
        return Err(Error::Device(
            "NVRTC is older than 11.2 (no nvrtcGetSupportedArchs): install a newer CUDA toolkit".into(),
        ));
    }
    let mut n = 0;
    // SAFETY: valid out pointer.
    unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) }
        .result()
        .map_err(|e| device_err("asking NVRTC for its architectures", e))?;
    let mut archs = vec![0i32; n.max(0) as usize];
    // SAFETY: `archs` holds the `n` entries NVRTC writes.
    unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
        .result()
        .map_err(|e| device_err("asking NVRTC for its architectures", e))?;
    Ok(archs)
}

/// NVRTC's options: precise division and square root, since the CPU path's results are what
/// the GPU is compared against.
fn options(target: KernelTarget) -> Vec<String> {
    let mut o = vec!["--prec-sqrt=true".to_owned(), "--prec-div=true".to_owned()];
    o.extend(target.nvrtc_arch().map(|a| format!("--gpu-architecture={a}")));
    o
}

/// Compiles [`SOURCE`] for `target`: a CUBIN the driver loads as it is, or PTX it compiles.
pub fn compile(target: KernelTarget) -> Result<Ptx> {
    let image = compile_image(target)?;
    Ok(match target {
        KernelTarget::Cubin(_) => Ptx::from_binary(image),
        KernelTarget::Ptx(_) => Ptx::from_src(String::from_utf8_lossy(&image)),
    })
}

/// The compiled image: the CUBIN's bytes, or the PTX text.
fn compile_image(target: KernelTarget) -> Result<Vec<u8>> {
    if !nvrtc_present() {
        return Err(Error::Device("NVRTC (libnvrtc) not found".into()));
    }
    let source = CString::new(SOURCE).expect("the kernel source has no NUL");
    let prog = result::create_program(&source, None).map_err(|e| device_err("creating the NVRTC program", e))?;
    let image = build(prog, target);
    // SAFETY: `prog` was created above and is destroyed once.
    let _ = unsafe { result::destroy_program(prog) };
    image
}

/// NUL-terminated C characters as bytes, without the terminator.
fn c_bytes(chars: Vec<std::ffi::c_char>) -> Vec<u8> {
    chars.into_iter().take_while(|&c| c != 0).map(|c| c as u8).collect()
}

/// Compiles `prog` and takes its CUBIN or PTX out.
fn build(prog: sys::nvrtcProgram, target: KernelTarget) -> Result<Vec<u8>> {
    let arch = target.nvrtc_arch();
    let what = format!(
        "compiling the CUDA kernels for {}",
        arch.as_deref().unwrap_or("NVRTC's default")
    );
    // SAFETY: `prog` is a live program (created by the caller, destroyed after this returns).
    if let Err(e) = unsafe { result::compile_program(prog, &options(target)) } {
        // SAFETY: as above.
        let log = c_bytes(unsafe { result::get_program_log(prog) }.unwrap_or_default());
        return Err(Error::Device(format!(
            "{what}: {e:?}: {}",
            String::from_utf8_lossy(&log)
        )));
    }
    match target {
        KernelTarget::Cubin(_) => {
            let mut size = 0usize;
            // SAFETY: compiled above; valid out pointer.
            unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
                .result()
                .map_err(|e| device_err(&what, e))?;
            let mut cubin = vec![0u8; size];
            // SAFETY: `cubin` holds the `size` bytes NVRTC writes.
            unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()) }
                .result()
                .map_err(|e| device_err(&what, e))?;
            Ok(cubin)
        }
        // SAFETY: compiled above.
        KernelTarget::Ptx(_) => Ok(c_bytes(
            unsafe { result::get_ptx(prog) }.map_err(|e| device_err(&what, e))?,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_widening_kernel_uses_the_hosts_block_side() {
        // The kernel hard-codes the block side of block-wise scales; it must be fp8::BLOCK.
        let define = format!("#define FP8_BLOCK {}u", crate::fp8::BLOCK);
        assert!(SOURCE.contains(&define), "kernels.cu lacks `{define}`");
    }

    /// Needs NVRTC, not a GPU: `.ci/run` installs it and runs this with `--ignored`.
    #[test]
    #[ignore = "needs NVRTC (scripts/install-nvrtc.sh); .ci/run runs it"]
    fn every_kernel_compiles_to_ptx_and_to_cubin_for_ampere_and_hopper() {
        let archs = supported_archs().unwrap();
        assert!(archs.contains(&80) && archs.contains(&90), "{archs:?}");
        for target in [
            KernelTarget::Ptx(Some(80)),
            KernelTarget::Ptx(Some(90)),
            KernelTarget::Ptx(None),
        ] {
            let text = compile(target).unwrap_or_else(|e| panic!("{target:?}: {e}")).to_src();
            for name in KERNELS {
                assert!(
                    text.contains(&format!(".entry {name}(")),
                    "{target:?}: no entry point {name} in the PTX"
                );
            }
        }
        for target in [KernelTarget::Cubin(80), KernelTarget::Cubin(90)] {
            let cubin = compile_image(target).unwrap_or_else(|e| panic!("{target:?}: {e}"));
            assert_eq!(&cubin[..4], b"\x7fELF", "{target:?}: a CUBIN is an ELF image");
            for name in KERNELS {
                let found = cubin.windows(name.len()).any(|w| w == name.as_bytes());
                assert!(found, "{target:?}: no symbol {name} in the CUBIN");
            }
        }
    }
}
