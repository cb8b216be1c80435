//! A real etcd for tests: the `etcd` binary (Debian's `etcd-server`, installed by
//! `scripts/test.sh`) on loopback ports chosen at run time, with its data in a temporary
//! directory. It can be killed and restarted on the same data, or restarted empty.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// PEM files for an etcd that serves TLS and requires client certificates.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct Etcd {
    child: Option<Child>,
    tls: Option<EtcdTls>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// `http://127.0.0.1:PORT` (`https://` with TLS), for `--etcd`.
    pub endpoint: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn etcd_binary() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("etcd"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "the etcd tests need the `etcd` binary on PATH and it is not there; \
             scripts/test.sh installs it (Debian package etcd-server)"
        )
    })
}

impl Etcd {
    /// Starts etcd and waits (bounded) until it reports healthy.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Starts etcd serving TLS only, with client certificate authentication.
    pub fn start_tls(tls: EtcdTls) -> Self {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<EtcdTls>) -> Self {
        let client_port = free_port();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut etcd = Etcd {
            child: None,
            tls,
            dir: tempfile::tempdir().expect("temporary directory"),
            client_port,
            peer_port: free_port(),
            endpoint: format!("{scheme}://127.0.0.1:{client_port}"),
        };
        etcd.spawn();
        etcd
    }

    fn spawn(&mut self) {
        let p = self.peer_port;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("etcd log file");
        let mut command = Command::new(etcd_binary());
        if let Some(t) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", "test"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &self.endpoint])
            .args(["--advertise-client-urls", &self.endpoint])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{p}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{p}")])
            .args(["--initial-cluster", &format!("test=http://127.0.0.1:{p}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting etcd");
        self.child = Some(child);
        self.wait_healthy(Duration::from_secs(30));
    }

    fn wait_healthy(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.healthy() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("etcd exited ({status}); log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "etcd not healthy after {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// etcd's own `/health` answers healthy (with TLS: its port accepts connections; the
    /// client's first call checks the rest).
    pub fn healthy(&self) -> bool {
        if self.tls.is_some() {
            return TcpStream::connect(("127.0.0.1", self.client_port)).is_ok();
        }
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// `kill -9`: etcd stops at once, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same data (after [`Etcd::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Starts again with nothing: every key and lease is gone, as if etcd lost its disk.
    pub fn restart_empty(&mut self) {
        self.kill();
        std::fs::remove_dir_all(self.dir.path().join("data")).expect("removing etcd's data");
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
