//! Admission control: at most `max_in_flight` requests run and at most `max_queue` wait;
//! beyond that a request is refused at once, never piled up.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::RouterError;

pub struct Admission {
    running: Arc<Semaphore>,
    max_in_flight: usize,
    waiting: AtomicUsize,
    max_queue: usize,
}

/// Held for the life of an admitted request; dropping it lets the next one in.
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
}

impl Admission {
    pub fn new(max_in_flight: usize, max_queue: usize) -> Self {
        Admission {
            running: Arc::new(Semaphore::new(max_in_flight.max(1))),
            max_in_flight: max_in_flight.max(1),
            waiting: AtomicUsize::new(0),
            max_queue,
        }
    }

    /// Admits now, waits in the bounded queue (up to `deadline`), or refuses.
    pub async fn admit(&self, deadline: Duration) -> Result<Admitted, RouterError> {
        if let Ok(permit) = self.running.clone().try_acquire_owned() {
            return Ok(Admitted { _permit: permit });
        }
        let queued = self.waiting.fetch_add(1, Ordering::AcqRel);
        let _leave = Leave(&self.waiting);
        if queued >= self.max_queue {
            return Err(RouterError::Overloaded(format!(
                "{} requests running and {} queued (the limits)",
                self.max_in_flight, self.max_queue
            )));
        }
        match tokio::time::timeout(deadline, self.running.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Admitted { _permit: permit }),
            Ok(Err(_)) => Err(RouterError::Internal("admission closed".into())),
            Err(_) => Err(RouterError::DeadlineExceeded(
                "waiting in the admission queue".into(),
            )),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.running.available_permits()
    }

    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admits_queues_then_refuses_at_once() {
        let a = Arc::new(Admission::new(1, 1));
        let first = a.admit(Duration::from_secs(5)).await.unwrap();
        assert_eq!(a.in_flight(), 1);
        let queued = {
            let a = a.clone();
            tokio::spawn(async move { a.admit(Duration::from_secs(5)).await.map(|_| ()) })
        };
        while a.queued() == 0 {
            tokio::task::yield_now().await;
        }
        let refused = a.admit(Duration::from_secs(5)).await;
        assert!(matches!(refused, Err(RouterError::Overloaded(_))));
        drop(first);
        queued.await.unwrap().unwrap();
        assert_eq!(a.queued(), 0);
        assert_eq!(a.in_flight(), 0);
    }
}
