//! Graceful shutdown: SIGTERM, Ctrl-C, or (for processes started by `moectl up`) the parent
//! closing our stdin, so no worker outlives the cluster that started it.

use tokio::io::AsyncReadExt;
use tokio::sync::watch;

/// A cloneable shutdown signal.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The sending half; dropping it does not trigger shutdown.
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }

    /// Triggers on SIGTERM or Ctrl-C, and on stdin EOF when `watch_stdin` is set.
    pub fn on_signals(self, watch_stdin: bool) {
        self.on_signals_draining(watch_stdin, None);
    }

    /// Like `on_signals`, except that SIGTERM triggers `drain` (leave gracefully) instead,
    /// when given. Ctrl-C and stdin EOF still stop at once.
    pub fn on_signals_draining(self, watch_stdin: bool, drain: Option<ShutdownTrigger>) {
        tokio::spawn(async move {
            let stdin_closed = async {
                if watch_stdin {
                    let mut stdin = tokio::io::stdin();
                    let mut buf = [0u8; 64];
                    while let Ok(n) = stdin.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                } else {
                    std::future::pending::<()>().await;
                }
            };
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let sigterm = async {
                match term.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C: shutting down"),
                _ = sigterm => match drain {
                    Some(d) => {
                        tracing::info!("SIGTERM: draining, then leaving");
                        d.trigger();
                        // A second signal of any kind stops at once.
                        let _ = tokio::signal::ctrl_c().await;
                    }
                    None => tracing::info!("SIGTERM: shutting down"),
                },
                _ = stdin_closed => tracing::info!("parent closed stdin: shutting down"),
            }
            self.trigger();
        });
    }
}

impl Shutdown {
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once shutdown is triggered; never if the trigger is dropped untriggered.
    pub async fn wait(mut self) {
        if self.rx.wait_for(|&v| v).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
