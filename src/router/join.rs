//! One task per client connection: the connection and the upstream connections that its requests
//! opened are polled together, so that a request and its response pass between them without waking
//! another task.
//!
//! A request hands its new upstream connection over with [`Uplinks::push`]; [`Joined`] drives it from
//! then on, and drops it when the client connection ends. Within one poll, [`Joined`] goes round the
//! upstream connections and the client connection for as long as one of them woke another (a request
//! queued for an upstream, a response arrived for a request), up to a budget, and only then gives the
//! thread back to the runtime.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use futures::stream::{FuturesUnordered, StreamExt};

/// An upstream connection's future, driven until the connection closes.
pub type Uplink = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Upstream connections opened by a client connection's requests, waiting to be driven.
#[derive(Default)]
pub struct Uplinks(Mutex<Vec<Uplink>>);

impl Uplinks {
    /// Hands a new upstream connection over to the client connection's task.
    pub fn push(&self, uplink: Uplink) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(uplink);
    }

    fn drain_into(&self, running: &mut FuturesUnordered<Uplink>) -> bool {
        let mut new = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let any = !new.is_empty();
        running.extend(new.drain(..));
        any
    }
}

/// Rounds within one poll at most: past it, the task yields to the others.
const ROUNDS: usize = 16;

/// A client connection's future joined with the upstream connections its requests opened.
pub struct Joined<F> {
    conn: Pin<Box<F>>,
    uplinks: Arc<Uplinks>,
    running: FuturesUnordered<Uplink>,
    flag: Arc<Flag>,
    waker: Waker,
}

impl<F: Future> Joined<F> {
    pub fn new(conn: F, uplinks: Arc<Uplinks>) -> Joined<F> {
        let flag = Arc::new(Flag::default());
        Joined {
            conn: Box::pin(conn),
            uplinks,
            running: FuturesUnordered::new(),
            waker: Waker::from(flag.clone()),
            flag,
        }
    }
}

impl<F: Future> Future for Joined<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        this.flag.set_outer(cx.waker());
        let waker = this.waker.clone();
        let mut inner = Context::from_waker(&waker);
        for _ in 0..ROUNDS {
            this.flag.polling.store(true, SeqCst);
            this.flag.woken.store(false, SeqCst);
            // Upstream connections first: a response they read reaches its request in this round.
            while let Poll::Ready(Some(())) = this.running.poll_next_unpin(&mut inner) {}
            if let Poll::Ready(out) = this.conn.as_mut().poll(&mut inner) {
                return Poll::Ready(out);
            }
            let pushed = this.uplinks.drain_into(&mut this.running);
            this.flag.polling.store(false, SeqCst);
            if !pushed && !this.flag.woken.swap(false, SeqCst) {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// The waker given to the joined futures. A wake while [`Joined`] polls only asks for another round;
/// any other wake (a socket became readable) wakes the task.
#[derive(Default)]
struct Flag {
    outer: Mutex<Option<Waker>>,
    polling: AtomicBool,
    woken: AtomicBool,
}

impl Flag {
    fn set_outer(&self, w: &Waker) {
        let mut outer = self.outer.lock().unwrap_or_else(PoisonError::into_inner);
        if !outer.as_ref().is_some_and(|o| o.will_wake(w)) {
            *outer = Some(w.clone());
        }
    }
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, SeqCst);
        if !self.polling.load(SeqCst) {
            if let Some(w) = self
                .outer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
            {
                w.wake_by_ref();
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::sync::{mpsc, oneshot};

    /// A request and its answer pass between the joined futures through channels, and an uplink
    /// pushed while the connection runs is driven from then on.
    #[tokio::test]
    async fn pushed_uplinks_are_driven_with_the_connection() {
        let uplinks = Arc::new(Uplinks::default());
        let (tx, mut rx) = mpsc::unbounded_channel::<(u32, oneshot::Sender<u32>)>();
        let up = uplinks.clone();
        let conn = async move {
            up.push(Box::pin(async move {
                while let Some((n, reply)) = rx.recv().await {
                    let _ = reply.send(n * 2);
                }
            }));
            let mut sum = 0;
            for n in 1..=100 {
                let (reply, answer) = oneshot::channel();
                tx.send((n, reply)).unwrap();
                sum += answer.await.unwrap();
            }
            sum
        };
        let sum = tokio::time::timeout(Duration::from_secs(5), Joined::new(conn, uplinks))
            .await
            .expect("the joined futures finish");
        assert_eq!(sum, 2 * 5050);
    }

    /// A wake from outside (here a timer) after the poll ended wakes the task.
    #[tokio::test]
    async fn a_wake_from_outside_wakes_the_task() {
        let uplinks = Arc::new(Uplinks::default());
        let (tx, rx) = oneshot::channel::<u32>();
        let up = uplinks.clone();
        let conn = async move {
            up.push(Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = tx.send(7);
            }));
            rx.await.unwrap()
        };
        let got = tokio::time::timeout(Duration::from_secs(5), Joined::new(conn, uplinks))
            .await
            .expect("the joined futures finish");
        assert_eq!(got, 7);
    }
}
