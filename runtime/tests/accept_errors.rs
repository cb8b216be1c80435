//! The accept loop through EMFILE: with every descriptor of the process in use, accepting
//! fails; the loop backs off instead of ending or spinning, and serves again once descriptors
//! are free. Its own test binary, since it lowers the whole process's open-file limit.

use std::net::TcpStream;
use std::time::Duration;

use moe_runtime::net::{HANDSHAKE_BYTES, ListenConfig, bind_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;

/// Descriptors this process may open beyond those open at the test's start.
const HEADROOM: usize = 32;

fn set_soft_limit(soft: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write one `rlimit` through a valid pointer.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        let old = limit.rlim_cur;
        limit.rlim_cur = soft;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        old
    }
}

#[tokio::test]
async fn the_accept_loop_outlasts_emfile_and_serves_again() {
    // Shows the rate-limited "backing off" warning with `--nocapture`.
    moe_runtime::worker::init_tracing("warn");
    let config = ListenConfig {
        max_connections: 4096,
        handshake_deadline: Duration::from_secs(3600),
        handshake_exchanges: 1,
    };
    let (mut incoming, addr) = bind_with("127.0.0.1:0".parse().unwrap(), config).await.unwrap();
    tokio::spawn(async move {
        while let Some(Ok(mut connection)) = incoming.next().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 256];
                while let Ok(n @ 1..) = connection.read(&mut buf).await {
                    if connection.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });

    let open = std::fs::read_dir("/proc/self/fd").unwrap().count();
    let old = set_soft_limit((open + HEADROOM) as u64);
    // Connects complete from the listen backlog while the server (this thread's runtime) does
    // not run; once they have used every descriptor, its accepts fail with EMFILE.
    let mut clients = Vec::new();
    let exhausted = loop {
        match TcpStream::connect(addr) {
            Ok(s) => clients.push(s),
            Err(e) => break e,
        }
    };
    assert_eq!(exhausted.raw_os_error(), Some(libc::EMFILE), "{exhausted}");
    // The server meets EMFILE a while (backing off: 5 ms, 10 ms, ...).
    tokio::time::sleep(Duration::from_millis(500)).await;
    clients.clear();
    set_soft_limit(old);

    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let preface = [b'x'; HANDSHAKE_BYTES];
    client.write_all(&preface).await.unwrap();
    let mut echo = [0u8; HANDSHAKE_BYTES];
    tokio::time::timeout(Duration::from_secs(20), client.read_exact(&mut echo))
        .await
        .expect("not served after the descriptors came back")
        .unwrap();
    assert_eq!(echo, preface);
}
