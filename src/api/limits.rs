//! Per-client admission: a bound on requests in flight and a token-bucket rate. Overload is
//! answered at once with RESOURCE_EXHAUSTED instead of queuing without bound.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use super::error::resource_exhausted;

struct Bucket {
    tokens: f64,
    last: Instant,
}

struct ClientLimiter {
    in_flight: Arc<Semaphore>,
    bucket: Mutex<Bucket>,
}

/// Limits for every client.
pub struct Limits {
    max_in_flight: usize,
    rate: f64,
    burst: f64,
    clients: Mutex<HashMap<String, Arc<ClientLimiter>>>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("max_in_flight", &self.max_in_flight)
            .field("rate", &self.rate)
            .finish_non_exhaustive()
    }
}

impl Limits {
    /// `max_in_flight` concurrent requests and `rate`/s with bursts of `burst` per client.
    pub fn new(max_in_flight: usize, rate: f64, burst: f64) -> Self {
        Limits {
            max_in_flight: max_in_flight.max(1),
            rate: rate.max(0.001),
            burst: burst.max(1.0),
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn limiter(&self, identity: &str) -> Arc<ClientLimiter> {
        let mut map = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(identity.to_string())
            .or_insert_with(|| {
                Arc::new(ClientLimiter {
                    in_flight: Arc::new(Semaphore::new(self.max_in_flight)),
                    bucket: Mutex::new(Bucket {
                        tokens: self.burst,
                        last: Instant::now(),
                    }),
                })
            })
            .clone()
    }

    /// Admits one request of `identity`: the permit is held while it runs.
    pub fn admit(&self, identity: &str, request_id: &str) -> Result<OwnedSemaphorePermit, Status> {
        let l = self.limiter(identity);
        {
            let mut b = l.bucket.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            b.tokens =
                (b.tokens + now.duration_since(b.last).as_secs_f64() * self.rate).min(self.burst);
            b.last = now;
            if b.tokens < 1.0 {
                return Err(resource_exhausted(
                    "request rate limit exceeded",
                    request_id,
                ));
            }
            b.tokens -= 1.0;
        }
        l.in_flight.clone().try_acquire_owned().map_err(|_| {
            resource_exhausted("too many requests in flight for this client", request_id)
        })
    }
}

/// Runs an admitted call's work in a task of its own that holds the call's permit: a client
/// that goes away (or whose deadline passes) cannot cut the work short — a reservation from
/// its completion, a revocation from its audit entry — and its place in the in-flight limit is
/// kept until the work ends. Fails only when the task itself failed (a panic).
pub async fn run_admitted<T: Send + 'static>(
    permit: OwnedSemaphorePermit,
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    tokio::spawn(async move {
        let _permit = permit;
        work.await
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_and_rate() {
        let l = Limits::new(2, 1000.0, 1000.0);
        let a = l.admit("c", "r").unwrap();
        let _b = l.admit("c", "r").unwrap();
        assert_eq!(
            l.admit("c", "r").unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
        // Other clients are not affected.
        let _other = l.admit("d", "r").unwrap();
        drop(a);
        let _again = l.admit("c", "r").unwrap();

        let slow = Limits::new(100, 0.001, 2.0);
        let _p1 = slow.admit("c", "r").unwrap();
        let _p2 = slow.admit("c", "r").unwrap();
        assert_eq!(
            slow.admit("c", "r").unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
    }
}
