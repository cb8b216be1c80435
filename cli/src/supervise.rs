//! `moectl up`'s watch over its children: every exit is reaped and reported (which, how, when:
//! an `EXITED` line on stdout), and with `--restart-workers` a worker that exits is started
//! again with the same flags (a `PROCESS` line for the new one), so a local cluster heals by
//! itself. Coordinators are reported, not restarted: the embedded registry dies with them.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crate::up::{Proc, spawn};

/// Restarts of one worker allowed within [`RESTART_WINDOW`]; past them it stays down (a worker
/// that dies at start-up must not be restarted in a hot loop).
const MAX_RESTARTS: usize = 3;
const RESTART_WINDOW: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(200);

/// How a child ended, in words.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => "unknown status".into(),
    }
}

/// Whether a worker that exited may be started again, given when it was restarted before.
fn may_restart(previous: &mut Vec<Instant>, now: Instant) -> bool {
    previous.retain(|&t| now.duration_since(t) < RESTART_WINDOW);
    if previous.len() >= MAX_RESTARTS {
        return false;
    }
    previous.push(now);
    true
}

/// Watches `procs` until cancelled (the caller selects it against its stop signals).
pub async fn watch(procs: &mut [Proc], restart: bool) {
    let mut restarts: Vec<Vec<Instant>> = vec![Vec::new(); procs.len()];
    let mut down = vec![false; procs.len()];
    loop {
        tokio::time::sleep(POLL).await;
        for (i, p) in procs.iter_mut().enumerate() {
            if down[i] {
                continue;
            }
            // try_wait reaps: an exited child is never left a zombie.
            let Ok(Some(status)) = p.child.try_wait() else { continue };
            let how = describe(status);
            let after = p.started.elapsed().as_secs_f64();
            println!("EXITED {} pid={} {how} after={after:.1}s", p.role, p.pid);
            eprintln!("{} (pid {}) exited: {how}, after {after:.1}s", p.role, p.pid);
            down[i] = true;
            if !restart || p.role == "coordinator" {
                continue;
            }
            if !may_restart(&mut restarts[i], Instant::now()) {
                eprintln!(
                    "{} exited {MAX_RESTARTS} times within {RESTART_WINDOW:?}: not restarting it",
                    p.role
                );
                continue;
            }
            match spawn(p.role, &p.args).await {
                Ok(new) => {
                    println!("PROCESS {} pid={} addr={}", new.role, new.pid, new.address);
                    eprintln!("{} restarted: pid {} -> {}", new.role, p.pid, new.pid);
                    *p = new;
                    down[i] = false;
                }
                Err(e) => eprintln!("restarting {} failed: {e:#}", p.role),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_described_by_code_or_signal() {
        assert_eq!(describe(ExitStatus::from_raw(0)), "exit code 0");
        assert_eq!(describe(ExitStatus::from_raw(3 << 8)), "exit code 3");
        assert_eq!(describe(ExitStatus::from_raw(9)), "signal 9");
    }

    #[test]
    fn a_worker_that_keeps_dying_is_restarted_only_so_often() {
        let mut previous = Vec::new();
        let t = Instant::now();
        assert!((0..MAX_RESTARTS).all(|i| may_restart(&mut previous, t + Duration::from_secs(i as u64))));
        assert!(
            !may_restart(&mut previous, t + Duration::from_secs(10)),
            "a fourth within a minute"
        );
        assert!(
            may_restart(&mut previous, t + RESTART_WINDOW + Duration::from_secs(5)),
            "the window moved on"
        );
    }
}
