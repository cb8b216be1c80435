//! The process's open-file limit. Every connection a server holds is a descriptor; the default
//! soft limit (often 1,024) is far below what a busy coordinator may need, while the hard limit
//! a process may raise itself to is usually much higher. Servers raise the soft limit at start
//! ([`raise`]) and size their connection bound from what they got ([`soft`]).

/// Never ask for more than this, even with an unlimited hard limit: Linux refuses a soft limit
/// above `fs.nr_open` (1,048,576 by default).
const CEILING: u64 = 1 << 20;

/// The soft and hard RLIMIT_NOFILE, or `None` where they cannot be read.
fn get() -> Option<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a valid, exclusive pointer.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0).then_some((limit.rlim_cur, limit.rlim_max))
}

/// The current soft limit on open files, or `None` where it cannot be read.
pub fn soft() -> Option<u64> {
    get().map(|(soft, _)| soft)
}

/// Raises the soft open-file limit to the hard limit (at most [`CEILING`]) where allowed, and
/// logs the limit before and after. Never lowers it; a refusal is logged and otherwise ignored,
/// since the server still works within the old limit (its connection bound follows it).
pub fn raise() {
    let Some((before, hard)) = get() else {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open-file limit");
        return;
    };
    let target = hard.min(CEILING);
    if target <= before {
        tracing::info!(soft = before, hard, "open-file limit");
        return;
    }
    let limit = libc::rlimit {
        rlim_cur: target,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads one `rlimit` through a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
        tracing::info!(before, after = target, hard, "raised the open-file limit");
    } else {
        tracing::warn!(
            soft = before,
            hard,
            error = %std::io::Error::last_os_error(),
            "could not raise the open-file limit; keeping it"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_never_lowers_the_limit_and_reaches_the_hard_one_or_the_ceiling() {
        let (before, hard) = get().expect("getrlimit");
        raise();
        let (after, hard_after) = get().expect("getrlimit");
        assert_eq!(hard_after, hard);
        assert!(after >= before);
        assert_eq!(after, before.max(hard.min(CEILING)));
    }
}
