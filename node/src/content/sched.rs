//! The node's link scheduler: per registry host, a cap on concurrent ranged requests,
//! granted by priority (on-demand reads, then startup prefetch, then background fetch).
//!
//! Permits are handed over in priority order, first come first served within a class.
//! Background fetch also waits while an image is starting (its startup prefetch running,
//! or a layer Prepare or an on-demand request seen within the last few seconds), so it
//! never competes with a container about to start or reading, and only a quarter of the
//! cap of background requests run at once, so little is queued ahead of a read. Who a fetch is for travels with the task ([`FETCH`], a
//! task-local): the metered registry source asks for a permit of that class and charges
//! the bytes to it, unless the caller already holds one (prefetchers take their permit
//! before they lock spans, so a queued prefetch never holds a span a read waits on).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};

/// Who a fetch is for, highest priority first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Class {
    /// A read (FUSE) waits for it.
    #[default]
    OnDemand,
    /// The startup prefetch of an image.
    Startup,
    /// The rest of the layers, when the link is otherwise idle.
    Background,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::OnDemand, Class::Startup, Class::Background];

    fn rank(self) -> usize {
        match self {
            Class::OnDemand => 0,
            Class::Startup => 1,
            Class::Background => 2,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Class::OnDemand => "on_demand",
            Class::Startup => "startup",
            Class::Background => "background",
        }
    }
}

/// The fetch context of a task (see [`FETCH`]).
#[derive(Clone, Debug, Default)]
pub struct FetchContext {
    pub class: Class,
    /// The caller holds a permit for the requests it makes: do not take another.
    pub permit_held: bool,
    /// The CRI image ref the fetch is for, when the caller knows it.
    pub image: Option<Arc<str>>,
}

tokio::task_local! {
    /// Set by prefetchers around their reads; absent (FUSE reads) means on demand.
    pub static FETCH: FetchContext;
}

/// The current task's fetch context (on demand, no permit held, when none is set).
pub fn current() -> FetchContext {
    FETCH.try_with(Clone::clone).unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    #[error("{queued} {class} requests already queued for {host} (the bound)")]
    QueueFull {
        host: String,
        class: &'static str,
        queued: usize,
    },
    #[error("the scheduler of {0} went away")]
    Closed(String),
}

struct LinkState {
    in_use: usize,
    /// Waiters per class (by rank). A sender whose receiver is gone is skipped.
    waiting: [VecDeque<oneshot::Sender<Permit>>; 3],
}

/// One registry host's share of the link.
struct Link {
    host: String,
    max: usize,
    state: Mutex<LinkState>,
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, LinkState> {
        // A panic elsewhere with the lock held leaves counts that are still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives a released slot to the first live waiter of the highest class, or frees it.
    fn release(self: &Arc<Self>) {
        let mut st = self.lock();
        for q in st.waiting.iter_mut() {
            while let Some(tx) = q.pop_front() {
                match tx.send(Permit {
                    link: Some(self.clone()),
                    _background: None,
                }) {
                    Ok(()) => return,
                    // That waiter gave up: this permit must not release the slot again.
                    Err(mut p) => p.link = None,
                }
            }
        }
        st.in_use = st.in_use.saturating_sub(1);
    }
}

/// A slot for one request to a host; released (or handed to the next waiter) on drop.
pub struct Permit {
    link: Option<Arc<Link>>,
    /// A background request's share of the node's background slots.
    _background: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(link) = self.link.take() {
            link.release();
        }
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = self.link.as_ref().map(|l| l.host.as_str());
        f.debug_struct("Permit").field("host", &host).finish()
    }
}

#[derive(Default)]
struct Busy {
    starting: usize,
    /// The last layer Prepare or on-demand request: a container is starting or reading.
    last_prepare: Option<Instant>,
}

/// Settings of the scheduler.
#[derive(Clone, Debug)]
pub struct SchedOptions {
    /// Concurrent requests per registry host.
    pub max_requests: usize,
    /// Waiters queued per host and class before new ones are refused.
    pub max_queued: usize,
    /// How long after a layer Prepare background fetch stays paused.
    pub quiet: Duration,
}

impl Default for SchedOptions {
    fn default() -> Self {
        SchedOptions {
            max_requests: 8,
            max_queued: 4096,
            quiet: Duration::from_secs(3),
        }
    }
}

/// The scheduler of the node's link to its registries.
pub struct LinkScheduler {
    opts: SchedOptions,
    links: Mutex<HashMap<String, Arc<Link>>>,
    busy: Mutex<Busy>,
    /// Background requests in flight on the node: a few, so the bytes already queued on the
    /// link ahead of an on-demand read stay small.
    background: Arc<tokio::sync::Semaphore>,
    /// Woken when an image's startup ends.
    calm: Notify,
}

/// Marks an image as starting until dropped.
pub struct Starting {
    sched: Arc<LinkScheduler>,
}

impl Drop for Starting {
    fn drop(&mut self) {
        {
            let mut b = self.sched.busy();
            b.starting = b.starting.saturating_sub(1);
        }
        self.sched.calm.notify_waiters();
    }
}

impl LinkScheduler {
    pub fn new(mut opts: SchedOptions) -> LinkScheduler {
        opts.max_requests = opts.max_requests.max(1);
        opts.max_queued = opts.max_queued.max(1);
        let background = Arc::new(tokio::sync::Semaphore::new(
            opts.max_requests.div_ceil(4).max(1),
        ));
        LinkScheduler {
            opts,
            links: Mutex::new(HashMap::new()),
            busy: Mutex::new(Busy::default()),
            background,
            calm: Notify::new(),
        }
    }

    /// Concurrent requests allowed per host.
    pub fn max_requests(&self) -> usize {
        self.opts.max_requests
    }

    fn busy(&self) -> MutexGuard<'_, Busy> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn link(&self, host: &str) -> Arc<Link> {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        links
            .entry(host.to_string())
            .or_insert_with(|| {
                Arc::new(Link {
                    host: host.to_string(),
                    max: self.opts.max_requests,
                    state: Mutex::new(LinkState {
                        in_use: 0,
                        waiting: Default::default(),
                    }),
                })
            })
            .clone()
    }

    /// Records a layer Prepare or an on-demand request: background fetch pauses for the
    /// quiet period.
    pub fn note_prepare(&self) {
        self.busy().last_prepare = Some(Instant::now());
    }

    /// Marks an image as starting (its startup prefetch running) until the guard drops.
    pub fn starting(self: &Arc<Self>) -> Starting {
        self.busy().starting += 1;
        Starting {
            sched: self.clone(),
        }
    }

    /// Whether an image is starting now.
    pub fn is_busy(&self) -> bool {
        let b = self.busy();
        b.starting > 0
            || b.last_prepare
                .is_some_and(|t| t.elapsed() < self.opts.quiet)
    }

    /// Returns once no image is starting and no Prepare happened within the quiet period.
    pub async fn wait_quiet(&self) {
        loop {
            let calm = self.calm.notified();
            tokio::pin!(calm);
            // Registered before looking, so a startup ending in between still wakes us.
            calm.as_mut().enable();
            let wait = {
                let b = self.busy();
                if b.starting > 0 {
                    None
                } else {
                    match b.last_prepare.map(|t| t.elapsed()) {
                        Some(age) if age < self.opts.quiet => Some(self.opts.quiet - age),
                        _ => return,
                    }
                }
            };
            match wait {
                None => calm.await,
                Some(d) => {
                    tokio::select! {
                        _ = calm => {}
                        _ = tokio::time::sleep(d) => {}
                    }
                }
            }
        }
    }

    /// A permit for one request to `host` on behalf of `class`. Background requests first
    /// wait for the link to be quiet (see [`LinkScheduler::wait_quiet`]).
    pub async fn acquire(&self, host: &str, class: Class) -> Result<Permit, SchedError> {
        match class {
            Class::Background => {
                let slot = self
                    .background
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| SchedError::Closed(host.to_string()))?;
                self.wait_quiet().await;
                let mut p = self.acquire_link(host, class).await?;
                p._background = Some(slot);
                return Ok(p);
            }
            // A container is reading: background fetch keeps off the link meanwhile.
            Class::OnDemand => self.note_prepare(),
            Class::Startup => {}
        }
        self.acquire_link(host, class).await
    }

    async fn acquire_link(&self, host: &str, class: Class) -> Result<Permit, SchedError> {
        let link = self.link(host);
        let rx = {
            let mut st = link.lock();
            let rank = class.rank();
            if st.in_use < link.max {
                // Waiters are only left behind when they gave up; drop those.
                for q in st.waiting.iter_mut() {
                    q.retain(|tx| !tx.is_closed());
                }
                if st.waiting[..=rank].iter().all(VecDeque::is_empty) {
                    st.in_use += 1;
                    drop(st);
                    return Ok(Permit {
                        link: Some(link),
                        _background: None,
                    });
                }
            }
            let q = &mut st.waiting[rank];
            if q.len() >= self.opts.max_queued {
                q.retain(|tx| !tx.is_closed());
                if q.len() >= self.opts.max_queued {
                    return Err(SchedError::QueueFull {
                        host: host.to_string(),
                        class: class.label(),
                        queued: q.len(),
                    });
                }
            }
            let (tx, rx) = oneshot::channel();
            q.push_back(tx);
            rx
        };
        rx.await.map_err(|_| SchedError::Closed(host.to_string()))
    }

    /// Requests running and queued (per class) for `host`.
    pub fn load(&self, host: &str) -> (usize, [usize; 3]) {
        let link = self.link(host);
        let st = link.lock();
        let q = |i: usize| st.waiting[i].iter().filter(|t| !t.is_closed()).count();
        (st.in_use, [q(0), q(1), q(2)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn sched(max: usize, quiet: Duration) -> Arc<LinkScheduler> {
        Arc::new(LinkScheduler::new(SchedOptions {
            max_requests: max,
            max_queued: 2,
            quiet,
        }))
    }

    #[tokio::test]
    async fn caps_requests_per_host() {
        let s = sched(2, Duration::ZERO);
        let a = s.acquire("r1", Class::Background).await.expect("a");
        let b = s.acquire("r1", Class::OnDemand).await.expect("b");
        assert!(
            s.acquire("r1", Class::OnDemand).now_or_never().is_none(),
            "a third request waits"
        );
        // Another host has its own cap.
        let _c = s.acquire("r2", Class::OnDemand).await.expect("other host");
        assert_eq!(s.load("r1").0, 2);
        drop(a);
        drop(b);
        assert_eq!(s.load("r1"), (0, [0, 0, 0]));
    }

    #[tokio::test]
    async fn grants_by_priority_then_arrival() {
        let s = sched(1, Duration::ZERO);
        let held = s.acquire("r", Class::OnDemand).await.expect("held");
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, class) in [
            ("bg", Class::Background),
            ("startup1", Class::Startup),
            ("read", Class::OnDemand),
            ("startup2", Class::Startup),
        ] {
            let (s2, order) = (s.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let p = s2.acquire("r", class).await.expect("permit");
                order.lock().expect("order").push(name);
                tokio::task::yield_now().await;
                drop(p);
            }));
            // Queued in this order.
            while s.load("r").1.iter().sum::<usize>() < tasks.len() {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(s.load("r"), (1, [1, 2, 1]));
        drop(held);
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(
            *order.lock().expect("order"),
            ["read", "startup1", "startup2", "bg"]
        );
        assert_eq!(s.load("r"), (0, [0, 0, 0]));
    }

    #[tokio::test]
    async fn queues_are_bounded_and_a_waiter_that_gives_up_frees_nothing_twice() {
        let s = sched(1, Duration::ZERO);
        let held = s.acquire("r", Class::Startup).await.expect("held");
        let mut w1 = Box::pin(s.acquire("r", Class::Startup));
        let mut w2 = Box::pin(s.acquire("r", Class::Startup));
        assert!(w1.as_mut().now_or_never().is_none());
        assert!(w2.as_mut().now_or_never().is_none());
        match s.acquire("r", Class::Startup).now_or_never() {
            Some(Err(SchedError::QueueFull { queued: 2, .. })) => {}
            other => panic!("expected a full queue, got {other:?}"),
        }
        // Other classes have their own bound.
        let mut read = Box::pin(s.acquire("r", Class::OnDemand));
        assert!(read.as_mut().now_or_never().is_none());
        drop(w1);
        drop(read);
        // Released past the two that gave up to the one still waiting.
        drop(held);
        let p = w2.await.expect("w2 gets the slot");
        assert_eq!(s.load("r"), (1, [0, 0, 0]));
        drop(p);
        assert_eq!(s.load("r"), (0, [0, 0, 0]));
        let again = s.acquire("r", Class::Startup).now_or_never();
        assert!(matches!(again, Some(Ok(_))), "the slot is free again");
    }

    #[tokio::test]
    async fn background_waits_while_an_image_starts() {
        let s = sched(4, Duration::ZERO);
        let starting = s.starting();
        assert!(s.is_busy());
        let bg = tokio::spawn({
            let s = s.clone();
            async move { s.acquire("r", Class::Background).await.map(drop) }
        });
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert!(!bg.is_finished(), "background is paused during a startup");
        // Startup and reads are not.
        let p = s.acquire("r", Class::Startup).now_or_never();
        assert!(matches!(p, Some(Ok(_))));
        drop(starting);
        bg.await
            .expect("task")
            .expect("background runs after the startup");

        // A recent Prepare pauses it for the quiet period.
        let s = sched(4, Duration::from_secs(3600));
        s.note_prepare();
        assert!(s.is_busy());
        assert!(
            s.acquire("r", Class::Background).now_or_never().is_none(),
            "paused within the quiet period"
        );
        assert!(matches!(
            s.acquire("r", Class::OnDemand).now_or_never(),
            Some(Ok(_))
        ));
    }

    #[tokio::test]
    async fn reads_pause_background_and_background_takes_a_quarter_of_the_cap() {
        // An on-demand request quiets the link for background fetch.
        let s = sched(8, Duration::from_secs(3600));
        assert!(!s.is_busy());
        let read = s.acquire("r", Class::OnDemand).await.expect("read");
        assert!(s.is_busy(), "a read marks the link busy");
        assert!(s.acquire("r", Class::Background).now_or_never().is_none());
        drop(read);

        // With the link quiet, at most 8 / 4 background requests run at once.
        let s = sched(8, Duration::ZERO);
        let a = s.acquire("r", Class::Background).now_or_never();
        let b = s.acquire("other", Class::Background).now_or_never();
        assert!(matches!(a, Some(Ok(_))) && matches!(b, Some(Ok(_))));
        assert!(
            s.acquire("r", Class::Background).now_or_never().is_none(),
            "a third background request waits, on any host"
        );
        assert!(matches!(
            s.acquire("r", Class::Startup).now_or_never(),
            Some(Ok(_))
        ));
        drop(a);
        assert!(matches!(
            s.acquire("r", Class::Background).now_or_never(),
            Some(Ok(_))
        ));
    }
}
