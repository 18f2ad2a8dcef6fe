/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * hast_core.h: the portable fast path of HAST.
 *
 * One core instance serves one replicated provider on the primary.  It owns
 * the in-memory activemap (pending-write counts per extent, memmap, diskmap,
 * syncmap, the keepdirty MRU list), group-committed map writes, the range
 * locks between resynchronization and regular writes, the request table
 * (by seq), the acknowledgement rule of each replication mode, the link
 * state and the synchronization direction.  It never touches data and never
 * blocks: every entry point returns at once, and decisions come back later
 * through the host's callbacks (struct hast_core_ops) and through the upcall
 * queue that the engine drains (hast_core_upcall_next()).
 *
 * Hosts: the FreeBSD GEOM glue (kmod/g_hast.c) and uhost (userland NBD
 * server, through hast-sys).  The file needs nothing but hast_shim.h and
 * hast_abi.h.
 *
 * Life of a regular write (or delete):
 *  1. hast_core_submit() -> seq.  The write waits while
 *     - a sync range lock overlapping it is held or waiting,
 *     - one of its extents is not yet marked on disk (or the map write in
 *       flight is about to clear it): a map write is issued
 *       (hco_map_write) and every write arriving while it is in flight waits
 *       for the next one; hast_core_map_done() releases all of them at once,
 *     - the link is down and this outage's localcnt bump is not persisted
 *       (the first such write queues HAST_UP_BUMP; hast_core_bump_done()),
 *     - an earlier write or delete overlapping it has not finished its
 *       local half: overlapping updates reach the local provider in the
 *       order they were submitted, whatever order the host runs I/Os in;
 *       their remote halves leave in the same order and the secondary
 *       applies overlapping requests in arrival order, so both copies end
 *       with the later data.
 *  2. The core issues the local half (hco_local_io) and, when the link is
 *     up, queues the remote half (HAST_UP_WRITE/DELETE) for the engine.
 *  3. hast_core_local_done(), hast_core_remote_received() and
 *     hast_core_remote_done() complete the halves.  hco_complete delivers
 *     the client's answer as soon as the mode's rule holds:
 *         fullsync: local done and remote done,
 *         memsync:  local done and remote received,
 *         async:    local done (the engine sends remote copies in the
 *                   order of the upcall queue).
 *     A remote failure, a lost link or a write never sent counts as remote
 *     "done" for the rule, and its extents stay dirty in the syncmap and on
 *     disk.  A "received" followed by a remote error or a lost link no
 *     longer counts.  A write whose only good copy is local is answered
 *     only once the current outage's localcnt bump is persisted (so a
 *     promoted peer cannot silently win over acknowledged data).  A local
 *     failure waits for the remote result; the client sees success when the
 *     remote copy succeeded (the local copy is marked for repair) and the
 *     local error otherwise.
 *  4. When both halves are finished hco_release tells the host that the
 *     core no longer refers to the request's cookie (data must stay valid
 *     until then: in async mode the engine may still send it after the ack).
 *  5. An extent both copies wrote stays marked (hc_ufmap) until a flush of
 *     both sides that started after the write finished has succeeded: a
 *     client's flush, or the core's own (hast_core_flush), which the engine
 *     asks for by time and by bytes written.  Either copy may hold the
 *     data only in a volatile cache until then; a node that loses power
 *     finds the extent still marked and it is resynchronized.  When the
 *     link goes down such extents join the syncmap.  A resync chunk's
 *     extent follows the same rule after its lock is released.
 *
 * Map writes: the bitmap written is memmap | keepdirty list | syncmap |
 * extents awaiting a flush of both sides.  It
 * is written when an extent must become marked, and lazily when an idle
 * extent leaves it (keepdirty eviction, a finished write outside the list,
 * a cleared sync range); a write that would change nothing is skipped.
 *
 * Reads go to the local disk unless the local copy is stale (direction
 * HAST_SYNC_FROM_PEER and the extent is in the syncmap) or the local read
 * fails; then HAST_UP_READ asks the engine to read from the peer.  Flushes
 * go to both sides (remote part only with the link up) and are acknowledged
 * like writes, except that async does not wait for the peer.
 *
 * Locking and callbacks: one mutex (hast_shim_lock) protects the instance;
 * every entry point takes it, none sleeps.  Callbacks are never called with
 * that mutex held: the core queues them, and the thread that is inside the
 * core runs them in order after dropping the lock (only one thread at a time
 * does so; others return at once and leave their work to it).  Callbacks may
 * therefore call back into the core (for example complete a local I/O from
 * inside hco_local_io) but must not sleep.  Entry points may be called from
 * any thread.
 *
 * Error values: the core passes errno values from the host through unchanged.
 * Those it makes itself are the HAST_E* below, whose numbers are the same on
 * FreeBSD and Linux.
 */

#ifndef _HAST_CORE_H_
#define	_HAST_CORE_H_

#include "hast_abi.h"

#define	HAST_ENOENT	2	/* no such seq (unknown or already finished) */
#define	HAST_EIO	5	/* data unavailable, map or counter write failed */
#define	HAST_ENOMEM	12	/* allocation failed (transient) */
#define	HAST_EBUSY	16	/* object still in use */
#define	HAST_EINVAL	22	/* bad argument */

/*
 * An extent written on both sides leaves the map only once this many
 * flushes of both sides have started after its last write and the last of
 * them finished: a hot extent costs no map write per request.
 */
#define	HAST_HOT_FLUSHES	8

/* hio_flags of a local I/O */
#define	HAST_IOF_SYNC	0x00000001	/* resync I/O (hast_core_sync_io) */
#define	HAST_IOF_INTERNAL 0x00000002	/* the core's own flush: no cookie,
					   no hco_complete/hco_release */

struct hast_core;

struct hast_core_params {
	uint64_t	hcp_mediasize;	/* replicated bytes (datasize), > 0 */
	uint32_t	hcp_extentsize;	/* power of two, >= hcp_sectorsize */
	uint32_t	hcp_sectorsize;	/* power of two */
	uint32_t	hcp_keepdirty;	/* idle extents kept marked (MRU bound) */
	uint32_t	hcp_mode;	/* HAST_REPL_* */
};

/* A local I/O for the host to issue; offsets are in the data area. */
struct hast_core_io {
	uint64_t	hio_seq;	/* answer with hast_core_local_done(seq) */
	uint64_t	hio_offset;
	uint64_t	hio_length;	/* 0 for a flush */
	uint64_t	hio_cookie;	/* the submitter's cookie */
	uint32_t	hio_cmd;	/* HAST_CMD_* */
	uint32_t	hio_flags;	/* HAST_IOF_* */
};

/*
 * Host callbacks; arg is the host's pointer given to hast_core_create().
 * All are called without the core's lock held and must not sleep.
 *
 * hco_local_io: issue this I/O on the local provider; answer with
 *	hast_core_local_done(io->hio_seq, error) (possibly from inside).
 * hco_map_write: write size bytes at the activemap area (then flush when
 *	metaflush is on) and answer with hast_core_map_done().  map stays valid
 *	and unchanged until then; at most one map write is in flight.
 * hco_complete: answer the client request cookie with error (0 = success).
 *	Called exactly once per accepted request.
 * hco_release: the core is done with cookie (always after hco_complete).
 *	May be NULL.
 * hco_notify: the upcall queue became non-empty.  May be NULL; then the
 *	core calls hast_shim_wakeup() on the instance pointer.
 */
struct hast_core_ops {
	void	(*hco_local_io)(void *arg, const struct hast_core_io *io);
	void	(*hco_map_write)(void *arg, const uint8_t *map, uint32_t size);
	void	(*hco_complete)(void *arg, uint64_t cookie, int32_t error);
	void	(*hco_release)(void *arg, uint64_t cookie);
	void	(*hco_notify)(void *arg);
};

/*
 * Create an instance.  Link down, direction HAST_SYNC_NONE, all maps clean,
 * and a localcnt bump owed before the first write (as after a link loss).
 * Returns 0 and *corep, HAST_EINVAL for bad parameters (sizes not powers of
 * two, extentsize < sectorsize, mediasize 0, unknown mode, a missing
 * callback) or HAST_ENOMEM.  ops and arg must outlive the instance.
 */
int	hast_core_create(const struct hast_core_params *params,
	    const struct hast_core_ops *ops, void *arg, struct hast_core **corep);

/*
 * Destroy an idle instance.  Returns HAST_EBUSY (and destroys nothing)
 * while a request, sync lock, sync I/O, map write, queued upcall or
 * callback, or an unanswered HAST_UP_BUMP exists; the host and the engine
 * must finish or fail them first.
 */
int	hast_core_destroy(struct hast_core *hc);

/*
 * Hand a client request to the core.  cmd is HAST_CMD_*; offset and length
 * must be multiples of the sector size inside the media (length > 0), except
 * for a flush, whose offset and length must be 0.  On success returns 0,
 * stores the request's seq (never 0, increasing) and guarantees exactly one
 * hco_complete(cookie) later.  On failure (HAST_EINVAL, HAST_ENOMEM) nothing
 * happens and no callback follows.
 */
int	hast_core_submit(struct hast_core *hc, uint32_t cmd, uint64_t offset,
	    uint64_t length, uint64_t cookie, uint64_t *seqp);

/*
 * Start the core's own flush of both sides (HAST_CMD_FLUSH with no client):
 * hco_local_io gets it with HAST_IOF_INTERNAL and cookie 0 (answer with
 * hast_core_local_done as usual), the engine gets HAST_UP_FLUSH; no
 * hco_complete or hco_release follows.  *genp is its flush number: once
 * hs_flush_done reaches it, every extent written on both sides before the
 * call has left the map (unless written again).  HAST_EBUSY (and the number
 * of the one in flight) while one runs, HAST_EIO with the link down,
 * HAST_ENOMEM.
 */
int	hast_core_flush(struct hast_core *hc, uint32_t *genp);

/*
 * The local I/O seq (a request's or a sync I/O's) finished with error
 * (0 = success).  HAST_ENOENT if seq has no local I/O outstanding.
 */
int	hast_core_local_done(struct hast_core *hc, uint64_t seq, int32_t error);

/*
 * memsync: the peer received write seq (before writing it).  HAST_ENOENT if
 * seq has no remote half outstanding.
 */
int	hast_core_remote_received(struct hast_core *hc, uint64_t seq);

/*
 * The remote half of seq finished with error (0 = success); for a READ the
 * engine has put the data in the host's buffer first.  HAST_ENOENT if seq
 * has no remote half outstanding (for instance after the link went down).
 * The kernel glue also calls it with an error when it cannot hand a taken
 * upcall's payload to the engine (copyout fault): the extent stays dirty.
 */
int	hast_core_remote_done(struct hast_core *hc, uint64_t seq, int32_t error);

/*
 * The map write last handed to hco_map_write finished.  On success the
 * written bitmap becomes the diskmap and every write waiting for it is
 * issued; on error those writes fail with HAST_EIO (nothing was written) and
 * the diskmap keeps its old value; writes that arrived later get a new map
 * write, and nothing else retries.  HAST_EINVAL if no map write is in
 * flight.
 */
int	hast_core_map_done(struct hast_core *hc, int32_t error);

/*
 * The engine persisted (error 0) or failed to persist the localcnt bump it
 * was asked for (HAST_UP_BUMP).  Success releases the writes held for it
 * and no other bump is asked until the link has been up and down again.
 * Failure fails the held writes with HAST_EIO; the next write asks again.
 * HAST_EINVAL if no bump was asked.
 */
int	hast_core_bump_done(struct hast_core *hc, int32_t error);

/*
 * Link state (HAST_LINK_*).  Going down fails the remote half of every
 * request in flight (its extents stay dirty in the syncmap), moves the
 * extents awaiting a flush into the syncmap, drops their queued upcalls,
 * marks every sync range lock failed (its release cannot clear), and owes
 * a new localcnt bump.  Going up lets new requests
 * replicate.  HAST_EINVAL for another value.
 */
int	hast_core_link(struct hast_core *hc, uint32_t state);

/* Synchronization direction (HAST_SYNC_*); HAST_EINVAL for another value. */
int	hast_core_set_syncdir(struct hast_core *hc, uint32_t dir);

/* Replication mode for requests submitted from now on (HAST_REPL_*). */
int	hast_core_set_mode(struct hast_core *hc, uint32_t mode);

/*
 * Take the oldest upcall: returns 1 and fills *up, or 0 if the queue is
 * empty.  Remote requests leave in the order their local halves were
 * issued, so a request submitted after another was acknowledged is always
 * behind it (async replication relies on it).  Taking
 * HAST_UP_SYNC_IO_DONE ends that sync I/O.  The engine must answer every
 * request upcall (remote_done), and every HAST_UP_BUMP (bump_done).
 */
int	hast_core_upcall_next(struct hast_core *hc, struct hast_abi_upcall *up);

/* Bytes of the on-disk activemap (bitmap rounded up to the sector size). */
uint32_t	hast_core_map_size(const struct hast_core *hc);

/* Number of extents. */
uint32_t	hast_core_nextents(const struct hast_core *hc);

/*
 * Copy a bitmap (HAST_MAP_*) into buf; size must be >= hast_core_map_size().
 * Bit n (byte n / 8, mask 1 << (n % 8)) is extent n.
 */
int	hast_core_map_get(struct hast_core *hc, uint32_t which, uint8_t *buf,
	    uint32_t size);

/*
 * At start: the activemap read from disk becomes the diskmap and the
 * syncmap.  HAST_EBUSY unless idle (no request, lock or map write);
 * HAST_EINVAL if size < hast_core_map_size().
 */
int	hast_core_map_load(struct hast_core *hc, const uint8_t *buf,
	    uint32_t size);

/*
 * OR a bitmap (the peer's, from the handshake) into the syncmap.  Extents
 * that become dirty are written to the on-disk map (nobody waits for it).
 */
int	hast_core_map_merge(struct hast_core *hc, const uint8_t *buf,
	    uint32_t size);

/*
 * Ask for a sync range lock on [offset, offset + length) (sector multiples,
 * inside the media).  Returns 0 and the lock's seq; HAST_UP_SYNC_LOCKED with
 * that seq is queued once no regular write overlapping the range is in
 * flight.  From the request on, overlapping regular writes wait until the
 * release.  Lock whole extents: only extents the range covers completely can
 * be cleared.  A lock asked for while the link is down is failed from the
 * start (its release cannot clear).
 */
int	hast_core_sync_lock(struct hast_core *hc, uint64_t offset,
	    uint64_t length, uint64_t *seqp);

/*
 * Under granted lock lockseq, read (HAST_CMD_READ) or write (HAST_CMD_WRITE)
 * [offset, offset + length) of the local provider, inside the locked range.
 * The host gets hco_local_io with HAST_IOF_SYNC and cookie; the result comes
 * back as HAST_UP_SYNC_IO_DONE with the returned seq.  A failure marks the
 * lock failed.  HAST_EINVAL (not granted, outside, bad cmd), HAST_ENOENT.
 */
int	hast_core_sync_io(struct hast_core *hc, uint64_t lockseq, uint32_t cmd,
	    uint64_t offset, uint64_t length, uint64_t cookie, uint64_t *seqp);

/*
 * Release (or cancel, if not yet granted) lock lockseq.  With clear != 0
 * the extents the range covers completely leave the syncmap (and stay
 * marked until a flush of both sides covers them, see step 5), unless the
 * lock failed (a sync I/O failed or the link went down meanwhile): then
 * they stay dirty and HAST_EIO is returned (the lock is released anyway).
 * HAST_EBUSY (nothing released) while one of its sync I/Os is in flight.
 */
int	hast_core_sync_release(struct hast_core *hc, uint64_t lockseq,
	    int clear);

/* Snapshot the counters and queue sizes. */
void	hast_core_stats(struct hast_core *hc, struct hast_abi_stats *st);

#endif	/* !_HAST_CORE_H_ */
