//! A local cluster started with `moectl up` as a child process, for integration tests: real
//! processes, real sockets on 127.0.0.1, ports chosen at run time.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub role: String,
    pub pid: u32,
    pub address: String,
}

pub struct LocalCluster {
    child: Child,
    pub endpoint: String,
    /// Where the coordinator serves metrics, when started with `--metrics-listen`.
    pub metrics: Option<String>,
    /// The HTTP front end's URL (`http://host:port`), when started with `--http`.
    pub http: Option<String>,
    pub processes: Vec<ProcessInfo>,
    /// What `moectl up` prints after `READY` (`EXITED`, `PROCESS` lines of restarts).
    lines: Mutex<mpsc::Receiver<String>>,
}

impl LocalCluster {
    /// Starts `moectl up` and waits (bounded) until it prints `READY`.
    pub fn start(moectl: &Path, model: &Path, attention: usize, experts: usize, extra: &[&str]) -> Self {
        Self::spawn(Command::new(moectl), model, attention, experts, extra)
    }

    /// [`LocalCluster::start`] with every process of the cluster limited to `limit` open files
    /// (soft and hard limit, so that none can raise it).
    pub fn start_with_fd_limit(
        limit: u64,
        moectl: &Path,
        model: &Path,
        attention: usize,
        experts: usize,
        extra: &[&str],
    ) -> Self {
        let mut shell = Command::new("sh");
        // `ulimit -n` without -S/-H sets both; `$0 "$@"` is moectl and the arguments below.
        shell
            .arg("-c")
            .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
            .arg(moectl);
        Self::spawn(shell, model, attention, experts, extra)
    }

    /// Runs `moectl up` with `command` (moectl itself, or a wrapper that execs it).
    fn spawn(mut command: Command, model: &Path, attention: usize, experts: usize, extra: &[&str]) -> Self {
        let mut child = command
            .args(["up", "--listen", "127.0.0.1:0", "--ready-timeout", "120"])
            .arg("--model")
            .arg(model)
            .args([
                "--attention-workers",
                &attention.to_string(),
                "--expert-workers",
                &experts.to_string(),
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting moectl up");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut processes = Vec::new();
        let mut metrics = None;
        let mut http = None;
        let endpoint = loop {
            let line = match rx.recv_timeout(Duration::from_secs(180)) {
                Ok(l) => l,
                Err(e) => {
                    let _ = child.kill();
                    panic!("moectl up did not become ready: {e}");
                }
            };
            if let Some(rest) = line.strip_prefix("PROCESS ") {
                let parts: Vec<&str> = rest.split_whitespace().collect();
                processes.push(ProcessInfo {
                    role: parts[0].to_owned(),
                    pid: parts[1].trim_start_matches("pid=").parse().expect("pid"),
                    address: parts[2].trim_start_matches("addr=").to_owned(),
                });
            } else if let Some(h) = line.strip_prefix("HTTP ") {
                http = Some(h.trim().to_owned());
            } else if let Some(m) = line.strip_prefix("METRICS ") {
                metrics = Some(m.trim().to_owned());
            } else if let Some(ep) = line.strip_prefix("READY ") {
                break ep.trim().to_owned();
            }
        };
        LocalCluster {
            child,
            endpoint,
            metrics,
            http,
            processes,
            lines: Mutex::new(rx),
        }
    }

    /// The next line `moectl up` prints that starts with `prefix`, waiting at most `timeout`
    /// (lines before it are passed over).
    pub fn wait_for_line(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let lines = self.lines.lock().expect("lines lock");
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Some(line),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// `kill -9` of the `index`-th process of `role`; returns it.
    pub fn kill(&self, role: &str, index: usize) -> ProcessInfo {
        let p = self
            .processes
            .iter()
            .filter(|p| p.role == role)
            .nth(index)
            .expect("no such process")
            .clone();
        let status = Command::new("kill")
            .args(["-9", &p.pid.to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -9 {} failed", p.pid);
        p
    }

    pub fn addresses(&self, role: &str) -> Vec<String> {
        self.processes
            .iter()
            .filter(|p| p.role == role)
            .map(|p| p.address.clone())
            .collect()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // The workers watch their stdin, which closes with `moectl up`: they stop too.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
