//! uhost: the Linux host of the fast-path core. Client requests arriving
//! through the NBD server are handed to the core ([`crate::core`]), which
//! decides when to issue the local I/O, when the activemap must be written
//! first, and when the client may be answered; this module carries those
//! decisions out on the local provider (positioned I/O on the blocking
//! thread pool, many requests in flight) and writes the map sectors.
//! Upcalls for the engine (replicate, read from the peer, persist the
//! counter bump) are signalled through [`Uhost::upcalls_ready`]. Each
//! request's latency and bytes, the local writes' latency and the local
//! provider's errors go to the resource's [`ResourceMetrics`] (atomics; a
//! clock read per request only while metrics are on).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{oneshot, Notify};

use crate::core::{Core, CoreError, CoreHost, IoCmd, LocalIo, Mode, Params};
use crate::metadata::METADATA_SIZE;
use crate::metrics::ResourceMetrics;
use crate::nbd::{Backend, BoxFuture, Done, FileBackend, FileOptions, NbdError};
use crate::provider::Provider;
use crate::stats::RequestKind;

/// Where a provider's replicated data lives and how it is replicated.
#[derive(Debug, Clone)]
pub struct HostGeometry {
    /// Offset of the data area in the provider (metadata + map before it).
    pub localoff: u64,
    /// Bytes of the data area.
    pub datasize: u64,
    pub extentsize: u32,
    pub sectorsize: u32,
    pub keepdirty: u32,
    pub mode: Mode,
    /// Flush the provider after every map write (hast.conf `metaflush`).
    pub metaflush: bool,
}

/// Failure to set up a host.
#[derive(Debug, thiserror::Error)]
pub enum UhostError {
    #[error("{0}")]
    Open(#[from] NbdError),
    #[error("{0}")]
    Core(#[from] CoreError),
}

/// How long [`Uhost::close`] waits for the core's callbacks in flight.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// Largest request handed to the core until a peer says what it accepts.
pub const DEFAULT_MAX_REQUEST: u64 = crate::wire::MAX_IO;

/// What a client request needs while the core holds it.
#[derive(Debug)]
enum Op {
    Read,
    Write { data: Bytes, fua: bool },
    Zeroes { no_hole: bool, fua: bool },
    Delete { fua: bool },
    Flush,
}

/// The answer to a client request.
type Answer = Result<Option<Vec<u8>>, i32>;

/// Who waits for a request's answer.
#[derive(Debug)]
enum Waiter {
    /// A task of this module (split or FUA requests, flushes, trims).
    Task(oneshot::Sender<Answer>),
    /// The NBD client, answered straight from [`CoreHost::complete`]:
    /// no task and no wake-up between the core's decision and the reply.
    Client(Done),
}

#[derive(Debug)]
struct Pending {
    op: Op,
    /// Data read locally (or from the peer) for a read.
    read: Option<Vec<u8>>,
    answer: Option<Waiter>,
    /// Bytes the request covers, and when it reached the core (metrics on).
    bytes: u64,
    since: Option<Instant>,
}

impl Op {
    /// The kind of request the core counts it as.
    fn kind(&self) -> RequestKind {
        match self {
            Op::Read => RequestKind::Read,
            Op::Write { .. } | Op::Zeroes { .. } => RequestKind::Write,
            Op::Delete { .. } => RequestKind::Delete,
            Op::Flush => RequestKind::Flush,
        }
    }
}

/// A resynchronization I/O's buffer.
#[derive(Debug)]
enum SyncBuf {
    /// Read into here (None until done).
    Read(Option<Vec<u8>>),
    /// Write these bytes.
    Write(Bytes),
}

/// A client read or write for the I/O threads.
enum Job {
    Read {
        seq: u64,
        cookie: u64,
        off: u64,
        len: u32,
    },
    Write {
        seq: u64,
        off: u64,
        data: Bytes,
    },
}

/// Most I/O threads one host runs.
const MAX_IO_THREADS: usize = 32;

/// A thread that started its job less than this long ago is taken to be
/// on the CPU and soon free for the next job; one busy for longer may be
/// waiting for the disk, and queued jobs wake another thread instead.
const FRESH_JOB: Duration = Duration::from_micros(200);

#[derive(Default)]
struct PoolState {
    jobs: VecDeque<Job>,
    /// Threads started and not yet gone.
    threads: usize,
    /// Per thread (by start order): since when it runs its current job.
    busy: Vec<Option<Instant>>,
    /// Threads waiting for work that nobody has woken yet.
    sleeping: usize,
    /// Wake-ups sent and not yet taken by a thread.
    woken: usize,
    closed: bool,
}

#[derive(Default)]
struct PoolShared {
    state: Mutex<PoolState>,
    cv: Condvar,
}

/// The I/O threads of one host: buffered positioned reads and writes of
/// client requests, fed through one queue. A thread is woken (or started)
/// only when more jobs wait than awake threads will soon take (idle ones,
/// and busy ones whose job started under [`FRESH_JOB`] ago), so under load
/// the awake threads go from one job to the next without a futex wake-up
/// and sleep per request (what a `spawn_blocking` per request costs), and
/// about as many run as there are CPUs to run them. Threads whose jobs wait
/// for the disk stop counting once those jobs are older than
/// [`FRESH_JOB`], so queued jobs wake more threads, up to
/// [`MAX_IO_THREADS`].
struct IoPool {
    shared: Arc<PoolShared>,
}

impl IoPool {
    fn lock(shared: &PoolShared) -> MutexGuard<'_, PoolState> {
        shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue a job; `host` is what the threads run it on.
    fn push(&self, job: Job, host: &Weak<Inner>) {
        let mut st = Self::lock(&self.shared);
        st.jobs.push_back(job);
        let now = Instant::now();
        let (mut busy, mut fresh) = (0usize, 0usize);
        for since in st.busy.iter().flatten() {
            busy += 1;
            if now.saturating_duration_since(*since) < FRESH_JOB {
                fresh += 1;
            }
        }
        let idle = st.threads.saturating_sub(st.sleeping).saturating_sub(busy);
        if st.jobs.len() <= idle + fresh {
            return;
        }
        if st.sleeping > 0 {
            st.sleeping -= 1;
            st.woken += 1;
            drop(st);
            self.shared.cv.notify_one();
            return;
        }
        if st.threads >= MAX_IO_THREADS {
            return;
        }
        let index = st.threads;
        st.threads += 1;
        if st.busy.len() < st.threads {
            st.busy.push(None);
        }
        let shared = Arc::clone(&self.shared);
        let thread_host = host.clone();
        let started = std::thread::Builder::new()
            .name("hast-io".into())
            .spawn(move || io_thread(&shared, &thread_host, index));
        if let Err(e) = started {
            st.threads -= 1;
            if st.threads == 0 {
                // Nobody would ever take the queued jobs: fail them.
                let jobs: Vec<Job> = st.jobs.drain(..).collect();
                drop(st);
                tracing::error!("cannot start an I/O thread: {e}");
                if let Some(me) = host.upgrade() {
                    for job in jobs {
                        let seq = match job {
                            Job::Read { seq, .. } | Job::Write { seq, .. } => seq,
                        };
                        me.local_done(seq, libc::EAGAIN);
                    }
                }
            }
        }
    }
}

impl Drop for IoPool {
    /// The threads finish the queued jobs and leave.
    fn drop(&mut self) {
        Self::lock(&self.shared).closed = true;
        self.shared.cv.notify_all();
    }
}

/// I/O thread number `index`: run queued jobs, sleep when there are none.
fn io_thread(shared: &PoolShared, host: &Weak<Inner>, index: usize) {
    let mut st = IoPool::lock(shared);
    loop {
        if let Some(job) = st.jobs.pop_front() {
            if let Some(slot) = st.busy.get_mut(index) {
                *slot = Some(Instant::now());
            }
            drop(st);
            if let Some(me) = host.upgrade() {
                me.run_job(job);
            }
            st = IoPool::lock(shared);
            if let Some(slot) = st.busy.get_mut(index) {
                *slot = None;
            }
            continue;
        }
        if st.closed {
            st.threads = st.threads.saturating_sub(1);
            return;
        }
        st.sleeping += 1;
        loop {
            st = shared.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            if st.woken > 0 {
                st.woken -= 1;
                break;
            }
            if st.closed {
                st.sleeping = st.sleeping.saturating_sub(1);
                break;
            }
        }
    }
}

struct Inner {
    /// This host, for the tasks its callbacks spawn.
    me: Weak<Inner>,
    local: FileBackend,
    metaflush: bool,
    core: OnceLock<Weak<Core>>,
    pending: Mutex<HashMap<u64, Pending>>,
    /// Resynchronization I/O by cookie: the data to write, or what was read.
    sync: Mutex<HashMap<u64, SyncBuf>>,
    next_cookie: AtomicU64,
    rt: tokio::runtime::Handle,
    upcalls: Notify,
    link_up: AtomicBool,
    /// Largest READ/WRITE handed to the core: what the peer accepts.
    max_request: AtomicU64,
    size: u64,
    sectorsize: u32,
    /// Threads for client reads and non-FUA writes.
    pool: IoPool,
    metrics: Arc<ResourceMetrics>,
}

/// One primary provider served through the core.
pub struct Uhost {
    inner: Arc<Inner>,
    core: Arc<Core>,
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn core_errno(e: &CoreError) -> i32 {
    match e {
        CoreError::Invalid(_) => libc::EINVAL,
        CoreError::NoMemory(_) => libc::ENOMEM,
        _ => libc::EIO,
    }
}

impl Inner {
    fn core(&self) -> Option<Arc<Core>> {
        self.core.get().and_then(Weak::upgrade)
    }

    fn with_pending<T>(&self, cookie: u64, f: impl FnOnce(&mut Pending) -> T) -> Option<T> {
        let mut table = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        table.get_mut(&cookie).map(f)
    }

    /// Run one client read or write on the calling I/O thread.
    fn run_job(&self, job: Job) {
        match job {
            Job::Read {
                seq,
                cookie,
                off,
                len,
            } => {
                let result = match crate::failpoint::check(crate::failpoint::PRIMARY_READ) {
                    Some(e) => Err(e),
                    None => self.local.read_now(off, len).map(|buf| {
                        self.with_pending(cookie, |p| p.read = Some(buf));
                    }),
                };
                let error = result.as_ref().map_or_else(errno, |()| 0);
                self.io_done(seq, "read", off, u64::from(len), error);
            }
            Job::Write { seq, off, data } => {
                if crate::failpoint::check(crate::failpoint::PRIMARY_JITTER).is_some() {
                    let max = crate::failpoint::PRIMARY_JITTER_MAX.as_micros() as u64;
                    std::thread::sleep(Duration::from_micros(rand::random::<u64>() % max));
                }
                let since = self.metrics.start();
                let result = self.local.write_now(off, &data, false);
                self.metrics.local_write_done(since);
                let error = result.as_ref().map_or_else(errno, |()| 0);
                self.io_done(seq, "write", off, data.len() as u64, error);
            }
        }
    }

    /// A local I/O of `op` (`len` bytes at data offset `off`) for seq
    /// ended with `error`: an `io-error` event when it failed, then the
    /// core hears of it.
    fn io_done(&self, seq: u64, op: &'static str, off: u64, len: u64, error: i32) {
        if error != 0 {
            self.metrics.local_error(op, off, len, error);
        }
        self.local_done(seq, error);
    }

    fn local_done(&self, seq: u64, error: i32) {
        if let Some(core) = self.core() {
            if let Err(e) = core.local_done(seq, error) {
                tracing::error!("local completion of seq {seq} refused: {e}");
            }
        }
    }
}

impl Inner {
    /// A resynchronization I/O: read into, or write from, its sync buffer.
    fn sync_io(&self, io: LocalIo, len: u32) {
        let write = {
            let table = self.sync.lock().unwrap_or_else(|p| p.into_inner());
            match table.get(&io.cookie) {
                Some(SyncBuf::Write(data)) => Some(Some(data.clone())),
                Some(SyncBuf::Read(_)) => Some(None),
                None => None,
            }
        };
        let (Some(write), Some(me)) = (write, self.me.upgrade()) else {
            self.local_done(io.seq, libc::EINVAL);
            return;
        };
        self.rt.spawn(async move {
            let op = if write.is_some() { "write" } else { "read" };
            let result = match write {
                Some(data) => me.local.write_bytes(io.offset, data, false).await,
                None => match me.local.read(io.offset, len).await {
                    Ok(buf) => {
                        let mut table = me.sync.lock().unwrap_or_else(|p| p.into_inner());
                        table.insert(io.cookie, SyncBuf::Read(Some(buf)));
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
            };
            let error = result.as_ref().map_or_else(errno, |()| 0);
            me.io_done(io.seq, op, io.offset, u64::from(len), error);
        });
    }
}

impl CoreHost for Inner {
    fn local_io(&self, io: LocalIo) {
        let Some(core) = self.core() else { return };
        let Ok(len) = u32::try_from(io.length) else {
            let _ = core.local_done(io.seq, libc::EINVAL);
            return;
        };
        if io.sync {
            self.sync_io(io, len);
            return;
        }
        if io.internal {
            // The core's own flush: no client behind it.
            let Some(me) = self.me.upgrade() else { return };
            self.rt.spawn(async move {
                let result = me.local.flush().await;
                let error = result.as_ref().map_or_else(errno, |()| 0);
                me.io_done(io.seq, "flush", 0, 0, error);
            });
            return;
        }
        let op = self.with_pending(io.cookie, |p| match &p.op {
            Op::Read => Op::Read,
            Op::Write { data, fua } => Op::Write {
                data: data.clone(),
                fua: *fua,
            },
            Op::Zeroes { no_hole, fua } => Op::Zeroes {
                no_hole: *no_hole,
                fua: *fua,
            },
            Op::Delete { fua } => Op::Delete { fua: *fua },
            Op::Flush => Op::Flush,
        });
        let Some(op) = op else {
            let _ = core.local_done(io.seq, libc::EINVAL);
            return;
        };
        // Reads and plain writes go to the I/O threads; a FUA write waits
        // for the disk, so it gets a blocking-pool thread of its own.
        let op = match op {
            Op::Read => {
                let job = Job::Read {
                    seq: io.seq,
                    cookie: io.cookie,
                    off: io.offset,
                    len,
                };
                self.pool.push(job, &self.me);
                return;
            }
            Op::Write { data, fua: false } => {
                let job = Job::Write {
                    seq: io.seq,
                    off: io.offset,
                    data,
                };
                self.pool.push(job, &self.me);
                return;
            }
            other => other,
        };
        let Some(me) = self.me.upgrade() else { return };
        if let Op::Write { data, .. } = op {
            self.rt.spawn_blocking(move || {
                let since = me.metrics.start();
                let result = me.local.write_now(io.offset, &data, true);
                me.metrics.local_write_done(since);
                let error = result.as_ref().map_or_else(errno, |()| 0);
                me.io_done(io.seq, "write", io.offset, data.len() as u64, error);
            });
            return;
        }
        self.rt.spawn(async move {
            let name = match op {
                Op::Read => "read",
                Op::Write { .. } | Op::Zeroes { .. } => "write",
                Op::Delete { .. } => "delete",
                Op::Flush => "flush",
            };
            let result = match op {
                Op::Read | Op::Write { .. } => Ok(()),
                Op::Zeroes { no_hole, fua } => {
                    me.local.write_zeroes(io.offset, len, no_hole, fua).await
                }
                Op::Delete { fua } => me.local.trim(io.offset, len, fua).await,
                Op::Flush => me.local.flush().await,
            };
            let error = result.as_ref().map_or_else(errno, |()| 0);
            me.io_done(io.seq, name, io.offset, u64::from(len), error);
        });
    }

    fn map_write(&self, map: &[u8]) {
        let Some(me) = self.me.upgrade() else { return };
        let map = map.to_vec();
        self.rt.spawn_blocking(move || {
            // With metaflush the map sectors must be durable before the data
            // writes they cover: make this write durable (RWF_DSYNC) rather
            // than flushing every dirty page of the provider.
            let provider = me.local.provider();
            let r = if me.metaflush {
                provider.write_durable(&map, METADATA_SIZE)
            } else {
                provider.pwrite(&map, METADATA_SIZE)
            };
            let error = match &r {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("unable to write the activemap: {e}");
                    errno(e)
                }
            };
            if let Some(core) = me.core() {
                if let Err(e) = core.map_done(error) {
                    tracing::error!("map write completion refused: {e}");
                }
            }
        });
    }

    fn complete(&self, cookie: u64, error: i32) {
        let answer = {
            let mut table = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            table.get_mut(&cookie).and_then(|p| {
                let read = p.read.take();
                let timed = p.since.take().map(|t| (p.op.kind(), p.bytes, t));
                p.answer.take().map(|tx| (tx, read, timed))
            })
        };
        let answer = answer.map(|(tx, read, timed)| {
            if let Some((kind, bytes, since)) = timed {
                self.metrics.request_done(kind, bytes, Some(since));
            }
            (tx, read)
        });
        match answer {
            Some((Waiter::Task(tx), read)) => {
                let _ = tx.send(if error == 0 { Ok(read) } else { Err(error) });
            }
            Some((Waiter::Client(done), read)) => done.finish(if error == 0 {
                Ok(read)
            } else {
                Err(io::Error::from_raw_os_error(error))
            }),
            None => {}
        }
    }

    fn release(&self, cookie: u64) {
        let mut table = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        table.remove(&cookie);
    }

    fn notify(&self) {
        self.upcalls.notify_one();
    }
}

impl Uhost {
    /// Start a core for the open local provider (the descriptor hastd
    /// locked; data and activemap go through it). Must run inside a tokio
    /// runtime. The activemap read from disk (`map`) becomes the core's
    /// dirty and sync map.
    pub fn new(
        provider: Arc<Provider>,
        geo: &HostGeometry,
        map: &[u8],
        metrics: Arc<ResourceMetrics>,
    ) -> Result<Uhost, UhostError> {
        let local = FileBackend::on(
            provider,
            &FileOptions {
                offset: geo.localoff,
                size: Some(geo.datasize),
                block_size: Some(geo.sectorsize),
                read_only: false,
            },
        )?;
        let inner = Arc::new_cyclic(|me| Inner {
            me: me.clone(),
            local,
            metaflush: geo.metaflush,
            core: OnceLock::new(),
            pending: Mutex::new(HashMap::new()),
            sync: Mutex::new(HashMap::new()),
            next_cookie: AtomicU64::new(1),
            rt: tokio::runtime::Handle::current(),
            upcalls: Notify::new(),
            link_up: AtomicBool::new(false),
            max_request: AtomicU64::new(DEFAULT_MAX_REQUEST),
            size: geo.datasize,
            sectorsize: geo.sectorsize,
            pool: IoPool {
                shared: Arc::new(PoolShared::default()),
            },
            metrics,
        });
        let core = Arc::new(Core::new(
            Params {
                mediasize: geo.datasize,
                extentsize: geo.extentsize,
                sectorsize: geo.sectorsize,
                keepdirty: geo.keepdirty,
                mode: geo.mode,
            },
            inner.clone(),
        )?);
        core.map_load(map)?;
        let _ = inner.core.set(Arc::downgrade(&core));
        Ok(Uhost { inner, core })
    }

    /// The core, for the engine (upcalls, link state, statistics).
    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Wait until the core has queued upcalls (then drain
    /// [`Core::next_upcall`]).
    pub async fn upcalls_ready(&self) {
        self.inner.upcalls.notified().await;
    }

    /// The largest READ/WRITE the peer accepts; larger client requests are
    /// split before they reach the core.
    pub fn set_max_request(&self, bytes: u64) {
        let b = bytes.max(u64::from(self.inner.sectorsize)) / u64::from(self.inner.sectorsize)
            * u64::from(self.inner.sectorsize);
        self.inner.max_request.store(b, Ordering::SeqCst);
    }

    /// Split `[off, off + len)` into pieces no larger than the maximum.
    fn pieces(&self, off: u64, len: u64) -> Vec<(u64, u64)> {
        crate::split::pieces(off, len, self.inner.max_request.load(Ordering::SeqCst)).collect()
    }

    /// Tell the core (and the FUA logic) whether the peer is connected.
    pub fn set_link(&self, up: bool) {
        self.inner.link_up.store(up, Ordering::SeqCst);
        self.core.set_link(up);
    }

    /// Put the peer's answer to a read upcall in place before
    /// [`Core::remote_done`].
    pub fn set_read_data(&self, cookie: u64, data: Vec<u8>) {
        self.inner.with_pending(cookie, |p| p.read = Some(data));
    }

    /// The data of a write upcall (zeros for a write-zeroes), to send to the
    /// peer.
    pub fn write_data(&self, cookie: u64, length: u64) -> Option<Bytes> {
        self.inner.with_pending(cookie, |p| match &p.op {
            Op::Write { data, .. } => Some(data.clone()),
            Op::Zeroes { .. } => usize::try_from(length)
                .ok()
                .map(|n| Bytes::from(vec![0u8; n])),
            _ => None,
        })?
    }

    /// Under granted sync lock `lock`, read `len` bytes at `off` from the
    /// local provider. Returns the I/O's cookie; when the core reports it
    /// done (`SyncIoDone` upcall with that cookie) take the bytes with
    /// [`Uhost::take_sync`].
    pub fn sync_read(&self, lock: u64, off: u64, len: u64) -> Result<u64, CoreError> {
        self.sync_submit(lock, IoCmd::Read, off, len, SyncBuf::Read(None))
    }

    /// Under granted sync lock `lock`, write `data` at `off` locally.
    pub fn sync_write(&self, lock: u64, off: u64, data: Bytes) -> Result<u64, CoreError> {
        let len = data.len() as u64;
        self.sync_submit(lock, IoCmd::Write, off, len, SyncBuf::Write(data))
    }

    fn sync_submit(
        &self,
        lock: u64,
        cmd: IoCmd,
        off: u64,
        len: u64,
        buf: SyncBuf,
    ) -> Result<u64, CoreError> {
        let cookie = self.inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        self.inner
            .sync
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cookie, buf);
        match self.core.sync_io(lock, cmd, off, len, cookie) {
            Ok(_seq) => Ok(cookie),
            Err(e) => {
                self.take_sync(cookie);
                Err(e)
            }
        }
    }

    /// Forget a finished sync I/O; the bytes it read, if it was a read.
    pub fn take_sync(&self, cookie: u64) -> Option<Vec<u8>> {
        match self
            .inner
            .sync
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&cookie)
        {
            Some(SyncBuf::Read(data)) => data,
            _ => None,
        }
    }

    /// Put a request in the table and hand it to the core; `Err` when the
    /// core refused it (it is out of the table again then).
    fn start(&self, cmd: IoCmd, off: u64, len: u64, op: Op, answer: Waiter) -> Result<(), i32> {
        let cookie = self.inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        {
            let mut table = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
            table.insert(
                cookie,
                Pending {
                    op,
                    read: None,
                    answer: Some(answer),
                    bytes: len,
                    since: self.inner.metrics.start(),
                },
            );
        }
        if let Err(e) = self.core.submit(cmd, off, len, cookie) {
            self.inner.release(cookie);
            return Err(core_errno(&e));
        }
        Ok(())
    }

    /// Hand a request to the core and wait for its answer.
    async fn submit(&self, cmd: IoCmd, off: u64, len: u64, op: Op) -> Answer {
        let (tx, rx) = oneshot::channel();
        self.start(cmd, off, len, op, Waiter::Task(tx))?;
        rx.await.unwrap_or(Err(libc::EIO))
    }

    /// Hand a client request that fits in one core request to the core;
    /// [`CoreHost::complete`] answers the client.
    fn start_direct(&self, cmd: IoCmd, off: u64, len: u64, op: Op, done: Done) {
        let table = &self.inner.pending;
        let cookie = self.inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        table.lock().unwrap_or_else(|p| p.into_inner()).insert(
            cookie,
            Pending {
                op,
                read: None,
                answer: Some(Waiter::Client(done)),
                bytes: len,
                since: self.inner.metrics.start(),
            },
        );
        if let Err(e) = self.core.submit(cmd, off, len, cookie) {
            let refused = table
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&cookie);
            if let Some(Pending {
                answer: Some(Waiter::Client(done)),
                ..
            }) = refused
            {
                done.finish(Err(io::Error::from_raw_os_error(core_errno(&e))));
            }
        }
    }

    /// True when a request of `len` bytes goes to the core in one piece.
    fn one_piece(&self, len: u64) -> bool {
        len <= self.inner.max_request.load(Ordering::Relaxed)
    }

    async fn submit_io(
        &self,
        cmd: IoCmd,
        off: u64,
        len: u64,
        op: Op,
    ) -> io::Result<Option<Vec<u8>>> {
        self.submit(cmd, off, len, op)
            .await
            .map_err(io::Error::from_raw_os_error)
    }

    /// A FUA request is durable locally when it completes; while the peer is
    /// connected a flush makes it durable there too.
    async fn fua_flush(&self, fua: bool) -> io::Result<()> {
        if fua && self.inner.link_up.load(Ordering::SeqCst) {
            self.submit_io(IoCmd::Flush, 0, 0, Op::Flush).await?;
        }
        Ok(())
    }

    /// Fail every request still waiting and stop the core. Call after the
    /// NBD export is stopped (no new requests) and in-flight I/O finished.
    /// The callbacks still running (an I/O thread completing its last
    /// request, a map write) let go of the core first: waited for up to
    /// [`CLOSE_WAIT`].
    pub async fn close(self) {
        let Uhost { inner, core } = self;
        let start = std::time::Instant::now();
        while Arc::strong_count(&core) > 1 && start.elapsed() < CLOSE_WAIT {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        match Arc::try_unwrap(core) {
            Ok(core) => {
                if let Err((_, e)) = core.close() {
                    tracing::warn!("core still busy at close: {e}");
                }
            }
            Err(_) => tracing::warn!(
                "core still referenced at close after {} s",
                CLOSE_WAIT.as_secs()
            ),
        }
        drop(inner);
    }
}

impl Backend for Uhost {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn start_read(self: Arc<Self>, off: u64, len: u32, done: Done) {
        if self.one_piece(u64::from(len)) {
            self.start_direct(IoCmd::Read, off, u64::from(len), Op::Read, done);
        } else {
            tokio::spawn(async move { done.finish(self.read(off, len).await.map(Some)) });
        }
    }

    fn start_write(self: Arc<Self>, off: u64, data: Vec<u8>, fua: bool, done: Done) {
        let len = data.len() as u64;
        // A FUA write may need a flush of the peer after it: that waits in
        // a task.
        if !fua && self.one_piece(len) {
            let op = Op::Write {
                data: Bytes::from(data),
                fua,
            };
            self.start_direct(IoCmd::Write, off, len, op, done);
        } else {
            tokio::spawn(async move {
                done.finish(self.write(off, data, fua).await.map(|()| None));
            });
        }
    }

    fn block_size(&self) -> u32 {
        self.inner.sectorsize
    }

    fn read(&self, off: u64, len: u32) -> BoxFuture<'_, io::Result<Vec<u8>>> {
        Box::pin(async move {
            let parts = self.pieces(off, u64::from(len));
            if parts.len() == 1 {
                let data = self
                    .submit_io(IoCmd::Read, off, u64::from(len), Op::Read)
                    .await?;
                return data.ok_or_else(|| io::Error::from_raw_os_error(libc::EIO));
            }
            let reads = parts
                .iter()
                .map(|&(at, n)| self.submit_io(IoCmd::Read, at, n, Op::Read));
            let mut out = Vec::with_capacity(len as usize);
            for r in join_all(reads).await {
                out.extend_from_slice(&r?.ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))?);
            }
            Ok(out)
        })
    }

    fn write(&self, off: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let data = Bytes::from(data);
            let writes = self
                .pieces(off, data.len() as u64)
                .into_iter()
                .map(|(at, n)| {
                    let start = (at - off) as usize;
                    let piece = data.slice(start..start + n as usize);
                    self.submit_io(IoCmd::Write, at, n, Op::Write { data: piece, fua })
                });
            for r in join_all(writes).await {
                r?;
            }
            self.fua_flush(fua).await
        })
    }

    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.submit_io(IoCmd::Flush, 0, 0, Op::Flush).await?;
            Ok(())
        })
    }

    fn trim(&self, off: u64, len: u32, fua: bool) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.submit_io(IoCmd::Delete, off, u64::from(len), Op::Delete { fua })
                .await?;
            self.fua_flush(fua).await
        })
    }

    fn write_zeroes(
        &self,
        off: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let zeroes = self
                .pieces(off, u64::from(len))
                .into_iter()
                .map(|(at, n)| self.submit_io(IoCmd::Write, at, n, Op::Zeroes { no_hole, fua }));
            for r in join_all(zeroes).await {
                r?;
            }
            self.fua_flush(fua).await
        })
    }
}

/// Run futures concurrently and collect their outputs in order.
async fn join_all<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.map(|f| Some(Box::pin(f))).collect();
    let mut outs: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (slot, out) in futs.iter_mut().zip(outs.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *out = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outs.into_iter().flatten().collect()
}
