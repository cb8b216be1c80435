//! This process's memory as the kernel counts it (Linux `/proc/self/status`): what machines are
//! sized by, reported beside the bytes of weights a worker holds so the overhead can be read.

/// Resident memory of this process, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessMemory {
    /// `VmRSS`: resident now.
    pub resident_bytes: u64,
    /// `VmHWM`: the largest resident size since the process started.
    pub peak_resident_bytes: u64,
}

impl ProcessMemory {
    /// Reads this process's figures; zeros where `/proc/self/status` does not exist (not Linux).
    pub fn read() -> Self {
        std::fs::read_to_string("/proc/self/status")
            .map(|text| parse_status(&text))
            .unwrap_or_default()
    }
}

/// Starts this process's peak (`VmHWM`) afresh from its resident size now (Linux: `5` written to
/// `/proc/self/clear_refs`), so a large buffer already freed (a bandwidth probe) is not reported
/// as the peak of what follows. Does nothing where the platform does not offer it.
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The `VmRSS` and `VmHWM` lines of a `/proc/<pid>/status` text (values in kB); a missing or
/// malformed line reads as 0.
fn parse_status(text: &str) -> ProcessMemory {
    let kib = |key: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|rest| rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
            .map_or(0, |k| k * 1024)
    };
    ProcessMemory {
        resident_bytes: kib("VmRSS"),
        peak_resident_bytes: kib("VmHWM"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_lines() {
        let text = "Name:\tmoectl\nVmPeak:\t 9000 kB\nVmHWM:\t    2048 kB\nVmRSS:\t    1536 kB\nThreads:\t4\n";
        assert_eq!(
            parse_status(text),
            ProcessMemory {
                resident_bytes: 1536 * 1024,
                peak_resident_bytes: 2048 * 1024,
            }
        );
    }

    #[test]
    fn missing_or_malformed_lines_read_as_zero() {
        assert_eq!(parse_status("VmRSS:\tlots kB\n"), ProcessMemory::default());
        assert_eq!(parse_status(""), ProcessMemory::default());
        // A key that only starts like the wanted one is not it.
        assert_eq!(parse_status("VmRSSx:\t12 kB\n").resident_bytes, 0);
    }

    #[test]
    fn a_freed_buffer_leaves_the_peak_once_reset() {
        if !cfg!(target_os = "linux") {
            return;
        }
        // 256 MiB touched then freed raises the peak far above what stays resident.
        let buffer = vec![1u8; 256 << 20];
        std::hint::black_box(&buffer);
        drop(buffer);
        let before = ProcessMemory::read();
        reset_peak();
        let after = ProcessMemory::read();
        assert!(before.peak_resident_bytes >= 256 << 20, "{before:?}");
        assert!(
            after.peak_resident_bytes < before.peak_resident_bytes,
            "{before:?} -> {after:?}"
        );
    }

    #[test]
    fn this_process_is_resident_on_linux() {
        let m = ProcessMemory::read();
        if cfg!(target_os = "linux") {
            assert!(
                m.resident_bytes > 0 && m.peak_resident_bytes >= m.resident_bytes,
                "{m:?}"
            );
        }
    }
}
