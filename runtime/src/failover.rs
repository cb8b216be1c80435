//! Calls to one of several equivalent servers (a leader coordinator and its standbys): go to the
//! one that answered last, move on while they answer UNAVAILABLE (down, or not the leader).

use std::future::Future;

use tonic::{Code, Status};

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

    /// Calls `f` on the current server, then on each next one while they answer UNAVAILABLE;
    /// every server is tried once.
    pub async fn call<T, F>(&mut self, mut f: impl FnMut(C) -> F) -> Result<T, Status>
    where
        F: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut last = None;
        for _ in 0..self.targets.len() {
            let (address, client) = self.current();
            match f(client).await {
                Err(s) if s.code() == Code::Unavailable => {
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
