//! Single-threaded wake-up primitives for tasks of one shard (never shared across cores).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// A value set once and awaited by any number of tasks.
pub struct Signal<T: Clone> {
    state: RefCell<(Option<T>, Vec<Waker>)>,
}

impl<T: Clone> Default for Signal<T> {
    fn default() -> Self {
        Signal {
            state: RefCell::new((None, Vec::new())),
        }
    }
}

impl<T: Clone> Signal<T> {
    pub fn new() -> Rc<Self> {
        Rc::new(Self::default())
    }

    /// Sets the value (the first set wins) and wakes every waiter.
    pub fn set(&self, v: T) {
        let wakers = {
            let mut st = self.state.borrow_mut();
            if st.0.is_some() {
                return;
            }
            st.0 = Some(v);
            std::mem::take(&mut st.1)
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    pub fn get(&self) -> Option<T> {
        self.state.borrow().0.clone()
    }

    pub fn wait(self: &Rc<Self>) -> SignalWait<T> {
        SignalWait(self.clone())
    }
}

pub struct SignalWait<T: Clone>(Rc<Signal<T>>);

impl<T: Clone> Future for SignalWait<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut st = self.0.state.borrow_mut();
        match &st.0 {
            Some(v) => Poll::Ready(v.clone()),
            None => {
                if !st.1.iter().any(|w| w.will_wake(cx.waker())) {
                    st.1.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

/// "Something changed, look again": each notify wakes the tasks waiting at that moment.
#[derive(Default)]
pub struct Event {
    current: RefCell<Rc<Signal<()>>>,
}

impl Event {
    pub fn notify(&self) {
        let old = std::mem::replace(&mut *self.current.borrow_mut(), Signal::new());
        old.set(());
    }

    /// A future for the next notify; take it before re-checking the condition, so a
    /// notify between the check and the await is not missed.
    pub fn listen(&self) -> SignalWait<()> {
        self.current.borrow().wait()
    }
}

/// Mutual exclusion across awaits for tasks of one thread: a task that must not overlap
/// another run of the same work (an fdatasync round, a checkpoint) holds the gate.
#[derive(Default)]
pub struct Gate {
    held: Cell<bool>,
    released: Event,
}

/// Holds a [`Gate`] until dropped.
pub struct GateGuard<'a>(&'a Gate);

impl Gate {
    /// Waits until the gate is free and takes it.
    pub async fn enter(&self) -> GateGuard<'_> {
        loop {
            let wait = self.released.listen();
            if !self.held.replace(true) {
                return GateGuard(self);
            }
            wait.await;
        }
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        self.0.held.set(false);
        self.0.released.notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::task::Wake;

    struct Noop;
    impl Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }

    #[test]
    fn signal_wakes_all_waiters_with_the_first_value() {
        let s: Rc<Signal<u32>> = Signal::new();
        let waker = Waker::from(Arc::new(Noop));
        let mut cx = Context::from_waker(&waker);
        let mut a = Box::pin(s.wait());
        let mut b = Box::pin(s.wait());
        assert!(a.as_mut().poll(&mut cx).is_pending());
        s.set(7);
        s.set(8);
        assert_eq!(a.as_mut().poll(&mut cx), Poll::Ready(7));
        assert_eq!(b.as_mut().poll(&mut cx), Poll::Ready(7));
    }

    #[test]
    fn gate_admits_one_holder_at_a_time() {
        let g = Gate::default();
        let waker = Waker::from(Arc::new(Noop));
        let mut cx = Context::from_waker(&waker);
        let mut a = Box::pin(g.enter());
        let Poll::Ready(guard) = a.as_mut().poll(&mut cx) else {
            panic!("a free gate is entered at once");
        };
        let mut b = Box::pin(g.enter());
        assert!(b.as_mut().poll(&mut cx).is_pending());
        drop(guard);
        assert!(b.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn event_listen_before_notify_is_not_missed() {
        let e = Event::default();
        let waker = Waker::from(Arc::new(Noop));
        let mut cx = Context::from_waker(&waker);
        let mut l = Box::pin(e.listen());
        assert!(l.as_mut().poll(&mut cx).is_pending());
        e.notify();
        assert!(l.as_mut().poll(&mut cx).is_ready());
        let mut l2 = Box::pin(e.listen());
        assert!(l2.as_mut().poll(&mut cx).is_pending());
    }
}
