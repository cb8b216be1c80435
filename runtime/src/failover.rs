//! Calls to one of several equivalent servers (a leader coordinator and its standbys): go to the
//! one that answered last, move on while they answer UNAVAILABLE (down, or not the leader).

use std::future::Future;

use tonic::{Code, Status};

/// The server could not be reached or is not the one to talk to: UNAVAILABLE (down, standby),
/// or a transport failure surfaced under another code (a request sent on a connection that
/// was closing comes back CANCELLED, "connection closed").
pub fn unreachable(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable => true,
        Code::Cancelled | Code::Unknown => {
            std::error::Error::source(s).is_some_and(|e| e.downcast_ref::<tonic::transport::Error>().is_some())
        }
        _ => false,
    }
}

#[derive(Clone)]
pub struct Failover<C> {
    targets: Vec<(String, C)>,
    current: usize,
}

impl<C: Clone> Failover<C> {
    /// `targets` as (address, client); at least one.
    pub fn new(targets: Vec<(String, C)>) -> Result<Self, Status> {
        if targets.is_empty() {
            return Err(Status::invalid_argument("no server address given"));
        }
        Ok(Failover { targets, current: 0 })
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// The client to use now and its address.
    pub fn current(&self) -> (&str, C) {
        let (a, c) = &self.targets[self.current];
        (a, c.clone())
    }

    /// Gives up on the current server for the next one.
    pub fn advance(&mut self) {
        self.current = (self.current + 1) % self.targets.len();
    }

    /// Calls `f` on the current server, then on each next one while they are [`unreachable()`];
    /// every server is tried once.
    pub async fn call<T, F>(&mut self, mut f: impl FnMut(C) -> F) -> Result<T, Status>
    where
        F: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut last = None;
        for _ in 0..self.targets.len() {
            let (address, client) = self.current();
            match f(client).await {
                Err(s) if unreachable(&s) => {
                    tracing::debug!(server = %address, status = %s, "unavailable; trying the next");
                    last = Some(s);
                    self.advance();
                }
                r => return r.map(tonic::Response::into_inner),
            }
        }
        Err(last.unwrap_or_else(|| Status::unavailable("no server")))
    }
}

/// Splits a comma-separated address list, dropping blanks.
pub fn addresses(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_and_transport_failures_move_on_other_errors_do_not() {
        assert!(unreachable(&Status::unavailable("standby")));
        // A plain CANCELLED (the caller gave up) or an application error is not the server's
        // absence.
        assert!(!unreachable(&Status::cancelled("client went away")));
        assert!(!unreachable(&Status::invalid_argument("bad prompt")));
        assert!(!unreachable(&Status::resource_exhausted("queue full")));
    }
}
