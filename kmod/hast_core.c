/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * hast_core.c: the portable fast path of HAST (see hast_core.h).
 *
 * Everything here runs under the instance mutex and never sleeps.  Work
 * for the host (local I/O, map writes, completions) is queued on the
 * instance and run by hc_leave() after the mutex is dropped.  The file
 * includes no OS header: only the shim and the ABI.
 */

#define	HAST_ABI_NO_IOCTL
#include "hast_shim.h"
#include "hast_core.h"

#ifndef NULL
#define	NULL	((void *)0)
#endif

#if defined(HAST_CORE_DEBUG) || defined(INVARIANTS)
#define	HC_ASSERT(e)	do {						\
	if (!(e))							\
		hast_shim_assert_fail(#e, __FILE__, __LINE__);		\
} while (0)
#else
#define	HC_ASSERT(e)	do { } while (0)
#endif

#define	HC_NHASH	1024		/* seq hash buckets, power of two */


/* Object types. */
#define	HC_T_REQ	1		/* client request */
#define	HC_T_LOCK	2		/* sync range lock */
#define	HC_T_SYNCIO	3		/* local I/O under a sync lock */
#define	HC_T_BUMP	4		/* the instance's bump upcall */

/* r_flags */
#define	RF_BUMPFAIL	0x00000001	/* the engine could not bump */
#define	RF_ADMIT	0x00000002	/* past the range locks */
#define	RF_MARKED	0x00000004	/* counted in the activemap */
#define	RF_ISSUED	0x00000008	/* halves handed out */
#define	RF_LOCAL	0x00000010	/* local I/O outstanding */
#define	RF_LDONE	0x00000020	/* local half finished */
#define	RF_REMOTE	0x00000040	/* remote half outstanding */
#define	RF_RTAKEN	0x00000080	/* engine took the upcall */
#define	RF_RRECV	0x00000100	/* peer received (memsync) */
#define	RF_ROK		0x00000200	/* remote half succeeded */
#define	RF_MEMSYNC	0x00000400	/* "received" expected */
#define	RF_ACKED	0x00000800	/* client answer queued */
#define	RF_GRANTED	0x00001000	/* lock granted */
#define	RF_LFAIL	0x00002000	/* lock: an I/O failed or link lost */
#define	RF_BLOCKS	0x00004000	/* a later overlapping update waits */
#define	RF_INTERNAL	0x00008000	/* the core's own flush: no client */

/* r_acts: host work queued on hc_actq, run in this order. */
#define	ACT_LOCAL	0x1
#define	ACT_COMPLETE	0x2
#define	ACT_RELEASE	0x4		/* and free the object */

/* hc_bump */
#define	BUMP_OK		0		/* nothing owed */
#define	BUMP_NEEDED	1		/* outage: the next write asks */
#define	BUMP_PENDING	2		/* asked, engine has not answered */

struct hc_req;

/* Intrusive circular list; a head is a node whose owner is NULL. */
struct hc_node {
	struct hc_node	*n_next;
	struct hc_node	*n_prev;
	struct hc_req	*n_owner;
};

struct hc_req {
	struct hc_node	 r_all;		/* hc_reqs */
	struct hc_node	 r_wait;	/* hc_waitq (requests), hc_locks */
	struct hc_node	 r_act;		/* hc_actq */
	struct hc_node	 r_up;		/* hc_upq */
	struct hc_req	*r_hnext;	/* seq hash chain */
	struct hc_req	*r_lock;	/* sync I/O: its lock */
	uint64_t	 r_seq;
	uint64_t	 r_offset;
	uint64_t	 r_length;
	uint64_t	 r_cookie;
	uint64_t	 r_gen;		/* map write expected to mark it */
	uint64_t	 r_start;	/* hast_shim_time_ns() at submit */
	uint32_t	 r_type;	/* HC_T_* */
	uint32_t	 r_cmd;		/* HAST_CMD_* */
	uint32_t	 r_mode;	/* HAST_REPL_* at submit */
	uint32_t	 r_flags;	/* RF_* */
	uint32_t	 r_acts;	/* ACT_* */
	uint32_t	 r_upkind;	/* HAST_UP_* while on hc_upq */
	uint32_t	 r_nio;		/* lock: sync I/Os in flight */
	uint32_t	 r_blockers;	/* earlier overlapping updates not
					   finished locally */
	uint32_t	 r_fgen;	/* flush: its number (hc_fgen) */
	uint32_t	 r_ext0;	/* first extent */
	uint32_t	 r_ext1;	/* last extent */
	int32_t		 r_lerr;	/* local result */
	int32_t		 r_ackerr;	/* result given to the client */
};

struct hast_core {
	struct hast_shim_lock	*hc_lock;
	const struct hast_core_ops *hc_ops;
	void		*hc_arg;

	/* Geometry. */
	uint64_t	 hc_mediasize;
	uint32_t	 hc_extentsize;
	uint32_t	 hc_shift;
	uint32_t	 hc_sectorsize;
	uint32_t	 hc_nextents;
	uint32_t	 hc_mapsize;	/* bitmap bytes (64-bit multiple) */
	uint32_t	 hc_disksize;	/* hc_mapsize rounded to a sector */

	/* Activemap. */
	uint32_t	*hc_count;	/* pending writes per extent */
	uint8_t		*hc_memmap;	/* count > 0 */
	uint8_t		*hc_syncmap;	/* to resynchronize */
	uint8_t		*hc_kdmap;	/* member of the keepdirty list */
	uint8_t		*hc_diskmap;	/* last bitmap known on disk */
	uint8_t		*hc_mapbuf;	/* bitmap being written */
	uint8_t		*hc_ufmap;	/* written on both sides, not yet
					   covered by a flush of both */
	uint8_t		*hc_hotmap;	/* covered by a flush of both but
					   written during the last
					   HAST_HOT_FLUSHES flushes */
	uint32_t	*hc_ufgen;	/* hc_fgen at its last write */
	uint32_t	*hc_kd;		/* keepdirty list, most recent first */
	uint32_t	 hc_nkd;
	uint32_t	 hc_keepdirty;

	/* Map writes. */
	uint64_t	 hc_gen_last;	/* last map write started */
	uint64_t	 hc_gen_done;	/* last map write completed */
	int		 hc_map_inflight;
	int		 hc_map_want;	/* the desired map changed */
	int		 hc_map_issue;	/* hco_map_write owed */

	/* Flushes of both sides: started, and the latest one that covered. */
	uint32_t	 hc_fgen;
	uint32_t	 hc_fgen_done;
	int		 hc_iflush;	/* the core's own flush in flight */

	/* State. */
	uint32_t	 hc_mode;
	uint32_t	 hc_link;
	uint32_t	 hc_syncdir;
	uint32_t	 hc_bump;
	uint64_t	 hc_seq;
	int		 hc_notify;	/* hco_notify owed */
	int		 hc_draining;	/* a thread runs host work */

	struct hc_node	 hc_reqs;	/* every live object */
	struct hc_node	 hc_waitq;	/* requests not yet issued */
	struct hc_node	 hc_locks;	/* sync locks, request order */
	struct hc_node	 hc_actq;	/* host work */
	struct hc_node	 hc_upq;	/* upcalls for the engine */
	struct hc_req	*hc_hash[HC_NHASH];
	struct hc_req	 hc_bumpreq;

	struct hast_abi_stats hc_st;	/* counters only */
};

/*
 * Lists.
 */
static void
hc_list_init(struct hc_node *h)
{

	h->n_next = h;
	h->n_prev = h;
	h->n_owner = NULL;
}

static int
hc_list_empty(const struct hc_node *h)
{

	return (h->n_next == h);
}

static int
hc_node_linked(const struct hc_node *n)
{

	return (n->n_next != NULL);
}

static void
hc_list_append(struct hc_node *h, struct hc_node *n, struct hc_req *owner)
{

	HC_ASSERT(!hc_node_linked(n));
	n->n_owner = owner;
	n->n_prev = h->n_prev;
	n->n_next = h;
	h->n_prev->n_next = n;
	h->n_prev = n;
}

static void
hc_list_remove(struct hc_node *n)
{

	HC_ASSERT(hc_node_linked(n));
	n->n_prev->n_next = n->n_next;
	n->n_next->n_prev = n->n_prev;
	n->n_next = NULL;
	n->n_prev = NULL;
}

/*
 * Bitmaps and extents.
 */
static int
hc_bit(const uint8_t *map, uint32_t e)
{

	return ((map[e >> 3] >> (e & 7)) & 1);
}

static void
hc_bit_set(uint8_t *map, uint32_t e)
{

	map[e >> 3] |= (uint8_t)(1u << (e & 7));
}

static void
hc_bit_clear(uint8_t *map, uint32_t e)
{

	map[e >> 3] &= (uint8_t)~(1u << (e & 7));
}

/* The bits of bitmap byte i that stand for real extents. */
static uint8_t
hc_byte_mask(const struct hast_core *hc, uint32_t i)
{
	uint64_t first;

	first = (uint64_t)i * 8;
	if (first + 8 <= hc->hc_nextents)
		return (0xff);
	if (first >= hc->hc_nextents)
		return (0);
	return ((uint8_t)((1u << (hc->hc_nextents - first)) - 1));
}

/*
 * Is extent e wanted on disk: pending writes, keepdirty, to sync, waiting
 * for a flush of both sides, or hot.
 */
static int
hc_wanted(const struct hast_core *hc, uint32_t e)
{

	return (hc->hc_count[e] > 0 || hc_bit(hc->hc_kdmap, e) ||
	    hc_bit(hc->hc_syncmap, e) || hc_bit(hc->hc_ufmap, e) ||
	    hc_bit(hc->hc_hotmap, e));
}

/* Bitmap byte i of the map wanted on disk. */
static uint8_t
hc_wanted_byte(const struct hast_core *hc, uint32_t i)
{

	return ((uint8_t)((hc->hc_memmap[i] | hc->hc_kdmap[i] |
	    hc->hc_syncmap[i] | hc->hc_ufmap[i] | hc->hc_hotmap[i]) &
	    hc_byte_mask(hc, i)));
}

/* Is extent e set on disk and not about to be cleared there? */
static int
hc_marked_on_disk(const struct hast_core *hc, uint32_t e)
{

	if (!hc_bit(hc->hc_diskmap, e))
		return (0);
	return (!hc->hc_map_inflight || hc_bit(hc->hc_mapbuf, e));
}

/* Extent e may have left the desired map: rewrite the map lazily. */
static void
hc_maybe_clean(struct hast_core *hc, uint32_t e)
{

	if (hc_wanted(hc, e))
		return;
	if (hc_bit(hc->hc_diskmap, e) ||
	    (hc->hc_map_inflight && hc_bit(hc->hc_mapbuf, e)))
		hc->hc_map_want = 1;
}

static void
hc_extents(const struct hast_core *hc, uint64_t offset, uint64_t length,
    uint32_t *firstp, uint32_t *lastp)
{

	HC_ASSERT(length > 0 && offset + length <= hc->hc_mediasize);
	*firstp = (uint32_t)(offset >> hc->hc_shift);
	*lastp = (uint32_t)((offset + length - 1) >> hc->hc_shift);
}

/* Move e to the head of the keepdirty list, evicting the oldest entry. */
static void
hc_kd_touch(struct hast_core *hc, uint32_t e)
{
	uint32_t i, victim;

	if (hc->hc_keepdirty == 0)
		return;
	if (hc->hc_nkd > 0 && hc->hc_kd[0] == e)
		return;
	if (hc_bit(hc->hc_kdmap, e)) {
		for (i = 1; i < hc->hc_nkd && hc->hc_kd[i] != e; i++)
			continue;
		HC_ASSERT(i < hc->hc_nkd);
	} else {
		if (hc->hc_nkd == hc->hc_keepdirty) {
			victim = hc->hc_kd[hc->hc_nkd - 1];
			hc->hc_nkd--;
			hc_bit_clear(hc->hc_kdmap, victim);
			hc_maybe_clean(hc, victim);
		}
		i = hc->hc_nkd;
		hc->hc_nkd++;
		hc_bit_set(hc->hc_kdmap, e);
	}
	for (; i > 0; i--)
		hc->hc_kd[i] = hc->hc_kd[i - 1];
	hc->hc_kd[0] = e;
}

/*
 * Map writes.  At most one is in flight; hc_gen_last numbers them.
 */
static void
hc_map_start(struct hast_core *hc)
{
	uint32_t i;
	int differ;

	HC_ASSERT(!hc->hc_map_inflight);
	differ = 0;
	for (i = 0; i < hc->hc_mapsize; i++) {
		hc->hc_mapbuf[i] = hc_wanted_byte(hc, i);
		if (hc->hc_mapbuf[i] != hc->hc_diskmap[i])
			differ = 1;
	}
	hc->hc_map_want = 0;
	if (!differ)
		return;		/* the disk already says it */
	hc->hc_map_inflight = 1;
	hc->hc_map_issue = 1;
	hc->hc_gen_last++;
	hc->hc_st.hs_activemap_updates++;
}

/*
 * Objects.
 */
static struct hc_req *
hc_lookup(struct hast_core *hc, uint64_t seq)
{
	struct hc_req *r;

	for (r = hc->hc_hash[seq & (HC_NHASH - 1)]; r != NULL; r = r->r_hnext)
		if (r->r_seq == seq)
			return (r);
	return (NULL);
}

static struct hc_req *
hc_req_new(struct hast_core *hc, uint32_t type)
{
	struct hc_req *r;
	struct hc_req **bucket;

	r = hast_shim_alloc(sizeof(*r));
	if (r == NULL)
		return (NULL);
	r->r_type = type;
	r->r_seq = ++hc->hc_seq;
	r->r_start = hast_shim_time_ns();
	bucket = &hc->hc_hash[r->r_seq & (HC_NHASH - 1)];
	r->r_hnext = *bucket;
	*bucket = r;
	hc_list_append(&hc->hc_reqs, &r->r_all, r);
	return (r);
}

/* Forget r's seq and drop it from the live list (not yet freed). */
static void
hc_req_unhash(struct hast_core *hc, struct hc_req *r)
{
	struct hc_req **rp;

	for (rp = &hc->hc_hash[r->r_seq & (HC_NHASH - 1)]; *rp != NULL;
	    rp = &(*rp)->r_hnext) {
		if (*rp == r) {
			*rp = r->r_hnext;
			r->r_hnext = NULL;
			break;
		}
	}
	if (hc_node_linked(&r->r_all))
		hc_list_remove(&r->r_all);
}

static void
hc_req_free(struct hast_core *hc, struct hc_req *r)
{

	hc_req_unhash(hc, r);
	HC_ASSERT(!hc_node_linked(&r->r_wait));
	HC_ASSERT(!hc_node_linked(&r->r_act));
	HC_ASSERT(!hc_node_linked(&r->r_up));
	hast_shim_free(r);
}

static void
hc_act(struct hast_core *hc, struct hc_req *r, uint32_t acts)
{

	r->r_acts |= acts;
	if (!hc_node_linked(&r->r_act))
		hc_list_append(&hc->hc_actq, &r->r_act, r);
}

static void
hc_upcall(struct hast_core *hc, struct hc_req *r, uint32_t kind)
{

	if (hc_list_empty(&hc->hc_upq))
		hc->hc_notify = 1;
	r->r_upkind = kind;
	hc_list_append(&hc->hc_upq, &r->r_up, r);
}

/*
 * Requests.
 */
static int
hc_is_update(uint32_t cmd)
{

	return (cmd == HAST_CMD_WRITE || cmd == HAST_CMD_DELETE);
}

/* Start the remote half of r if the link is up. */
static void
hc_remote_start(struct hast_core *hc, struct hc_req *r)
{

	if (hc->hc_link != HAST_LINK_UP)
		return;
	r->r_flags |= RF_REMOTE;
	if (r->r_cmd == HAST_CMD_WRITE && r->r_mode == HAST_REPL_MEMSYNC)
		r->r_flags |= RF_MEMSYNC;
	hc_upcall(hc, r, r->r_cmd);
}

static void
hc_local_start(struct hast_core *hc, struct hc_req *r)
{

	r->r_flags |= RF_LOCAL;
	hc_act(hc, r, ACT_LOCAL);
}

/*
 * Has r's answer to the client become due?  The mode's rule: see
 * hast_core.h.  Sets *errp to the answer.
 */
static int
hc_ack_due(const struct hc_req *r, int32_t *errp)
{
	int remote_open;

	if (!(r->r_flags & RF_LDONE))
		return (0);
	remote_open = (r->r_flags & RF_REMOTE) != 0;
	if (r->r_lerr != 0) {
		/* Only a good remote copy can mask a local failure. */
		if (remote_open)
			return (0);
		*errp = (r->r_flags & RF_ROK) ? 0 : r->r_lerr;
		return (1);
	}
	if (remote_open) {
		switch (r->r_cmd) {
		case HAST_CMD_WRITE:
		case HAST_CMD_DELETE:
			if (r->r_mode == HAST_REPL_FULLSYNC)
				return (0);
			if (r->r_mode == HAST_REPL_MEMSYNC &&
			    !(r->r_flags & RF_RRECV))
				return (0);
			break;
		case HAST_CMD_FLUSH:
			if (r->r_mode != HAST_REPL_ASYNC)
				return (0);
			break;
		default:
			return (0);
		}
	}
	*errp = 0;
	return (1);
}

/*
 * Extent e holds data both copies wrote: it stays marked until a flush of
 * both sides, started from now on, has covered it (hc_flushed).
 */
static void
hc_await_flush(struct hast_core *hc, uint32_t e)
{

	hc_bit_set(hc->hc_ufmap, e);
	hc->hc_ufgen[e] = hc->hc_fgen;
}

/* How a finished update leaves its extents (hc_unmark). */
#define	UNMARK_NOTHING	0	/* nothing was written anywhere */
#define	UNMARK_SYNC	1	/* only one copy may have it: resync */
#define	UNMARK_FLUSH	2	/* both wrote it: clean after a flush */

/* Account a finished write or delete in the activemap. */
static void
hc_unmark(struct hast_core *hc, struct hc_req *r, int how)
{
	uint32_t e;

	for (e = r->r_ext0; e <= r->r_ext1; e++) {
		if (how == UNMARK_SYNC)
			hc_bit_set(hc->hc_syncmap, e);
		else if (how == UNMARK_FLUSH)
			hc_await_flush(hc, e);
		HC_ASSERT(hc->hc_count[e] > 0);
		if (--hc->hc_count[e] == 0) {
			hc_bit_clear(hc->hc_memmap, e);
			hc_maybe_clean(hc, e);
		}
	}
	r->r_flags &= ~RF_MARKED;
}

/* Is flush generation a before b (wrapping)? */
static int
hc_gen_before(uint32_t a, uint32_t b)
{

	return ((int32_t)(a - b) < 0);
}

/*
 * Flush number fgen finished on both sides: every extent written on both
 * before it started is durable on both.  It stays hot (marked) until
 * HAST_HOT_FLUSHES more flushes have started without a write to it, then
 * leaves the map.
 */
static void
hc_flushed(struct hast_core *hc, uint32_t fgen)
{
	uint32_t i, e;

	if (hc_gen_before(hc->hc_fgen_done, fgen))
		hc->hc_fgen_done = fgen;
	for (i = 0; i < hc->hc_mapsize; i++) {
		if ((hc->hc_ufmap[i] | hc->hc_hotmap[i]) == 0)
			continue;
		for (e = i * 8; e < i * 8 + 8 && e < hc->hc_nextents; e++) {
			if (hc_bit(hc->hc_ufmap, e) &&
			    hc_gen_before(hc->hc_ufgen[e], fgen)) {
				hc_bit_clear(hc->hc_ufmap, e);
				hc_bit_set(hc->hc_hotmap, e);
			}
			if (hc_bit(hc->hc_hotmap, e) &&
			    hc_gen_before(hc->hc_ufgen[e] + HAST_HOT_FLUSHES,
			    fgen)) {
				hc_bit_clear(hc->hc_hotmap, e);
				hc_maybe_clean(hc, e);
			}
		}
	}
}

/* Queue the bump upcall if this outage has not asked for it yet. */
static void
hc_bump_ask(struct hast_core *hc)
{

	if (hc->hc_bump == BUMP_NEEDED) {
		hc->hc_bump = BUMP_PENDING;
		hc_upcall(hc, &hc->hc_bumpreq, HAST_UP_BUMP);
	}
}

/* Move r on: answer the client when due, release it when finished. */
static void
hc_progress(struct hast_core *hc, struct hc_req *r)
{
	int32_t err;

	HC_ASSERT(r->r_type == HC_T_REQ);
	if (!(r->r_flags & RF_ACKED) && hc_ack_due(r, &err)) {
		/*
		 * A write whose only copy is local is acknowledged only
		 * once this outage's localcnt bump is persisted.
		 */
		if (err == 0 && hc_is_update(r->r_cmd) &&
		    !(r->r_flags & (RF_ROK | RF_RRECV)) &&
		    hc->hc_bump != BUMP_OK) {
			if (r->r_flags & RF_BUMPFAIL)
				err = HAST_EIO;
			else {
				hc_bump_ask(hc);
				return;
			}
		}
		r->r_flags |= RF_ACKED;
		r->r_ackerr = err;
		hc_act(hc, r, ACT_COMPLETE);
	}
	if ((r->r_flags & (RF_LDONE | RF_LOCAL | RF_REMOTE | RF_ACKED)) !=
	    (RF_LDONE | RF_ACKED))
		return;
	/*
	 * Both halves are finished.  The extent stays dirty unless both
	 * copies are known good, and then until a flush of both covers it.
	 */
	if (r->r_flags & RF_MARKED)
		hc_unmark(hc, r, r->r_lerr != 0 || !(r->r_flags & RF_ROK) ?
		    UNMARK_SYNC : UNMARK_FLUSH);
	if (r->r_cmd == HAST_CMD_FLUSH) {
		if (r->r_lerr == 0 && (r->r_flags & RF_ROK))
			hc_flushed(hc, r->r_fgen);
		if (r->r_flags & RF_INTERNAL)
			hc->hc_iflush = 0;
	}
	hc_req_unhash(hc, r);
	hc_act(hc, r, ACT_RELEASE);
}

static int
hc_overlap(uint64_t o1, uint64_t l1, uint64_t o2, uint64_t l2)
{

	return (o1 < o2 + l2 && o2 < o1 + l1);
}

/*
 * Overlapping updates reach the local provider in the order they were
 * submitted: a new write or delete waits for every earlier overlapping one
 * whose local half has not finished (the host may run local I/Os in any
 * order).  Their remote halves leave in upcall order, and the secondary
 * applies overlapping requests in arrival order, so both copies end up
 * with the later data.
 */
static void
hc_order_after(struct hast_core *hc, struct hc_req *r)
{
	struct hc_node *n;
	struct hc_req *q;

	for (n = hc->hc_reqs.n_next; n != &hc->hc_reqs; n = n->n_next) {
		q = n->n_owner;
		if (q == r || q->r_type != HC_T_REQ ||
		    !hc_is_update(q->r_cmd) || (q->r_flags & RF_LDONE) ||
		    !hc_overlap(r->r_offset, r->r_length, q->r_offset,
		    q->r_length))
			continue;
		HC_ASSERT(q->r_seq < r->r_seq);
		q->r_flags |= RF_BLOCKS;
		r->r_blockers++;
	}
}

/* The local half of update r finished (or never will run). */
static void
hc_unblock(struct hast_core *hc, struct hc_req *r)
{
	struct hc_node *n;
	struct hc_req *q;

	if (!(r->r_flags & RF_BLOCKS))
		return;
	r->r_flags &= ~RF_BLOCKS;
	for (n = hc->hc_waitq.n_next; n != &hc->hc_waitq; n = n->n_next) {
		q = n->n_owner;
		if (q->r_seq > r->r_seq && q->r_blockers > 0 &&
		    hc_overlap(r->r_offset, r->r_length, q->r_offset,
		    q->r_length))
			q->r_blockers--;
	}
}

/* Fail a request that has not been issued. */
static void
hc_fail_unissued(struct hast_core *hc, struct hc_req *r, int32_t error)
{

	HC_ASSERT(!(r->r_flags & RF_ISSUED));
	if (hc_node_linked(&r->r_wait))
		hc_list_remove(&r->r_wait);
	if (r->r_flags & RF_MARKED)
		hc_unmark(hc, r, UNMARK_NOTHING);
	r->r_flags |= RF_LDONE;
	r->r_lerr = error;
	hc_unblock(hc, r);
	hc_progress(hc, r);
}

static int
hc_range_locked(const struct hast_core *hc, const struct hc_req *r)
{
	const struct hc_node *n;

	for (n = hc->hc_locks.n_next; n != &hc->hc_locks; n = n->n_next)
		if (hc_overlap(r->r_offset, r->r_length, n->n_owner->r_offset,
		    n->n_owner->r_length))
			return (1);
	return (0);
}

/* Try to move a waiting write or delete towards issue. */
static void
hc_advance(struct hast_core *hc, struct hc_req *r)
{
	uint32_t e;
	int need, covered;

	if (!(r->r_flags & RF_ADMIT)) {
		if (hc_range_locked(hc, r))
			return;
		r->r_flags |= RF_ADMIT;
	}
	if (!(r->r_flags & RF_MARKED)) {
		need = 0;
		covered = 1;
		for (e = r->r_ext0; e <= r->r_ext1; e++) {
			hc->hc_count[e]++;
			hc_bit_set(hc->hc_memmap, e);
			hc_kd_touch(hc, e);
			if (!hc_marked_on_disk(hc, e)) {
				need = 1;
				if (!hc->hc_map_inflight ||
				    !hc_bit(hc->hc_mapbuf, e))
					covered = 0;
			}
		}
		r->r_flags |= RF_MARKED;
		if (!need)
			r->r_gen = 0;
		else if (covered)
			r->r_gen = hc->hc_gen_last;	/* the one in flight */
		else {
			r->r_gen = hc->hc_gen_last + 1;	/* the next one */
			hc->hc_map_want = 1;
		}
	}
	/* After every earlier overlapping update's local half. */
	if (r->r_blockers > 0)
		return;
	/*
	 * Issue once every extent is marked on disk and stays marked through
	 * the map write in flight (r_gen may be passed by then: an earlier
	 * map write already covered it).
	 */
	for (e = r->r_ext0; e <= r->r_ext1; e++)
		if (!hc_marked_on_disk(hc, e))
			return;
	/* In an outage no data is written before the localcnt bump. */
	if (hc->hc_link == HAST_LINK_DOWN && hc->hc_bump != BUMP_OK) {
		hc_bump_ask(hc);
		return;
	}
	hc_list_remove(&r->r_wait);
	r->r_flags |= RF_ISSUED;
	hc_local_start(hc, r);
	hc_remote_start(hc, r);		/* never sent: stays dirty */
}

/* Grant every waiting sync lock that no admitted write overlaps. */
static void
hc_grant_locks(struct hast_core *hc)
{
	struct hc_node *n, *m;
	struct hc_req *l, *r;
	int busy;

	for (n = hc->hc_locks.n_next; n != &hc->hc_locks; n = n->n_next) {
		l = n->n_owner;
		if (l->r_flags & RF_GRANTED)
			continue;
		busy = 0;
		for (m = hc->hc_reqs.n_next; m != &hc->hc_reqs; m = m->n_next) {
			r = m->n_owner;
			if (r->r_type == HC_T_REQ && hc_is_update(r->r_cmd) &&
			    (r->r_flags & RF_ADMIT) &&
			    hc_overlap(r->r_offset, r->r_length, l->r_offset,
			    l->r_length)) {
				busy = 1;
				break;
			}
		}
		if (busy)
			continue;
		l->r_flags |= RF_GRANTED;
		hc_upcall(hc, l, HAST_UP_SYNC_LOCKED);
	}
}

static void
hc_kick(struct hast_core *hc)
{
	struct hc_node *n, *next;

	for (n = hc->hc_waitq.n_next; n != &hc->hc_waitq; n = next) {
		next = n->n_next;
		hc_advance(hc, n->n_owner);
	}
	hc_grant_locks(hc);
	if (hc->hc_map_want && !hc->hc_map_inflight)
		hc_map_start(hc);
}

/*
 * Leave the core: settle the state, then run the queued host work with the
 * lock dropped.  Called with the lock held; returns with it released.
 */
static void
hc_leave(struct hast_core *hc)
{
	const struct hast_core_ops *ops;
	struct hast_core_io io;
	struct hc_req *r;
	uint32_t acts;
	uint64_t cookie;
	int32_t err;

	ops = hc->hc_ops;
	hc_kick(hc);
	if (hc->hc_draining) {
		hast_shim_unlock(hc->hc_lock);
		return;
	}
	hc->hc_draining = 1;
	for (;;) {
		if (hc->hc_map_issue) {
			hc->hc_map_issue = 0;
			hast_shim_unlock(hc->hc_lock);
			ops->hco_map_write(hc->hc_arg, hc->hc_mapbuf,
			    hc->hc_disksize);
			hast_shim_lock(hc->hc_lock);
			continue;
		}
		if (hc->hc_notify) {
			hc->hc_notify = 0;
			hast_shim_unlock(hc->hc_lock);
			if (ops->hco_notify != NULL)
				ops->hco_notify(hc->hc_arg);
			else
				hast_shim_wakeup(hc);
			hast_shim_lock(hc->hc_lock);
			continue;
		}
		if (hc_list_empty(&hc->hc_actq))
			break;
		r = hc->hc_actq.n_next->n_owner;
		hc_list_remove(&r->r_act);
		acts = r->r_acts;
		r->r_acts = 0;
		io.hio_seq = r->r_seq;
		io.hio_offset = r->r_offset;
		io.hio_length = r->r_length;
		io.hio_cookie = r->r_cookie;
		io.hio_cmd = r->r_cmd;
		io.hio_flags = r->r_type == HC_T_SYNCIO ? HAST_IOF_SYNC : 0;
		if (r->r_flags & RF_INTERNAL) {
			io.hio_flags |= HAST_IOF_INTERNAL;
			acts &= ~ACT_COMPLETE;
		}
		cookie = r->r_cookie;
		err = r->r_ackerr;
		/*
		 * After the unlock r may only be touched again for
		 * ACT_RELEASE: a released object is known to nobody else.
		 */
		hast_shim_unlock(hc->hc_lock);
		if (acts & ACT_LOCAL)
			ops->hco_local_io(hc->hc_arg, &io);
		if (acts & ACT_COMPLETE)
			ops->hco_complete(hc->hc_arg, cookie, err);
		if ((acts & ACT_RELEASE) && ops->hco_release != NULL &&
		    !(io.hio_flags & HAST_IOF_INTERNAL))
			ops->hco_release(hc->hc_arg, cookie);
		hast_shim_lock(hc->hc_lock);
		if (acts & ACT_RELEASE)
			hc_req_free(hc, r);
	}
	hc->hc_draining = 0;
	hast_shim_unlock(hc->hc_lock);
}

/*
 * Entry points.
 */
static int
hc_powerof2(uint32_t x)
{

	return (x != 0 && (x & (x - 1)) == 0);
}

static int
hc_mode_valid(uint32_t mode)
{

	return (mode == HAST_REPL_FULLSYNC || mode == HAST_REPL_MEMSYNC ||
	    mode == HAST_REPL_ASYNC);
}

static void
hc_free_all(struct hast_core *hc)
{

	hast_shim_free(hc->hc_count);
	hast_shim_free(hc->hc_memmap);
	hast_shim_free(hc->hc_syncmap);
	hast_shim_free(hc->hc_kdmap);
	hast_shim_free(hc->hc_diskmap);
	hast_shim_free(hc->hc_mapbuf);
	hast_shim_free(hc->hc_ufmap);
	hast_shim_free(hc->hc_hotmap);
	hast_shim_free(hc->hc_ufgen);
	hast_shim_free(hc->hc_kd);
	if (hc->hc_lock != NULL)
		hast_shim_lock_free(hc->hc_lock);
	hast_shim_free(hc);
}

int
hast_core_create(const struct hast_core_params *p,
    const struct hast_core_ops *ops, void *arg, struct hast_core **corep)
{
	struct hast_core *hc;
	uint64_t nextents, mapsize, disksize;
	uint32_t shift;

	if (p == NULL || ops == NULL || corep == NULL ||
	    ops->hco_local_io == NULL || ops->hco_map_write == NULL ||
	    ops->hco_complete == NULL)
		return (HAST_EINVAL);
	if (p->hcp_mediasize == 0 || !hc_powerof2(p->hcp_sectorsize) ||
	    !hc_powerof2(p->hcp_extentsize) ||
	    p->hcp_extentsize < p->hcp_sectorsize || !hc_mode_valid(p->hcp_mode))
		return (HAST_EINVAL);
	nextents = (p->hcp_mediasize - 1) / p->hcp_extentsize + 1;
	mapsize = (nextents + 63) / 64 * 8;
	disksize = (mapsize + p->hcp_sectorsize - 1) &
	    ~((uint64_t)p->hcp_sectorsize - 1);
	if (disksize > 0x7fffffff)
		return (HAST_EINVAL);
	for (shift = 0; ((uint32_t)1 << shift) != p->hcp_extentsize; shift++)
		continue;

	hc = hast_shim_alloc(sizeof(*hc));
	if (hc == NULL)
		return (HAST_ENOMEM);
	hc->hc_ops = ops;
	hc->hc_arg = arg;
	hc->hc_mediasize = p->hcp_mediasize;
	hc->hc_extentsize = p->hcp_extentsize;
	hc->hc_shift = shift;
	hc->hc_sectorsize = p->hcp_sectorsize;
	hc->hc_nextents = (uint32_t)nextents;
	hc->hc_mapsize = (uint32_t)mapsize;
	hc->hc_disksize = (uint32_t)disksize;
	hc->hc_keepdirty = p->hcp_keepdirty < hc->hc_nextents ?
	    p->hcp_keepdirty : hc->hc_nextents;
	hc->hc_mode = p->hcp_mode;
	hc->hc_link = HAST_LINK_DOWN;
	hc->hc_syncdir = HAST_SYNC_NONE;
	hc->hc_bump = BUMP_NEEDED;
	hc_list_init(&hc->hc_reqs);
	hc_list_init(&hc->hc_waitq);
	hc_list_init(&hc->hc_locks);
	hc_list_init(&hc->hc_actq);
	hc_list_init(&hc->hc_upq);
	hc->hc_bumpreq.r_type = HC_T_BUMP;

	hc->hc_lock = hast_shim_lock_alloc();
	hc->hc_count = hast_shim_alloc(nextents * sizeof(hc->hc_count[0]));
	hc->hc_memmap = hast_shim_alloc(mapsize);
	hc->hc_syncmap = hast_shim_alloc(mapsize);
	hc->hc_kdmap = hast_shim_alloc(mapsize);
	hc->hc_diskmap = hast_shim_alloc(disksize);
	hc->hc_mapbuf = hast_shim_alloc(disksize);
	hc->hc_ufmap = hast_shim_alloc(mapsize);
	hc->hc_hotmap = hast_shim_alloc(mapsize);
	hc->hc_ufgen = hast_shim_alloc(nextents * sizeof(hc->hc_ufgen[0]));
	hc->hc_kd = hast_shim_alloc(((uint64_t)hc->hc_keepdirty + 1) *
	    sizeof(hc->hc_kd[0]));
	if (hc->hc_lock == NULL || hc->hc_count == NULL ||
	    hc->hc_memmap == NULL || hc->hc_syncmap == NULL ||
	    hc->hc_kdmap == NULL || hc->hc_diskmap == NULL ||
	    hc->hc_mapbuf == NULL || hc->hc_ufmap == NULL ||
	    hc->hc_hotmap == NULL ||
	    hc->hc_ufgen == NULL || hc->hc_kd == NULL) {
		hc_free_all(hc);
		return (HAST_ENOMEM);
	}
	*corep = hc;
	return (0);
}

int
hast_core_destroy(struct hast_core *hc)
{

	hast_shim_lock(hc->hc_lock);
	if (!hc_list_empty(&hc->hc_reqs) || !hc_list_empty(&hc->hc_actq) ||
	    !hc_list_empty(&hc->hc_upq) || hc->hc_map_inflight ||
	    hc->hc_map_issue || hc->hc_draining || hc->hc_bump == BUMP_PENDING) {
		hast_shim_unlock(hc->hc_lock);
		return (HAST_EBUSY);
	}
	hast_shim_unlock(hc->hc_lock);
	hc_free_all(hc);
	return (0);
}

/* Is [offset, offset + length) sector aligned and inside the media? */
static int
hc_range_valid(const struct hast_core *hc, uint64_t offset, uint64_t length)
{
	uint64_t mask;

	mask = (uint64_t)hc->hc_sectorsize - 1;
	if (length == 0 || (offset & mask) != 0 || (length & mask) != 0)
		return (0);
	return (length <= hc->hc_mediasize &&
	    offset <= hc->hc_mediasize - length);
}

static int
hc_read_stale(const struct hast_core *hc, const struct hc_req *r)
{
	uint32_t e;

	if (hc->hc_syncdir != HAST_SYNC_FROM_PEER)
		return (0);
	for (e = r->r_ext0; e <= r->r_ext1; e++)
		if (hc_bit(hc->hc_syncmap, e))
			return (1);
	return (0);
}

int
hast_core_submit(struct hast_core *hc, uint32_t cmd, uint64_t offset,
    uint64_t length, uint64_t cookie, uint64_t *seqp)
{
	struct hc_req *r;

	switch (cmd) {
	case HAST_CMD_READ:
	case HAST_CMD_WRITE:
	case HAST_CMD_DELETE:
		if (!hc_range_valid(hc, offset, length))
			return (HAST_EINVAL);
		break;
	case HAST_CMD_FLUSH:
		if (offset != 0 || length != 0)
			return (HAST_EINVAL);
		break;
	default:
		return (HAST_EINVAL);
	}
	hast_shim_lock(hc->hc_lock);
	r = hc_req_new(hc, HC_T_REQ);
	if (r == NULL) {
		hast_shim_unlock(hc->hc_lock);
		return (HAST_ENOMEM);
	}
	r->r_cmd = cmd;
	r->r_offset = offset;
	r->r_length = length;
	r->r_cookie = cookie;
	r->r_mode = hc->hc_mode;
	if (seqp != NULL)
		*seqp = r->r_seq;
	if (cmd != HAST_CMD_FLUSH)
		hc_extents(hc, offset, length, &r->r_ext0, &r->r_ext1);
	switch (cmd) {
	case HAST_CMD_READ:
		hc->hc_st.hs_reads++;
		r->r_flags |= RF_ISSUED;
		if (hc_read_stale(hc, r)) {
			/* The local copy is out of date: ask the peer. */
			r->r_flags |= RF_LDONE;
			r->r_lerr = HAST_EIO;
			hc_remote_start(hc, r);
			hc_progress(hc, r);
		} else
			hc_local_start(hc, r);
		break;
	case HAST_CMD_FLUSH:
		hc->hc_st.hs_flushes++;
		r->r_fgen = ++hc->hc_fgen;
		r->r_flags |= RF_ISSUED;
		hc_local_start(hc, r);
		hc_remote_start(hc, r);
		break;
	default:
		if (cmd == HAST_CMD_WRITE)
			hc->hc_st.hs_writes++;
		else
			hc->hc_st.hs_deletes++;
		hc_order_after(hc, r);
		hc_list_append(&hc->hc_waitq, &r->r_wait, r);
		break;
	}
	hc_leave(hc);
	return (0);
}

int
hast_core_flush(struct hast_core *hc, uint32_t *genp)
{
	struct hc_req *r;

	hast_shim_lock(hc->hc_lock);
	if (hc->hc_link != HAST_LINK_UP) {
		hast_shim_unlock(hc->hc_lock);
		return (HAST_EIO);
	}
	if (hc->hc_iflush) {
		if (genp != NULL)
			*genp = hc->hc_fgen;
		hast_shim_unlock(hc->hc_lock);
		return (HAST_EBUSY);
	}
	r = hc_req_new(hc, HC_T_REQ);
	if (r == NULL) {
		hast_shim_unlock(hc->hc_lock);
		return (HAST_ENOMEM);
	}
	r->r_cmd = HAST_CMD_FLUSH;
	r->r_mode = hc->hc_mode;
	r->r_flags |= RF_INTERNAL | RF_ISSUED;
	r->r_fgen = ++hc->hc_fgen;
	hc->hc_iflush = 1;
	if (genp != NULL)
		*genp = r->r_fgen;
	hc_local_start(hc, r);
	hc_remote_start(hc, r);
	hc_leave(hc);
	return (0);
}

int
hast_core_local_done(struct hast_core *hc, uint64_t seq, int32_t error)
{
	struct hc_req *r;

	hast_shim_lock(hc->hc_lock);
	r = hc_lookup(hc, seq);
	if (r == NULL || !(r->r_flags & RF_LOCAL)) {
		hast_shim_unlock(hc->hc_lock);
		return (HAST_ENOENT);
	}
	r->r_flags &= ~RF_LOCAL;
	r->r_flags |= RF_LDONE;
	r->r_lerr = error;
	if (r->r_type == HC_T_SYNCIO) {
		HC_ASSERT(r->r_lock->r_nio > 0);
		r->r_lock->r_nio--;
		if (error != 0)
			r->r_lock->r_flags |= RF_LFAIL;
		hc_upcall(hc, r, HAST_UP_SYNC_IO_DONE);
		hc_leave(hc);
		return (0);
	}
	if (hc_is_update(r->r_cmd))
		hc_unblock(hc, r);
	if (error != 0) {
		switch (r->r_cmd) {
		case HAST_CMD_READ:
			hc->hc_st.hs_read_errors++;
			/* Mask the local failure with the peer's copy. */
			hc_remote_start(hc, r);
			break;
		case HAST_CMD_WRITE:
			hc->hc_st.hs_write_errors++;
			break;
		case HAST_CMD_DELETE:
			hc->hc_st.hs_delete_errors++;
			break;
		default:
			hc->hc_st.hs_flush_errors++;
			break;
		}
	}
	hc_progress(hc, r);
	hc_leave(hc);
	return (0);
}

/* Look up a request whose remote half is outstanding. */
static struct hc_req *
hc_lookup_remote(struct hast_core *hc, uint64_t seq)
{
	struct hc_req *r;

	r = hc_lookup(hc, seq);
	if (r == NULL || r->r_type != HC_T_REQ || !(r->r_flags & RF_REMOTE))
		return (NULL);
	return (r);
}

int
hast_core_remote_received(struct hast_core *hc, uint64_t seq)
{
	struct hc_req *r;

	hast_shim_lock(hc->hc_lock);
	r = hc_lookup_remote(hc, seq);
	if (r == NULL || !(r->r_flags & RF_MEMSYNC)) {
		hast_shim_unlock(hc->hc_lock);
		return (HAST_ENOENT);
	}
	r->r_flags |= RF_RRECV;
	hc_progress(hc, r);
	hc_leave(hc);
	return (0);
}

int
hast_core_remote_done(struct hast_core *hc, uint64_t seq, int32_t error)
{
	struct hc_req *r;

	hast_shim_lock(hc->hc_lock);
	r = hc_lookup_remote(hc, seq);
	if (r == NULL) {
		hast_shim_unlock(hc->hc_lock);
		return (HAST_ENOENT);
	}
	if (hc_node_linked(&r->r_up))
		hc_list_remove(&r->r_up);
	r->r_flags &= ~RF_REMOTE;
	if (error == 0)
		r->r_flags |= RF_ROK;
	else {
		r->r_flags &= ~RF_RRECV;	/* the peer lost it after all */
		/*
		 * The peer failed an update while connected: this copy now
		 * has changes the peer lacks, as in an outage.  The write is
		 * answered only once the localcnt bump is persisted.
		 */
		if (r->r_type == HC_T_REQ && hc_is_update(r->r_cmd) &&
		    hc->hc_bump == BUMP_OK)
			hc->hc_bump = BUMP_NEEDED;
	}
	hc_progress(hc, r);
	hc_leave(hc);
	return (0);
}

int
hast_core_map_done(struct hast_core *hc, int32_t error)
{
	struct hc_node *n, *next;
	struct hc_req *r;
	uint32_t i;

	hast_shim_lock(hc->hc_lock);
	if (!hc->hc_map_inflight || hc->hc_map_issue) {
		hast_shim_unlock(hc->hc_lock);
		return (HAST_EINVAL);
	}
	hc->hc_map_inflight = 0;
	if (error == 0) {
		for (i = 0; i < hc->hc_disksize; i++)
			hc->hc_diskmap[i] = hc->hc_mapbuf[i];
		hc->hc_gen_done = hc->hc_gen_last;
	} else {
		/*
		 * The bits may not be on disk: fail the writes that waited
		 * for this map write (nothing of theirs was written) and
		 * keep the old diskmap.  Later writes wait for a retry.
		 */
		for (n = hc->hc_waitq.n_next; n != &hc->hc_waitq; n = next) {
			next = n->n_next;
			r = n->n_owner;
			if ((r->r_flags & RF_MARKED) &&
			    r->r_gen > hc->hc_gen_done &&
			    r->r_gen <= hc->hc_gen_last)
				hc_fail_unissued(hc, r, HAST_EIO);
		}
		/* Retry at once only if a later write waits for it. */
		hc->hc_map_want = 0;
		for (n = hc->hc_waitq.n_next; n != &hc->hc_waitq;
		    n = n->n_next)
			if (n->n_owner->r_gen > hc->hc_gen_done)
				hc->hc_map_want = 1;
	}
	hc_leave(hc);
	return (0);
}

int
hast_core_bump_done(struct hast_core *hc, int32_t error)
{
	struct hc_node *n, *next;
	struct hc_req *r;

	hast_shim_lock(hc->hc_lock);
	if (hc->hc_bump != BUMP_PENDING ||
	    hc_node_linked(&hc->hc_bumpreq.r_up)) {
		hast_shim_unlock(hc->hc_lock);
		return (HAST_EINVAL);
	}
	if (error == 0)
		hc->hc_bump = BUMP_OK;
	else {
		/*
		 * Fail what waited for the bump: writes held before issue
		 * and writes whose only copy is local.  The next write in
		 * the outage asks again.
		 */
		for (n = hc->hc_waitq.n_next; n != &hc->hc_waitq; n = next) {
			next = n->n_next;
			r = n->n_owner;
			if ((r->r_flags & RF_MARKED) &&
			    r->r_gen <= hc->hc_gen_done &&
			    hc->hc_link == HAST_LINK_DOWN)
				hc_fail_unissued(hc, r, HAST_EIO);
		}
		for (n = hc->hc_reqs.n_next; n != &hc->hc_reqs; n = n->n_next)
			if (n->n_owner->r_type == HC_T_REQ &&
			    (n->n_owner->r_flags & RF_ISSUED))
				n->n_owner->r_flags |= RF_BUMPFAIL;
		hc->hc_bump = hc->hc_link == HAST_LINK_DOWN ? BUMP_NEEDED :
		    BUMP_OK;
	}
	for (n = hc->hc_reqs.n_next; n != &hc->hc_reqs; n = next) {
		next = n->n_next;
		r = n->n_owner;
		if (r->r_type == HC_T_REQ && (r->r_flags & RF_ISSUED))
			hc_progress(hc, r);
	}
	hc_leave(hc);
	return (0);
}

int
hast_core_link(struct hast_core *hc, uint32_t state)
{
	struct hc_node *n, *next;
	struct hc_req *r;
	uint32_t i;

	if (state != HAST_LINK_UP && state != HAST_LINK_DOWN)
		return (HAST_EINVAL);
	hast_shim_lock(hc->hc_lock);
	if (state == HAST_LINK_UP) {
		hc->hc_link = HAST_LINK_UP;
		if (hc->hc_bump == BUMP_NEEDED)
			hc->hc_bump = BUMP_OK;
		hc_leave(hc);
		return (0);
	}
	if (hc->hc_link == HAST_LINK_UP && hc->hc_bump == BUMP_OK)
		hc->hc_bump = BUMP_NEEDED;
	hc->hc_link = HAST_LINK_DOWN;
	/*
	 * Written on both sides but never confirmed durable on the peer: the
	 * peer may have lost it (its power, say), so it is resynchronized.
	 */
	for (i = 0; i < hc->hc_mapsize; i++) {
		hc->hc_syncmap[i] |= hc->hc_ufmap[i];
		hc->hc_ufmap[i] = 0;
	}
	for (n = hc->hc_reqs.n_next; n != &hc->hc_reqs; n = next) {
		next = n->n_next;
		r = n->n_owner;
		if (r->r_type == HC_T_LOCK) {
			r->r_flags |= RF_LFAIL;
			continue;
		}
		if (r->r_type != HC_T_REQ || !(r->r_flags & RF_REMOTE))
			continue;
		/* Unconfirmed: the remote half failed. */
		if (hc_node_linked(&r->r_up))
			hc_list_remove(&r->r_up);
		r->r_flags &= ~(RF_REMOTE | RF_RRECV);
		hc_progress(hc, r);
	}
	hc_leave(hc);
	return (0);
}

int
hast_core_set_syncdir(struct hast_core *hc, uint32_t dir)
{

	if (dir != HAST_SYNC_NONE && dir != HAST_SYNC_TO_PEER &&
	    dir != HAST_SYNC_FROM_PEER)
		return (HAST_EINVAL);
	hast_shim_lock(hc->hc_lock);
	hc->hc_syncdir = dir;
	hast_shim_unlock(hc->hc_lock);
	return (0);
}

int
hast_core_set_mode(struct hast_core *hc, uint32_t mode)
{

	if (!hc_mode_valid(mode))
		return (HAST_EINVAL);
	hast_shim_lock(hc->hc_lock);
	hc->hc_mode = mode;
	hast_shim_unlock(hc->hc_lock);
	return (0);
}

int
hast_core_upcall_next(struct hast_core *hc, struct hast_abi_upcall *up)
{
	struct hc_req *r;

	hast_shim_lock(hc->hc_lock);
	if (hc_list_empty(&hc->hc_upq)) {
		hast_shim_unlock(hc->hc_lock);
		return (0);
	}
	r = hc->hc_upq.n_next->n_owner;
	hc_list_remove(&r->r_up);
	up->hu_version = HAST_ABI_VERSION;
	up->hu_kind = r->r_upkind;
	up->hu_unit = 0;
	up->hu_seq = r->r_seq;
	up->hu_offset = r->r_offset;
	up->hu_length = r->r_length;
	up->hu_cookie = r->r_cookie;
	up->hu_error = 0;
	up->hu_flags = (r->r_flags & RF_MEMSYNC) ? HAST_UPF_MEMSYNC : 0;
	up->hu_data = 0;
	up->hu_datalen = 0;
	switch (r->r_type) {
	case HC_T_REQ:
		r->r_flags |= RF_RTAKEN;
		break;
	case HC_T_SYNCIO:
		up->hu_error = r->r_lerr;
		hc_req_free(hc, r);
		break;
	default:
		break;
	}
	hast_shim_unlock(hc->hc_lock);
	return (1);
}

uint32_t
hast_core_map_size(const struct hast_core *hc)
{

	return (hc->hc_disksize);
}

uint32_t
hast_core_nextents(const struct hast_core *hc)
{

	return (hc->hc_nextents);
}

int
hast_core_map_get(struct hast_core *hc, uint32_t which, uint8_t *buf,
    uint32_t size)
{
	uint32_t i;
	uint8_t b;

	if (size < hc->hc_disksize || buf == NULL)
		return (HAST_EINVAL);
	if (which != HAST_MAP_SYNC && which != HAST_MAP_DISK &&
	    which != HAST_MAP_DIRTY)
		return (HAST_EINVAL);
	hast_shim_lock(hc->hc_lock);
	for (i = 0; i < hc->hc_disksize; i++) {
		if (which == HAST_MAP_DISK)
			b = hc->hc_diskmap[i];
		else if (i >= hc->hc_mapsize)
			b = 0;
		else if (which == HAST_MAP_SYNC)
			b = hc->hc_syncmap[i];
		else
			b = hc_wanted_byte(hc, i);
		buf[i] = (uint8_t)(b & hc_byte_mask(hc, i));
	}
	hast_shim_unlock(hc->hc_lock);
	return (0);
}

int
hast_core_map_load(struct hast_core *hc, const uint8_t *buf, uint32_t size)
{
	uint32_t i;
	uint8_t b;

	if (size < hc->hc_disksize || buf == NULL)
		return (HAST_EINVAL);
	hast_shim_lock(hc->hc_lock);
	if (!hc_list_empty(&hc->hc_reqs) || hc->hc_map_inflight ||
	    hc->hc_map_issue) {
		hast_shim_unlock(hc->hc_lock);
		return (HAST_EBUSY);
	}
	for (i = 0; i < hc->hc_disksize; i++) {
		b = (uint8_t)(buf[i] & hc_byte_mask(hc, i));
		hc->hc_diskmap[i] = b;
		if (i < hc->hc_mapsize)
			hc->hc_syncmap[i] = b;
	}
	hast_shim_unlock(hc->hc_lock);
	return (0);
}

int
hast_core_map_merge(struct hast_core *hc, const uint8_t *buf, uint32_t size)
{
	uint32_t i;
	uint8_t add, ondisk;

	if (size < hc->hc_mapsize || buf == NULL)
		return (HAST_EINVAL);
	hast_shim_lock(hc->hc_lock);
	for (i = 0; i < hc->hc_mapsize; i++) {
		add = (uint8_t)(buf[i] & hc_byte_mask(hc, i) &
		    ~hc->hc_syncmap[i]);
		if (add == 0)
			continue;
		hc->hc_syncmap[i] |= add;
		/* Marked on disk and kept by the map write in flight? */
		ondisk = hc->hc_diskmap[i];
		if (hc->hc_map_inflight)
			ondisk &= hc->hc_mapbuf[i];
		if ((add & ondisk) != add)
			hc->hc_map_want = 1;
	}
	hc_leave(hc);
	return (0);
}

int
hast_core_sync_lock(struct hast_core *hc, uint64_t offset, uint64_t length,
    uint64_t *seqp)
{
	struct hc_req *l;

	if (!hc_range_valid(hc, offset, length))
		return (HAST_EINVAL);
	hast_shim_lock(hc->hc_lock);
	l = hc_req_new(hc, HC_T_LOCK);
	if (l == NULL) {
		hast_shim_unlock(hc->hc_lock);
		return (HAST_ENOMEM);
	}
	l->r_offset = offset;
	l->r_length = length;
	if (hc->hc_link == HAST_LINK_DOWN)
		l->r_flags |= RF_LFAIL;
	hc_list_append(&hc->hc_locks, &l->r_wait, l);
	if (seqp != NULL)
		*seqp = l->r_seq;
	hc_leave(hc);
	return (0);
}

int
hast_core_sync_io(struct hast_core *hc, uint64_t lockseq, uint32_t cmd,
    uint64_t offset, uint64_t length, uint64_t cookie, uint64_t *seqp)
{
	struct hc_req *l, *r;

	if (cmd != HAST_CMD_READ && cmd != HAST_CMD_WRITE)
		return (HAST_EINVAL);
	hast_shim_lock(hc->hc_lock);
	l = hc_lookup(hc, lockseq);
	if (l == NULL || l->r_type != HC_T_LOCK) {
		hast_shim_unlock(hc->hc_lock);
		return (HAST_ENOENT);
	}
	if (!(l->r_flags & RF_GRANTED) || !hc_range_valid(hc, offset, length) ||
	    offset < l->r_offset || offset > l->r_offset + l->r_length ||
	    length > l->r_offset + l->r_length - offset) {
		hast_shim_unlock(hc->hc_lock);
		return (HAST_EINVAL);
	}
	r = hc_req_new(hc, HC_T_SYNCIO);
	if (r == NULL) {
		hast_shim_unlock(hc->hc_lock);
		return (HAST_ENOMEM);
	}
	r->r_cmd = cmd;
	r->r_offset = offset;
	r->r_length = length;
	r->r_cookie = cookie;
	r->r_lock = l;
	l->r_nio++;
	if (seqp != NULL)
		*seqp = r->r_seq;
	hc_local_start(hc, r);
	hc_leave(hc);
	return (0);
}

int
hast_core_sync_release(struct hast_core *hc, uint64_t lockseq, int clear)
{
	struct hc_req *l;
	uint64_t start, end;
	uint32_t e;
	int error;

	hast_shim_lock(hc->hc_lock);
	l = hc_lookup(hc, lockseq);
	if (l == NULL || l->r_type != HC_T_LOCK) {
		hast_shim_unlock(hc->hc_lock);
		return (HAST_ENOENT);
	}
	if (l->r_nio > 0) {
		hast_shim_unlock(hc->hc_lock);
		return (HAST_EBUSY);
	}
	error = 0;
	if (clear && (l->r_flags & RF_GRANTED)) {
		if (l->r_flags & RF_LFAIL)
			error = HAST_EIO;
		else {
			/* Clear the extents the range covers completely. */
			e = (uint32_t)((l->r_offset + hc->hc_extentsize - 1) >>
			    hc->hc_shift);
			for (; e < hc->hc_nextents; e++) {
				start = (uint64_t)e << hc->hc_shift;
				end = start + hc->hc_extentsize;
				if (end > hc->hc_mediasize)
					end = hc->hc_mediasize;
				if (end > l->r_offset + l->r_length)
					break;
				/* Copied: durable once a flush covers it. */
				if (!hc_bit(hc->hc_syncmap, e))
					continue;
				hc_bit_clear(hc->hc_syncmap, e);
				hc_await_flush(hc, e);
			}
		}
	}
	hc_list_remove(&l->r_wait);
	if (hc_node_linked(&l->r_up))
		hc_list_remove(&l->r_up);
	hc_req_free(hc, l);
	hc_leave(hc);
	return (error);
}

/* Zero *st without a library call (struct copies may become memcpy). */
static void
hc_stats_zero(struct hast_abi_stats *st)
{
	volatile uint8_t *p;
	uint32_t i;

	p = (volatile uint8_t *)st;
	for (i = 0; i < sizeof(*st); i++)
		p[i] = 0;
}

void
hast_core_stats(struct hast_core *hc, struct hast_abi_stats *st)
{
	const struct hc_node *n;
	const struct hc_req *r;
	uint64_t now, oldest;
	uint32_t e;

	now = hast_shim_time_ns();
	hast_shim_lock(hc->hc_lock);
	hc_stats_zero(st);
	st->hs_version = HAST_ABI_VERSION;
	st->hs_reads = hc->hc_st.hs_reads;
	st->hs_writes = hc->hc_st.hs_writes;
	st->hs_deletes = hc->hc_st.hs_deletes;
	st->hs_flushes = hc->hc_st.hs_flushes;
	st->hs_activemap_updates = hc->hc_st.hs_activemap_updates;
	st->hs_read_errors = hc->hc_st.hs_read_errors;
	st->hs_write_errors = hc->hc_st.hs_write_errors;
	st->hs_delete_errors = hc->hc_st.hs_delete_errors;
	st->hs_flush_errors = hc->hc_st.hs_flush_errors;
	oldest = now;
	for (n = hc->hc_reqs.n_next; n != &hc->hc_reqs; n = n->n_next) {
		r = n->n_owner;
		if (r->r_flags & RF_LOCAL)
			st->hs_q_local++;
		if (hc_node_linked(&r->r_up))
			st->hs_q_send++;
		if (r->r_type == HC_T_LOCK)
			st->hs_sync_locks++;
		if (r->r_type != HC_T_REQ)
			continue;
		if ((r->r_flags & (RF_REMOTE | RF_RTAKEN)) ==
		    (RF_REMOTE | RF_RTAKEN))
			st->hs_q_recv++;
		/* Updates whose extents join the syncmap when they finish. */
		if (hc_is_update(r->r_cmd) &&
		    !(r->r_flags & (RF_REMOTE | RF_ROK)) &&
		    ((r->r_flags & RF_ISSUED) || hc->hc_link == HAST_LINK_DOWN))
			st->hs_unsynced++;
		if (r->r_flags & RF_ACKED)
			st->hs_q_done++;
		if (hc_node_linked(&r->r_wait)) {
			st->hs_q_held++;
			if (r->r_flags & RF_MARKED)
				st->hs_q_mapwait++;
		}
		if (r->r_start < oldest)
			oldest = r->r_start;
	}
	if (hc_node_linked(&hc->hc_bumpreq.r_up))
		st->hs_q_send++;
	for (e = 0; e < hc->hc_nextents; e++) {
		if (hc->hc_count[e] > 0 || hc_bit(hc->hc_syncmap, e) ||
		    hc_bit(hc->hc_ufmap, e))
			st->hs_dirty++;
		if (hc_bit(hc->hc_syncmap, e))
			st->hs_syncdirty++;
		/* Waiting for flushes of both sides to leave the map. */
		if (hc_bit(hc->hc_ufmap, e) || hc_bit(hc->hc_hotmap, e))
			st->hs_unflushed++;
	}
	st->hs_flush_gen = hc->hc_fgen;
	st->hs_flush_done = hc->hc_fgen_done;
	st->hs_flush_busy = (uint32_t)hc->hc_iflush;
	st->hs_keepdirty = hc->hc_nkd;
	st->hs_oldest_ns = now - oldest;
	st->hs_link = hc->hc_link;
	st->hs_syncdir = hc->hc_syncdir;
	st->hs_mode = hc->hc_mode;
	hast_shim_unlock(hc->hc_lock);
}
