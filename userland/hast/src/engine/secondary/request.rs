//! The primary's requests applied to the local provider by a few
//! dedicated I/O threads: no task, blocking-pool hop or channel per
//! request. A request runs after the earlier ones it overlaps (a flush
//! after every earlier one, so it covers each write received before it,
//! memsync acknowledging writes before they are done), is counted (and
//! timed, when metrics are on; a failure is published as an `io-error`
//! event), and its reply is queued for the writer.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;

use super::buffers::BufPool;
use super::replies::{Outgoing, ReplyQueue};
use crate::metrics::ResourceMetrics;
use crate::provider::Provider;
use crate::stats::{AtomicRequestStats, RequestKind};
use crate::wire::{Cmd, Reply, Request};

/// I/O threads a session starts with. Writes to one file serialize on its
/// inode lock in the kernel, so more threads buy nothing for buffered
/// writes; a few keep reads, writes and flushes of different ranges going
/// together.
const IO_THREADS: usize = 2;
/// When work waits while every thread has been busy with one request for
/// longer than [`STUCK`] (a slow disk), more threads are started, up to
/// this many, so that no request waits behind a slow one for long.
const IO_THREADS_MAX: usize = 64;
/// See [`IO_THREADS_MAX`].
pub(super) const STUCK: Duration = Duration::from_millis(20);

/// What the I/O threads need besides the requests.
pub(super) struct Context {
    pub provider: Arc<Provider>,
    /// Where the data area starts on the provider.
    pub localoff: u64,
    pub stats: Arc<AtomicRequestStats>,
    /// Where the requests' latency and the local provider's errors go.
    pub metrics: Arc<ResourceMetrics>,
    pub pool: Arc<BufPool>,
    pub replies: Arc<ReplyQueue>,
}

/// One admitted request.
struct Job {
    /// Arrival order within the session.
    id: u64,
    req: Request,
    /// A write's decoded data.
    data: Option<Vec<u8>>,
    /// Held until the I/O is done, even when the session stops meanwhile.
    slot: OwnedSemaphorePermit,
    /// When it was admitted (metrics on).
    since: Option<Instant>,
}

#[derive(Default)]
struct State {
    /// Jobs free to run, in arrival order.
    ready: VecDeque<Job>,
    /// Jobs waiting for an earlier overlapping one, in arrival order.
    parked: Vec<Job>,
    /// Ranges of admitted reads, writes and deletes not yet done.
    ranges: Vec<(u64, u64, u64)>,
    /// The session is gone: threads leave once nothing is left.
    stop: bool,
    /// Threads started, and how many of them wait for work.
    threads: usize,
    idle: usize,
    /// The jobs the threads carry out now, and since when.
    running: Vec<(u64, Instant)>,
}

impl State {
    /// Whether a job may run now: no earlier admitted request overlaps it
    /// (a flush: none at all).
    fn free(&self, job: &Job) -> bool {
        let (off, end) = if job.req.cmd == Cmd::Flush {
            (0, u64::MAX)
        } else {
            (
                job.req.offset,
                job.req.offset.saturating_add(job.req.length),
            )
        };
        !self
            .ranges
            .iter()
            .any(|&(i, s, e)| i < job.id && s < end && off < e)
    }

    /// Work waits while every thread has been stuck on one request for a
    /// while: one more thread should start.
    fn stuck(&self) -> bool {
        !self.ready.is_empty()
            && self.idle == 0
            && self.threads < IO_THREADS_MAX
            && self.running.iter().all(|(_, t)| t.elapsed() >= STUCK)
    }

    /// Admit a job (ids grow in arrival order); whether it is free to run.
    fn admit(&mut self, job: Job) -> bool {
        let req = &job.req;
        if matches!(req.cmd, Cmd::Write | Cmd::Delete | Cmd::Read) {
            self.ranges
                .push((job.id, req.offset, req.offset.saturating_add(req.length)));
        }
        if self.free(&job) {
            self.ready.push_back(job);
            true
        } else {
            self.parked.push(job);
            false
        }
    }

    /// Job `id` is done: the parked jobs it held back are free to run
    /// (earlier first: a parked job passes only the ones it does not
    /// overlap); how many.
    fn done(&mut self, id: u64) -> usize {
        self.ranges.retain(|&(i, _, _)| i != id);
        let mut freed = 0;
        let mut i = 0;
        while i < self.parked.len() {
            if self.free(&self.parked[i]) {
                let job = self.parked.remove(i);
                self.ready.push_back(job);
                freed += 1;
            } else {
                i += 1;
            }
        }
        freed
    }
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    ctx: Context,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The I/O threads of a session. Dropped, the threads finish every
/// admitted request, then leave.
pub(super) struct IoThreads {
    shared: Arc<Shared>,
}

impl IoThreads {
    /// Start the threads; `Err` when none could be started.
    pub(super) fn start(ctx: Context) -> std::io::Result<IoThreads> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            ctx,
        });
        let mut last = None;
        for _ in 0..IO_THREADS {
            if let Err(e) = spawn(&shared) {
                last = Some(e);
            }
        }
        match last {
            Some(e) if lock(&shared.state).threads == 0 => Err(e),
            _ => Ok(IoThreads { shared }),
        }
    }

    /// Admit request number `id` (ids grow in arrival order).
    pub(super) fn admit(
        &self,
        id: u64,
        req: Request,
        data: Option<Vec<u8>>,
        slot: OwnedSemaphorePermit,
    ) {
        let job = Job {
            id,
            req,
            data,
            slot,
            since: self.shared.ctx.metrics.start(),
        };
        if lock(&self.shared.state).admit(job) {
            self.shared.work.notify_one();
        }
    }

    /// Start one more thread if every thread is stuck on a slow request
    /// while work waits (called every [`STUCK`] by the session).
    pub(super) fn grow_if_stuck(&self) {
        if lock(&self.shared.state).stuck() {
            match spawn(&self.shared) {
                Ok(()) => tracing::debug!("the local provider is slow: one more I/O thread"),
                Err(e) => tracing::debug!("no more I/O threads: {e}"),
            }
        }
    }
}

impl Drop for IoThreads {
    fn drop(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.work.notify_all();
    }
}

/// Start one more I/O thread.
fn spawn(shared: &Arc<Shared>) -> std::io::Result<()> {
    let n = {
        let mut st = lock(&shared.state);
        st.threads += 1;
        st.threads
    };
    let s = shared.clone();
    std::thread::Builder::new()
        .name(format!("hast-sec-io{n}"))
        .spawn(move || run(&s))
        .map(drop)
        .inspect_err(|_| lock(&shared.state).threads -= 1)
}

/// An I/O thread: run free jobs until the session is gone and nothing is
/// left.
fn run(shared: &Shared) {
    loop {
        let job = {
            let mut st = lock(&shared.state);
            loop {
                if let Some(job) = st.ready.pop_front() {
                    st.running.push((job.id, Instant::now()));
                    break job;
                }
                if st.stop && st.parked.is_empty() {
                    st.threads -= 1;
                    return;
                }
                st.idle += 1;
                st = shared.work.wait(st).unwrap_or_else(|p| p.into_inner());
                st.idle -= 1;
            }
        };
        let Job {
            id,
            req,
            data,
            slot,
            since,
        } = job;
        // The reply is queued before the requests this one held back may
        // run: a flush is answered after every write received before it.
        shared
            .ctx
            .replies
            .push(carry_out(&shared.ctx, req, data, since));
        let freed = {
            let mut st = lock(&shared.state);
            st.running.retain(|&(i, _)| i != id);
            st.done(id)
        };
        for _ in 0..freed {
            shared.work.notify_one();
        }
        drop(slot);
    }
}

/// One request's I/O, counted, timed (from `since`, its admission) and
/// logged; its reply.
fn carry_out(
    ctx: &Context,
    req: Request,
    data: Option<Vec<u8>>,
    since: Option<Instant>,
) -> Outgoing {
    let at = ctx.localoff.saturating_add(req.offset);
    let (cmd, len) = (req.cmd, req.length);
    let started = (cmd == Cmd::Write).then(|| ctx.metrics.start()).flatten();
    let done = execute(&ctx.provider, &ctx.pool, cmd, at, len, data);
    ctx.metrics.local_write_done(started);
    let (error, out) = match done {
        Ok(out) => (0, out),
        Err(e) => (e.raw_os_error().unwrap_or(libc::EIO), None),
    };
    let kind = match cmd {
        Cmd::Read => RequestKind::Read,
        Cmd::Write => RequestKind::Write,
        Cmd::Delete => RequestKind::Delete,
        _ => RequestKind::Flush,
    };
    ctx.stats.count(kind, error != 0);
    ctx.metrics.request_done(kind, len, since);
    if error != 0 {
        tracing::error!(
            "request failed: {}({}, {len}): errno {error}",
            cmd.name(),
            req.offset
        );
        ctx.metrics
            .local_error(crate::metrics::kind_label(kind), req.offset, len, error);
    }
    Outgoing {
        reply: Reply {
            seq: req.seq,
            received: false,
            error: i16::try_from(error).unwrap_or(libc::EIO as i16),
        },
        data: out,
    }
}

/// One request's local I/O, at provider offset `at`.
/// A write's buffer goes back to `pool`; a read's comes from it.
fn execute(
    provider: &Provider,
    pool: &BufPool,
    cmd: Cmd,
    at: u64,
    len: u64,
    data: Option<Vec<u8>>,
) -> std::io::Result<Option<Vec<u8>>> {
    match cmd {
        Cmd::Read => {
            let len = usize::try_from(len).map_err(std::io::Error::other)?;
            let mut buf = pool.take(len);
            if let Err(e) = provider.read_into_spare(&mut buf, len, at) {
                pool.give(buf);
                return Err(e);
            }
            Ok(Some(buf))
        }
        Cmd::Write => {
            let data = data.ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
            if let Some(e) = crate::failpoint::check(crate::failpoint::SECONDARY_WRITE) {
                pool.give(data);
                return Err(e);
            }
            if crate::failpoint::check(crate::failpoint::SECONDARY_SLOW_WRITE).is_some() {
                std::thread::sleep(crate::failpoint::SECONDARY_SLOW_WRITE_DELAY);
            }
            let written = provider.pwrite(&data, at);
            pool.give(data);
            written?;
            Ok(None)
        }
        Cmd::Delete => {
            provider.delete(at, len)?;
            Ok(None)
        }
        Cmd::Flush => {
            if crate::failpoint::check(crate::failpoint::SECONDARY_SLOW_FLUSH).is_some() {
                std::thread::sleep(crate::failpoint::SECONDARY_SLOW_WRITE_DELAY);
            }
            provider.sync()?;
            Ok(None)
        }
        Cmd::Keepalive => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn write(seq: u64, offset: u64, byte: u8) -> (Request, Option<Vec<u8>>) {
        let req = Request {
            cmd: Cmd::Write,
            seq,
            offset,
            length: 4096,
            memsync: false,
        };
        (req, Some(vec![byte; 4096]))
    }

    use proptest::prelude::*;

    proptest! {
        /// Whatever order the threads finish the jobs they run in, writes
        /// to one block run one at a time in arrival order, and a flush
        /// runs only after every read, write or delete admitted before it.
        #[test]
        fn the_schedule_keeps_arrival_order_where_requests_overlap(
            ops in proptest::collection::vec((0u8..4, 0u64..4), 1..60),
            picks in proptest::collection::vec(any::<usize>(), 200),
        ) {
            let slots = Arc::new(tokio::sync::Semaphore::new(1024));
            let mut st = State::default();
            let mut kinds = Vec::new();
            for (i, &(kind, block)) in ops.iter().enumerate() {
                let id = i as u64 + 1;
                let cmd = match kind {
                    0 => Cmd::Flush,
                    1 => Cmd::Read,
                    _ => Cmd::Write,
                };
                kinds.push((cmd, block));
                let req = Request { cmd, seq: id, offset: block * 4096, length: 4096, memsync: false };
                st.admit(Job { id, req, data: None, slot: slots.clone().try_acquire_owned().unwrap(), since: None });
            }
            // The jobs running now; finish one of them at a time.
            let mut running: Vec<u64> = Vec::new();
            let mut finished: Vec<u64> = Vec::new();
            let mut p = picks.iter().cycle();
            while finished.len() < ops.len() {
                while let Some(job) = st.ready.pop_front() {
                    // What it overlaps that came earlier is finished.
                    let (cmd, block) = kinds[job.id as usize - 1];
                    for earlier in 1..job.id {
                        let (c, b) = kinds[earlier as usize - 1];
                        let overlaps = c != Cmd::Flush && (cmd == Cmd::Flush || b == block);
                        prop_assert!(
                            !overlaps || finished.contains(&earlier),
                            "job {} runs before earlier {} it overlaps", job.id, earlier
                        );
                    }
                    running.push(job.id);
                }
                prop_assert!(!running.is_empty(), "nothing runs, {} parked", st.parked.len());
                let i = p.next().copied().unwrap_or(0) % running.len();
                let id = running.swap_remove(i);
                st.done(id);
                finished.push(id);
            }
            prop_assert!(st.parked.is_empty() && st.ranges.is_empty());
        }
    }

    /// Many overlapping writes admitted at once reach the provider in
    /// arrival order on several threads (the last one's bytes stay), a
    /// flush is answered after every write before it, and every request is
    /// answered once.
    #[test]
    fn overlapping_writes_land_in_arrival_order_and_flushes_follow_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let provider = Arc::new(Provider::open(&path, true).unwrap());
        let replies = Arc::new(ReplyQueue::default());
        let io = IoThreads::start(Context {
            provider: provider.clone(),
            localoff: 0,
            stats: Arc::new(AtomicRequestStats::default()),
            metrics: ResourceMetrics::new("test"),
            pool: Arc::new(BufPool::default()),
            replies: replies.clone(),
        })
        .unwrap();
        let slots = Arc::new(tokio::sync::Semaphore::new(4096));
        let slot = || slots.clone().try_acquire_owned().unwrap();
        let mut id = 0;
        let mut flush_seq = Vec::new();
        for round in 0..200u64 {
            // Block 0 is written by every round, block 1 by every other.
            for (block, every) in [(0u64, 1u64), (1, 2)] {
                if round % every == 0 {
                    id += 1;
                    let (req, data) = write(id, block * 4096, (round % 250) as u8 + 1);
                    io.admit(id, req, data, slot());
                }
            }
            if round % 50 == 49 {
                id += 1;
                let req = Request {
                    cmd: Cmd::Flush,
                    seq: id,
                    offset: 0,
                    length: 0,
                    memsync: false,
                };
                io.admit(id, req, None, slot());
                flush_seq.push(id);
            }
        }
        let total = id;
        let mut got = Vec::new();
        let start = Instant::now();
        while (got.len() as u64) < total && start.elapsed() < Duration::from_secs(30) {
            got.extend(
                std::mem::take(&mut *lock(&replies.queue))
                    .into_iter()
                    .map(|o| {
                        assert_eq!(o.reply.error, 0);
                        o.reply.seq
                    }),
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(got.len() as u64, total, "every request answered once");
        for &f in &flush_seq {
            let at = got.iter().position(|&s| s == f).unwrap();
            let writes_before = (1..f).filter(|s| !flush_seq.contains(s)).count();
            assert_eq!(
                got[..at]
                    .iter()
                    .filter(|&&s| s < f && !flush_seq.contains(&s))
                    .count(),
                writes_before,
                "flush {f} answered before a write received before it"
            );
        }
        let mut buf = vec![0u8; 8192];
        provider.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 200));
        assert!(buf[4096..].iter().all(|&b| b == 199));
        drop(io);
    }
}
