//! Why workers left the cluster, counted by cause: a drained worker (scale-down, rolling
//! update, `moectl drain`) is routine, the others are not. Alerts on worker churn key on the
//! unexpected causes only (deploy/monitoring/alerts.yaml), so scale-ups and rollouts do not
//! page. Fixed label values.

use std::fmt::Write;

/// How a worker left the coordinator's view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Departure {
    /// Drained and released (SIGTERM, `moectl drain`).
    Drained,
    /// No heartbeat within the timeout.
    HeartbeatTimeout,
    /// Its etcd record ended with its lease while it was silent.
    LeaseExpired,
    /// An attention worker reported it failed.
    ReportedFailed,
    /// A new process took its id while it was silent (a container restart).
    Replaced,
}

impl Departure {
    const ALL: [Departure; 5] = [
        Departure::Drained,
        Departure::HeartbeatTimeout,
        Departure::LeaseExpired,
        Departure::ReportedFailed,
        Departure::Replaced,
    ];

    fn label(self) -> &'static str {
        match self {
            Departure::Drained => "drained",
            Departure::HeartbeatTimeout => "heartbeat_timeout",
            Departure::LeaseExpired => "lease_expired",
            Departure::ReportedFailed => "reported_failed",
            Departure::Replaced => "replaced",
        }
    }
}

/// Departures since this coordinator started, by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Departures([u64; 5]);

impl Departures {
    pub fn count(&mut self, why: Departure) {
        self.0[why as usize] += 1;
    }

    pub fn of(&self, why: Departure) -> u64 {
        self.0[why as usize]
    }

    pub fn render(&self, out: &mut String) {
        let name = "moe_worker_departures_total";
        let _ = writeln!(
            out,
            "# HELP {name} Workers that left this coordinator's view, by cause (drained is routine; the others are failures).\n# TYPE {name} counter"
        );
        for why in Departure::ALL {
            let _ = writeln!(out, "{name}{{reason=\"{}\"}} {}", why.label(), self.of(why));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cause_renders_once_with_its_count() {
        let mut d = Departures::default();
        d.count(Departure::Drained);
        d.count(Departure::Drained);
        d.count(Departure::LeaseExpired);
        let mut out = String::new();
        d.render(&mut out);
        let samples: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            [
                "moe_worker_departures_total{reason=\"drained\"} 2",
                "moe_worker_departures_total{reason=\"heartbeat_timeout\"} 0",
                "moe_worker_departures_total{reason=\"lease_expired\"} 1",
                "moe_worker_departures_total{reason=\"reported_failed\"} 0",
                "moe_worker_departures_total{reason=\"replaced\"} 0",
            ]
        );
    }
}
