/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * geom_io.c: bios (g_bio(9)) and their way through GEOM: g_io_request
 * queues a bio for the g_down thread, which checks it (g_io_check) and
 * calls the provider's start method; g_io_deliver queues it for the g_up
 * thread, which calls its done routine.  Neither thread may sleep.  A
 * bio delivered with ENOMEM is sent again (GEOM's retry), after a pause.
 *
 * The bio zone knows every live bio and where it is, so that destroying
 * a bio in flight or twice, requesting one already in flight, delivering
 * one twice, or detaching a consumer with requests in flight panics, and
 * leaks show at teardown.
 */

#include "kshim_impl.h"

#define	BIO_MAGIC_LIVE	0x62696f21U	/* "bio!" */
#define	BIO_MAGIC_DEAD	0x64656164U

enum {
	KSHIM_BIO_IDLE = 1,	/* the owner's */
	KSHIM_BIO_DOWN,		/* queued for g_down */
	KSHIM_BIO_PROVIDER,	/* in the provider's start method or after */
	KSHIM_BIO_UP		/* queued for g_up */
};

static const char *const bio_states[] = {
	"?", "idle", "queued down", "in its provider", "queued up"
};

static pthread_mutex_t bio_zone_mtx = PTHREAD_MUTEX_INITIALIZER;
/*
 * Destroyed bios wait here before their memory is freed, still marked
 * dead, so that a second g_destroy_bio (or any use) is recognized.
 */
#define	BIO_QUARANTINE	1024
static struct bio *bio_quarantine[BIO_QUARANTINE];
static unsigned bio_qhead;
static TAILQ_HEAD(, bio) bio_live = TAILQ_HEAD_INITIALIZER(bio_live);
static int64_t bio_nlive, bio_ninflight;
static uint64_t bio_serial;

/* The two queues, as the kernel's g_bio_run_down / g_bio_run_up. */
struct g_bioq {
	TAILQ_HEAD(, bio)	 bio_queue;
	struct mtx		 bio_queue_lock;
	int			 bio_queue_length;
};
static struct g_bioq g_bio_run_down, g_bio_run_up;
static int g_wait_down, g_wait_up;
static int pace;

static const char *
bio_state_name(uint32_t st)
{

	return (st < nitems(bio_states) ? bio_states[st] : "?");
}

static void
bio_check_live(struct bio *bp, const char *op)
{

	if (bp->bio_kshim_magic == BIO_MAGIC_DEAD)
		panic("%s of a destroyed bio %p (serial %ju)", op, (void *)bp,
		    (uintmax_t)bp->bio_kshim_serial);
	if (bp->bio_kshim_magic != BIO_MAGIC_LIVE)
		panic("%s of %p, which is no bio of g_new_bio/g_alloc_bio/"
		    "g_clone_bio", op, (void *)bp);
}

/* Move bp from state `from` to `to`; panics when it is elsewhere. */
static void
bio_transition(struct bio *bp, uint32_t from, uint32_t to, const char *op)
{

	pthread_mutex_lock(&bio_zone_mtx);
	bio_check_live(bp, op);
	if (bp->bio_kshim_state != from)
		panic("%s of bio %p (cmd %u, serial %ju): it is %s, not %s",
		    op, (void *)bp, bp->bio_cmd,
		    (uintmax_t)bp->bio_kshim_serial,
		    bio_state_name(bp->bio_kshim_state),
		    bio_state_name(from));
	if (from == KSHIM_BIO_IDLE && to != KSHIM_BIO_IDLE)
		bio_ninflight++;
	if (to == KSHIM_BIO_IDLE && from != KSHIM_BIO_IDLE)
		bio_ninflight--;
	bp->bio_kshim_state = to;
	pthread_mutex_unlock(&bio_zone_mtx);
}

static struct bio *
bio_alloc(int flags)
{
	struct bio *bp;

	bp = kshim_malloc(sizeof(*bp), M_GEOM, flags | M_ZERO, __FILE__,
	    __LINE__);
	if (bp == NULL)
		return (NULL);
	pthread_mutex_lock(&bio_zone_mtx);
	bp->bio_kshim_magic = BIO_MAGIC_LIVE;
	bp->bio_kshim_state = KSHIM_BIO_IDLE;
	bp->bio_kshim_serial = ++bio_serial;
	TAILQ_INSERT_TAIL(&bio_live, bp, bio_kshim_all);
	bio_nlive++;
	pthread_mutex_unlock(&bio_zone_mtx);
	return (bp);
}

struct bio *
g_new_bio(void)
{

	return (bio_alloc(M_NOWAIT));
}

struct bio *
g_alloc_bio(void)
{

	WITNESS_SLEEP("g_alloc_bio", NULL);
	return (bio_alloc(M_WAITOK));
}

static struct bio *
bio_clone(struct bio *bp, int flags)
{
	struct bio *bp2;

	pthread_mutex_lock(&bio_zone_mtx);
	bio_check_live(bp, "g_clone_bio");
	pthread_mutex_unlock(&bio_zone_mtx);
	if (flags == M_NOWAIT && kshim_fail_check(KSHIM_FAIL_CLONE_BIO))
		return (NULL);
	bp2 = bio_alloc(flags);
	if (bp2 == NULL)
		return (NULL);
	bp2->bio_parent = bp;
	bp2->bio_cmd = bp->bio_cmd;
	bp2->bio_flags = bp->bio_flags & BIO_ORDERED;
	bp2->bio_length = bp->bio_length;
	bp2->bio_offset = bp->bio_offset;
	bp2->bio_data = bp->bio_data;
	bp2->bio_attribute = bp->bio_attribute;
	bp->bio_children++;
	return (bp2);
}

struct bio *
g_clone_bio(struct bio *bp)
{

	return (bio_clone(bp, M_NOWAIT));
}

struct bio *
g_duplicate_bio(struct bio *bp)
{

	WITNESS_SLEEP("g_duplicate_bio", NULL);
	return (bio_clone(bp, M_WAITOK));
}

void
g_destroy_bio(struct bio *bp)
{
	struct bio *old;

	pthread_mutex_lock(&bio_zone_mtx);
	bio_check_live(bp, "g_destroy_bio");
	if (bp->bio_kshim_state != KSHIM_BIO_IDLE)
		panic("g_destroy_bio of bio %p (cmd %u, serial %ju) that is "
		    "%s", (void *)bp, bp->bio_cmd,
		    (uintmax_t)bp->bio_kshim_serial,
		    bio_state_name(bp->bio_kshim_state));
	bp->bio_kshim_magic = BIO_MAGIC_DEAD;
	TAILQ_REMOVE(&bio_live, bp, bio_kshim_all);
	bio_nlive--;
	old = bio_quarantine[bio_qhead];
	bio_quarantine[bio_qhead] = bp;
	bio_qhead = (bio_qhead + 1) % BIO_QUARANTINE;
	pthread_mutex_unlock(&bio_zone_mtx);
	if (old != NULL)
		kshim_free(old, M_GEOM, __FILE__, __LINE__);
}

void
g_reset_bio(struct bio *bp)
{
	uint64_t serial;

	pthread_mutex_lock(&bio_zone_mtx);
	bio_check_live(bp, "g_reset_bio");
	if (bp->bio_kshim_state != KSHIM_BIO_IDLE)
		panic("g_reset_bio of bio %p that is %s", (void *)bp,
		    bio_state_name(bp->bio_kshim_state));
	serial = bp->bio_kshim_serial;
	memset(bp, 0, offsetof(struct bio, bio_kshim_magic));
	bp->bio_kshim_serial = serial;
	pthread_mutex_unlock(&bio_zone_mtx);
}

void
kshim_bio_counts(int64_t *live, int64_t *inflight)
{

	pthread_mutex_lock(&bio_zone_mtx);
	*live = bio_nlive;
	*inflight = bio_ninflight;
	pthread_mutex_unlock(&bio_zone_mtx);
}

void
kshim_bio_describe(char *buf, size_t len)
{
	struct bio *bp;
	int n;

	n = 0;
	pthread_mutex_lock(&bio_zone_mtx);
	TAILQ_FOREACH(bp, &bio_live, bio_kshim_all) {
		if (n++ < 8)
			kshim_bufcat(buf, len, " [bio %ju cmd %u off %jd len "
			    "%jd %s]", (uintmax_t)bp->bio_kshim_serial,
			    bp->bio_cmd, (intmax_t)bp->bio_offset,
			    (intmax_t)bp->bio_length,
			    bio_state_name(bp->bio_kshim_state));
	}
	pthread_mutex_unlock(&bio_zone_mtx);
	if (n > 8)
		kshim_bufcat(buf, len, " and %d more", n - 8);
}

/* nstart == nend: nothing of cp's in flight. */
int
kshim_consumer_idle(struct g_consumer *cp)
{
	int idle;

	pthread_mutex_lock(&bio_zone_mtx);
	idle = cp->nstart == cp->nend;
	pthread_mutex_unlock(&bio_zone_mtx);
	return (idle);
}

/*
 * The queues.
 */
static void
g_bioq_init(struct g_bioq *q, const char *name)
{

	TAILQ_INIT(&q->bio_queue);
	mtx_init(&q->bio_queue_lock, name, NULL, MTX_DEF);
}

static void
g_bioq_put(struct g_bioq *q, struct bio *bp, int *chan)
{
	int first;

	mtx_lock(&q->bio_queue_lock);
	first = TAILQ_EMPTY(&q->bio_queue);
	TAILQ_INSERT_TAIL(&q->bio_queue, bp, bio_queue);
	bp->bio_flags |= BIO_ONQUEUE;
	q->bio_queue_length++;
	mtx_unlock(&q->bio_queue_lock);
	if (first)
		wakeup(chan);
}

static struct bio *
g_bioq_take(struct g_bioq *q, int *chan, const char *wmesg)
{
	struct bio *bp;

	mtx_lock(&q->bio_queue_lock);
	while ((bp = TAILQ_FIRST(&q->bio_queue)) == NULL)
		msleep(chan, &q->bio_queue_lock, PRIBIO, wmesg, 0);
	TAILQ_REMOVE(&q->bio_queue, bp, bio_queue);
	bp->bio_flags &= ~BIO_ONQUEUE;
	q->bio_queue_length--;
	mtx_unlock(&q->bio_queue_lock);
	return (bp);
}

void
g_io_request(struct bio *bp, struct g_consumer *cp)
{
	struct g_provider *pp;
	uint16_t cmd;

	KASSERT(cp != NULL, ("NULL cp in g_io_request"));
	KASSERT(bp != NULL, ("NULL bp in g_io_request"));
	pp = cp->provider;
	KASSERT(pp != NULL, ("consumer not attached in g_io_request"));
	cmd = bp->bio_cmd;
	if (cmd == BIO_READ || cmd == BIO_WRITE || cmd == BIO_GETATTR)
		KASSERT(bp->bio_data != NULL,
		    ("NULL bp->data in g_io_request(cmd=%hu)", cmd));
	if (cmd == BIO_DELETE || cmd == BIO_FLUSH)
		KASSERT(bp->bio_data == NULL,
		    ("non-NULL bp->data in g_io_request(cmd=%hu)", cmd));
	if (cmd == BIO_READ || cmd == BIO_WRITE || cmd == BIO_DELETE) {
		KASSERT(bp->bio_offset % pp->sectorsize == 0,
		    ("wrong offset %jd for sectorsize %u",
		    (intmax_t)bp->bio_offset, pp->sectorsize));
		KASSERT(bp->bio_length % pp->sectorsize == 0,
		    ("wrong length %jd for sectorsize %u",
		    (intmax_t)bp->bio_length, pp->sectorsize));
	}
	KASSERT(bp->bio_done != NULL || bp->bio_parent == NULL,
	    ("g_io_request: a clone without a done routine"));
	KASSERT(!(bp->bio_flags & BIO_ONQUEUE),
	    ("Bio already on queue bp=%p", bp));
	bio_transition(bp, KSHIM_BIO_IDLE, KSHIM_BIO_DOWN, "g_io_request");
	bp->bio_from = cp;
	bp->bio_to = pp;
	bp->bio_error = 0;
	bp->bio_completed = 0;
	bp->bio_flags &= ~(BIO_ERROR | BIO_DONE);
	pthread_mutex_lock(&bio_zone_mtx);
	pp->nstart++;
	cp->nstart++;
	pthread_mutex_unlock(&bio_zone_mtx);
	g_bioq_put(&g_bio_run_down, bp, &g_wait_down);
}

/* What g_down checks before start: EJUSTRETURN means "go ahead". */
static int
g_io_check(struct bio *bp)
{
	struct g_consumer *cp;
	struct g_provider *pp;
	off_t excess;

	cp = bp->bio_from;
	pp = bp->bio_to;
	switch (bp->bio_cmd) {
	case BIO_READ:
	case BIO_GETATTR:
		if (KLOAD(cp->acr) == 0)
			return (KERR_EPERM);
		break;
	case BIO_WRITE:
	case BIO_DELETE:
	case BIO_FLUSH:
		if (KLOAD(cp->acw) == 0)
			return (KERR_EPERM);
		break;
	case BIO_SPEEDUP:
		break;
	default:
		return (KERR_EPERM);
	}
	if (KLOAD(pp->error) != 0)
		return (KLOAD(pp->error));
	if ((KLOAD(cp->flags) & G_CF_ORPHAN) != 0)
		return (KERR_ENXIO);
	switch (bp->bio_cmd) {
	case BIO_READ:
	case BIO_WRITE:
	case BIO_DELETE:
		if (pp->sectorsize == 0 || pp->mediasize == 0)
			return (KERR_ENXIO);
		if (bp->bio_offset % pp->sectorsize != 0)
			return (KERR_EINVAL);
		if (bp->bio_length % pp->sectorsize != 0)
			return (KERR_EINVAL);
		if (bp->bio_offset < 0 || bp->bio_offset > pp->mediasize)
			return (KERR_EIO);
		excess = bp->bio_offset + bp->bio_length;
		if (excess > pp->mediasize)
			bp->bio_length -= excess - pp->mediasize;
		if (bp->bio_length == 0)
			return (0);
		break;
	default:
		break;
	}
	return (KERR_EJUSTRETURN);
}

void
g_io_deliver(struct bio *bp, int error)
{
	struct g_consumer *cp;
	struct g_provider *pp;

	KASSERT(bp != NULL, ("NULL bp in g_io_deliver"));
	pp = bp->bio_to;
	KASSERT(pp != NULL, ("NULL bio_to in g_io_deliver"));
	cp = bp->bio_from;
	KASSERT(cp != NULL, ("NULL bio_from in g_io_deliver"));
	KASSERT(bp->bio_completed >= 0, ("bio_completed can't be less than 0"));
	KASSERT(bp->bio_completed <= bp->bio_length,
	    ("bio_completed can't be greater than bio_length"));
	bio_transition(bp, KSHIM_BIO_PROVIDER, KSHIM_BIO_UP, "g_io_deliver");
	bp->bio_bcount = bp->bio_length;
	bp->bio_resid = bp->bio_bcount - bp->bio_completed;
	pthread_mutex_lock(&bio_zone_mtx);
	cp->nend++;
	pp->nend++;
	pthread_mutex_unlock(&bio_zone_mtx);
	if (error != KERR_ENOMEM) {
		bp->bio_error = error;
		if (error != 0)
			bp->bio_flags |= BIO_ERROR;
		g_bioq_put(&g_bio_run_up, bp, &g_wait_up);
		return;
	}
	/* A shortage: GEOM sends the bio again, a little later. */
	bp->bio_children = 0;
	bp->bio_inbed = 0;
	bp->bio_driver1 = NULL;
	bp->bio_driver2 = NULL;
	bp->bio_pflags = 0;
	bio_transition(bp, KSHIM_BIO_UP, KSHIM_BIO_IDLE, "g_io_deliver");
	__atomic_store_n(&pace, 1, __ATOMIC_RELAXED);
	g_io_request(bp, cp);
}

void
biodone(struct bio *bp)
{

	if (bp->bio_done == NULL) {
		mtx_lock(&g_bio_run_up.bio_queue_lock);
		bp->bio_flags |= BIO_DONE;
		wakeup(bp);
		mtx_unlock(&g_bio_run_up.bio_queue_lock);
	} else
		bp->bio_done(bp);
}

void
g_std_done(struct bio *bp)
{
	struct bio *bp2;

	bp2 = bp->bio_parent;
	if (bp2->bio_error == 0)
		bp2->bio_error = bp->bio_error;
	bp2->bio_completed += bp->bio_completed;
	g_destroy_bio(bp);
	bp2->bio_inbed++;
	if (bp2->bio_children == bp2->bio_inbed) {
		bp2->bio_resid = bp2->bio_bcount - bp2->bio_completed;
		g_io_deliver(bp2, bp2->bio_error);
	}
}

static void *
g_down_thread(void *arg)
{
	struct thread *td;
	struct bio *bp;
	int error;

	(void)arg;
	td = curthread;
	td->td_name = "g_down";
	for (;;) {
		bp = g_bioq_take(&g_bio_run_down, &g_wait_down, "-");
		bio_transition(bp, KSHIM_BIO_DOWN, KSHIM_BIO_PROVIDER, "g_down");
		THREAD_NO_SLEEPING();
		error = g_io_check(bp);
		if (error >= 0)
			g_io_deliver(bp, error);
		else
			bp->bio_to->geom->start(bp);
		THREAD_SLEEPING_OK();
		kshim_witness_assert_none("returning from a start method");
		if (__atomic_exchange_n(&pace, 0, __ATOMIC_RELAXED) != 0)
			(void)pause_sig("g_down", 1);
	}
	return (NULL);
}

static void *
g_up_thread(void *arg)
{
	struct thread *td;
	struct bio *bp;

	(void)arg;
	td = curthread;
	td->td_name = "g_up";
	for (;;) {
		bp = g_bioq_take(&g_bio_run_up, &g_wait_up, "-");
		bio_transition(bp, KSHIM_BIO_UP, KSHIM_BIO_IDLE, "g_up");
		THREAD_NO_SLEEPING();
		biodone(bp);
		THREAD_SLEEPING_OK();
		kshim_witness_assert_none("returning from a done routine");
	}
	return (NULL);
}

void
kshim_bio_start_threads(void)
{
	pthread_t t;

	g_bioq_init(&g_bio_run_down, "bio queue down");
	g_bioq_init(&g_bio_run_up, "bio queue up");
	kshim_pthread_check(pthread_create(&t, NULL, g_down_thread, NULL),
	    "pthread_create(g_down)");
	pthread_detach(t);
	kshim_pthread_check(pthread_create(&t, NULL, g_up_thread, NULL),
	    "pthread_create(g_up)");
	pthread_detach(t);
}
