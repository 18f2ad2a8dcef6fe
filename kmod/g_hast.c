/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * g_hast.c: the FreeBSD kernel host of the HAST fast path.
 *
 * The GEOM class HAST puts one provider, hast/NAME, on top of the local
 * disk (opened exclusively through one consumer, data at localoff, the
 * activemap at mapoff) and hands every request to the portable core
 * (hast_core.c, compiled unchanged).  The core decides; this file moves
 * bios and bytes:
 *
 *  - hco_local_io issues the local half on the consumer, hco_map_write
 *    writes the activemap sectors (then flushes with metaflush), and
 *    hco_complete / hco_release answer and forget the client's bio.
 *  - The replication engine (hastd) talks to the core through the control
 *    device /dev/hastctl (ioctls of ffi/hast_abi.h):
 *      HAST_IOC_UPCALL    sleeps (PCATCH) until the core queues an upcall,
 *                         takes it and copies a write's payload out to the
 *                         engine's buffer (g_gate's START);
 *      HAST_IOC_DOWNCALL  completions by seq (a peer read's data is copied
 *                         in), link state, mode, direction, bump result
 *                         (g_gate's DONE);
 *      HAST_IOC_RANGE     resync range locks and local I/O under them;
 *      HAST_IOC_MAP       fetch, load or merge the activemap;
 *      HAST_IOC_STATS     counters;
 *      HAST_IOC_CREATE / HAST_IOC_DESTROY.
 *
 * Nothing on the I/O path sleeps: g_hast_start, the bio done routines and
 * the core callbacks use only mutexes, M_NOWAIT allocations, wakeup(9) and
 * g_post_event(M_NOWAIT).  Every sleep happens in the engine's ioctl thread.
 *
 * Locking.  g_hast_mtx protects the list of instances, their reference
 * counts and the unload flag.  Per instance, sc_mtx protects the flags,
 * counters and lists of the softc and the state of each g_hast_io.  The
 * core has its own mutex; the order is sc_mtx before the core's mutex
 * (only hast_core_upcall_next and hast_core_destroy are called with sc_mtx
 * held: neither runs callbacks).  Every other core entry point is called
 * without sc_mtx, between g_hast_enter and g_hast_exit, which count the
 * threads inside the core so that destroy frees it only when nobody is.
 *
 * Lifetime of a client bio.  g_hast_start allocates a g_hast_io and clones
 * the local half up front (a shortage is ENOMEM, which GEOM retries), then
 * submits it with the g_hast_io as cookie.  The bio is delivered once the
 * core completed it, no ioctl thread is touching its data (gio_holds), and,
 * for a write, its payload was handed to the engine or the core released it:
 * in async mode the core may acknowledge before the engine took the copy,
 * and bio_data belongs to the client again after g_io_deliver.  The
 * g_hast_io is freed once delivered and released.
 */

#include <sys/param.h>
#include <sys/systm.h>
#include <sys/bio.h>
#include <sys/conf.h>
#include <sys/fcntl.h>
#include <sys/kernel.h>
#include <sys/limits.h>
#include <sys/lock.h>
#include <sys/malloc.h>
#include <sys/module.h>
#include <sys/mutex.h>
#include <sys/proc.h>
#include <sys/queue.h>
#include <sys/sbuf.h>
#include <sys/time.h>

#include <geom/geom.h>

#include "hast_abi.h"
#include "hast_shim.h"
#include "hast_core.h"

#define	G_HAST_CLASS_NAME	"HAST"
#define	G_HAST_CTL_NAME		"hastctl"
#define	G_HAST_PREFIX		"hast/"
/* Longest resync I/O (HAST_IOC_RANGE, HAST_RANGE_IO). */
#define	G_HAST_SYNC_MAXIO	(1024 * 1024)
/* How long HAST_IOC_DESTROY waits for the core to become idle. */
#define	G_HAST_DESTROY_WAIT	30

static MALLOC_DEFINE(M_HAST, "hast", "GEOM HAST data");

/* sc_flags */
#define	SCF_METAFLUSH	0x0001	/* flush after every map write */
#define	SCF_DESTROYING	0x0002	/* no new I/O or opens; draining */
#define	SCF_ORPHAN	0x0004	/* the local provider went away */
#define	SCF_DETACHQ	0x0008	/* a consumer detach event is posted */

/* gio_flags */
#define	GIO_COMPLETED	0x0001	/* hco_complete came (gio_error) */
#define	GIO_DELIVERED	0x0002	/* the client's bio was answered */
#define	GIO_RELEASED	0x0004	/* hco_release came */
#define	GIO_PAYLOAD	0x0008	/* a write's data reached the engine */
#define	GIO_TAKEN	0x0010	/* a peer read on sc_reads */

struct g_hast_softc;

/* One client request (cookie of the core). */
struct g_hast_io {
	TAILQ_ENTRY(g_hast_io)	 gio_next;	/* sc_reads */
	struct g_hast_softc	*gio_sc;
	struct bio		*gio_bp;	/* the client's bio */
	struct bio		*gio_cbp;	/* local half, until issued */
	uint64_t		 gio_lseq;	/* seq of the local half */
	uint64_t		 gio_rseq;	/* seq of a taken peer read */
	uint64_t		 gio_length;	/* bio_length at start */
	uint32_t		 gio_cmd;	/* HAST_CMD_* */
	u_int			 gio_flags;	/* GIO_* */
	u_int			 gio_holds;	/* ioctl threads on bio_data */
	int			 gio_error;	/* the core's answer */
};

/* An ioctl thread waiting for a bio of its own, like bwait(9). */
struct g_hast_wait {
	int			 w_error;
	int			 w_done;	/* sc_mtx */
};

/* One resync I/O (HAST_RANGE_IO); lives in the ioctl's thread. */
struct g_hast_sio {
	struct g_hast_softc	*sio_sc;
	struct bio		*sio_bio;
	void			*sio_buf;	/* hr_length bytes */
	uint64_t		 sio_seq;
	struct g_hast_wait	 sio_wait;
};

/* A metadata write or flush from an ioctl thread (HAST_MAPOP_METADATA). */
struct g_hast_mio {
	struct g_hast_softc	*mio_sc;
	struct g_hast_wait	 mio_wait;
};

/* A sync range lock the engine holds; released on destroy. */
struct g_hast_lk {
	LIST_ENTRY(g_hast_lk)	 lk_next;
	uint64_t		 lk_seq;
};

struct g_hast_softc {
	LIST_ENTRY(g_hast_softc) sc_next;	/* g_hast_units */
	uint64_t		 sc_unit;
	u_int			 sc_ref;	/* g_hast_mtx */
	int			 sc_live;	/* g_hast_mtx: reachable */
	char			 sc_name[HAST_ABI_NAMELEN];
	char			 sc_local[HAST_ABI_NAMELEN];

	/* Topology, set at create; sc_consumer also under sc_mtx. */
	struct g_geom		*sc_geom;
	struct g_provider	*sc_provider;
	struct g_consumer	*sc_consumer;
	int			 sc_access;	/* we hold r1w1e1 */
	off_t			 sc_localoff;
	off_t			 sc_mapoff;
	off_t			 sc_lmediasize;	/* of the local provider */
	uint32_t		 sc_mapsize;

	struct mtx		 sc_mtx;
	struct hast_core	*sc_core;	/* NULL once destroyed */
	u_int			 sc_flags;	/* SCF_* */
	u_int			 sc_busy;	/* threads inside the core */
	u_int			 sc_cio;	/* bios on the consumer */
	u_int			 sc_upsleep;	/* UPCALL sleepers (channel) */
	TAILQ_HEAD(, g_hast_io)	 sc_reads;	/* peer reads taken */
	LIST_HEAD(, g_hast_lk)	 sc_locks;	/* sync locks held */
	struct hast_abi_upcall	 sc_park;	/* write too big for the */
	int			 sc_parked;	/* engine's buffer */

	/* At most one map write is in flight: its bios are preallocated. */
	struct bio		*sc_mapbio;
	struct bio		*sc_flushbio;
	/* The same for the core's own flush (hast_core_flush). */
	struct bio		*sc_iflushbio;
	uint64_t		 sc_iflushseq;
};

/*
 * Per open of /dev/hastctl: the units created through it.  When the engine
 * goes away (its descriptor's last close) their link goes down, so that no
 * client waits for a remote half nobody will finish.
 */
struct g_hast_owned {
	LIST_ENTRY(g_hast_owned) ow_next;
	uint64_t		 ow_unit;
};

struct g_hast_priv {
	LIST_HEAD(, g_hast_owned) pv_units;	/* g_hast_mtx */
};

/* What to do with a g_hast_io after dropping sc_mtx. */
struct g_hast_fin {
	struct bio		*fin_bp;	/* deliver */
	struct bio		*fin_cbp;	/* unused clone to destroy */
	struct g_hast_io	*fin_free;
	int			 fin_error;
};

static struct mtx g_hast_mtx;
static LIST_HEAD(, g_hast_softc) g_hast_units =
    LIST_HEAD_INITIALIZER(g_hast_units);
static uint64_t g_hast_nextunit = 1;
static u_int g_hast_nunits;	/* instances, including those being made */
static int g_hast_unloading;
static struct cdev *g_hast_dev;

static g_start_t g_hast_start;
static g_access_t g_hast_access;
static g_orphan_t g_hast_orphan;
static g_dumpconf_t g_hast_dumpconf;

static struct g_class g_hast_class = {
	.name =		G_HAST_CLASS_NAME,
	.version =	G_VERSION,
	.start =	g_hast_start,
	.access =	g_hast_access,
	.orphan =	g_hast_orphan,
	.dumpconf =	g_hast_dumpconf,
};

static d_open_t g_hast_open;
static d_ioctl_t g_hast_ioctl;

static struct cdevsw g_hast_cdevsw = {
	.d_version =	D_VERSION,
	.d_open =	g_hast_open,
	.d_ioctl =	g_hast_ioctl,
	.d_name =	G_HAST_CTL_NAME,
};

/*
 * The shim of hast_core.c (hast_shim.h).
 */
struct hast_shim_lock {
	struct mtx	l_mtx;
};

struct hast_shim_lock *
hast_shim_lock_alloc(void)
{
	struct hast_shim_lock *lk;

	lk = malloc(sizeof(*lk), M_HAST, M_NOWAIT | M_ZERO);
	if (lk == NULL)
		return (NULL);
	mtx_init(&lk->l_mtx, "hast core", NULL, MTX_DEF);
	return (lk);
}

void
hast_shim_lock_free(struct hast_shim_lock *lk)
{

	mtx_destroy(&lk->l_mtx);
	free(lk, M_HAST);
}

void
hast_shim_lock(struct hast_shim_lock *lk)
{

	mtx_lock(&lk->l_mtx);
}

void
hast_shim_unlock(struct hast_shim_lock *lk)
{

	mtx_unlock(&lk->l_mtx);
}

void *
hast_shim_alloc(uint64_t size)
{

	if (size == 0 || (uint64_t)(size_t)size != size)
		return (NULL);
	return (malloc((size_t)size, M_HAST, M_NOWAIT | M_ZERO));
}

void
hast_shim_free(void *p)
{

	if (p != NULL)
		free(p, M_HAST);
}

void
hast_shim_wakeup(void *chan)
{

	wakeup(chan);
}

uint64_t
hast_shim_time_ns(void)
{
	struct timespec ts;

	getnanouptime(&ts);
	return ((uint64_t)ts.tv_sec * 1000000000 + (uint64_t)ts.tv_nsec);
}

void
hast_shim_assert_fail(const char *expr, const char *file, int line)
{

	panic("hast_core: assertion \"%s\" failed at %s:%d", expr, file, line);
}

/*
 * Entering the core.  The pointer sc_core is only read under sc_mtx or
 * between g_hast_enter and g_hast_exit; destroy waits for sc_busy == 0.
 */
static int
g_hast_enter(struct g_hast_softc *sc, int newio)
{

	mtx_lock(&sc->sc_mtx);
	if (sc->sc_core == NULL ||
	    (newio && (sc->sc_flags & SCF_DESTROYING) != 0)) {
		mtx_unlock(&sc->sc_mtx);
		return (ENXIO);
	}
	sc->sc_busy++;
	mtx_unlock(&sc->sc_mtx);
	return (0);
}

static void
g_hast_exit(struct g_hast_softc *sc)
{

	mtx_lock(&sc->sc_mtx);
	KASSERT(sc->sc_busy > 0, ("%s: sc_busy underflow", __func__));
	sc->sc_busy--;
	if (sc->sc_busy == 0 && (sc->sc_flags & SCF_DESTROYING) != 0)
		wakeup(&sc->sc_busy);
	mtx_unlock(&sc->sc_mtx);
}

/* Completions from the I/O path: the core outlives its pending I/O. */
static void
g_hast_core_local_done(struct g_hast_softc *sc, uint64_t seq, int error)
{

	if (g_hast_enter(sc, 0) != 0)
		return;
	(void)hast_core_local_done(sc->sc_core, seq, error);
	g_hast_exit(sc);
}

static void
g_hast_core_map_done(struct g_hast_softc *sc, int error)
{

	if (g_hast_enter(sc, 0) != 0)
		return;
	(void)hast_core_map_done(sc->sc_core, error);
	g_hast_exit(sc);
}

static int
g_hast_core_remote_done(struct g_hast_softc *sc, uint64_t seq, int error)
{
	int rc;

	rc = g_hast_enter(sc, 0);
	if (rc != 0)
		return (rc);
	rc = hast_core_remote_done(sc->sc_core, seq, error);
	g_hast_exit(sc);
	return (rc);
}

/*
 * Client requests: deliver when due, free when finished (sc_mtx held).
 */
static void
g_hast_settle(struct g_hast_io *gio, struct g_hast_fin *fin)
{
	u_int f;

	mtx_assert(&gio->gio_sc->sc_mtx, MA_OWNED);
	fin->fin_bp = NULL;
	fin->fin_cbp = NULL;
	fin->fin_free = NULL;
	fin->fin_error = 0;
	f = gio->gio_flags;
	if ((f & (GIO_COMPLETED | GIO_DELIVERED)) == GIO_COMPLETED &&
	    gio->gio_holds == 0 && (gio->gio_cmd != HAST_CMD_WRITE ||
	    (f & (GIO_PAYLOAD | GIO_RELEASED)) != 0)) {
		gio->gio_flags |= GIO_DELIVERED;
		fin->fin_bp = gio->gio_bp;
		fin->fin_cbp = gio->gio_cbp;
		fin->fin_error = gio->gio_error;
		gio->gio_cbp = NULL;
	}
	f = gio->gio_flags;
	if ((f & (GIO_DELIVERED | GIO_RELEASED)) ==
	    (GIO_DELIVERED | GIO_RELEASED) && gio->gio_holds == 0) {
		KASSERT((f & GIO_TAKEN) == 0, ("%s: freeing a taken read",
		    __func__));
		fin->fin_free = gio;
	}
}

static void
g_hast_finish(struct g_hast_fin *fin)
{
	struct bio *bp;

	bp = fin->fin_bp;
	if (bp != NULL) {
		if (fin->fin_cbp != NULL) {
			/* A read served by the peer never used its clone. */
			g_destroy_bio(fin->fin_cbp);
			bp->bio_children--;
		}
		bp->bio_completed = fin->fin_error == 0 ? bp->bio_length : 0;
		g_io_deliver(bp, fin->fin_error);
	}
	if (fin->fin_free != NULL)
		free(fin->fin_free, M_HAST);
}

/* Drop an ioctl thread's hold on gio's data. */
static void
g_hast_unhold(struct g_hast_softc *sc, struct g_hast_io *gio, u_int flags)
{
	struct g_hast_fin fin;

	mtx_lock(&sc->sc_mtx);
	KASSERT(gio->gio_holds > 0, ("%s: no hold", __func__));
	gio->gio_holds--;
	gio->gio_flags |= flags;
	g_hast_settle(gio, &fin);
	mtx_unlock(&sc->sc_mtx);
	g_hast_finish(&fin);
}

/*
 * The consumer: every bio on it is counted in sc_cio so that an orphaned
 * consumer is detached only when idle.
 */
static void
g_hast_detach(struct g_hast_softc *sc)
{
	struct g_consumer *cp;

	g_topology_assert();
	cp = sc->sc_consumer;
	if (cp == NULL)
		return;
	mtx_lock(&sc->sc_mtx);
	KASSERT(sc->sc_cio == 0, ("%s: consumer busy", __func__));
	sc->sc_consumer = NULL;
	sc->sc_flags |= SCF_ORPHAN;	/* no more I/O on it */
	mtx_unlock(&sc->sc_mtx);
	if (sc->sc_access) {
		sc->sc_access = 0;
		(void)g_access(cp, -1, -1, -1);
	}
	g_detach(cp);
	g_destroy_consumer(cp);
}

static void
g_hast_detach_event(void *arg, int flag)
{
	struct g_hast_softc *sc;
	int idle;

	if (flag == EV_CANCEL)
		return;
	g_topology_assert();
	sc = arg;
	mtx_lock(&sc->sc_mtx);
	sc->sc_flags &= ~SCF_DETACHQ;
	idle = sc->sc_cio == 0 && sc->sc_consumer != NULL;
	mtx_unlock(&sc->sc_mtx);
	if (idle)
		g_hast_detach(sc);
}

/* Hand bp to the local provider; ENXIO once it is gone. */
static int
g_hast_issue(struct g_hast_softc *sc, struct bio *bp)
{
	struct g_consumer *cp;

	mtx_lock(&sc->sc_mtx);
	if ((sc->sc_flags & SCF_ORPHAN) != 0 || sc->sc_consumer == NULL) {
		mtx_unlock(&sc->sc_mtx);
		return (ENXIO);
	}
	sc->sc_cio++;
	cp = sc->sc_consumer;
	mtx_unlock(&sc->sc_mtx);
	g_io_request(bp, cp);
	return (0);
}

static void
g_hast_issued_done(struct g_hast_softc *sc)
{
	int post;

	mtx_lock(&sc->sc_mtx);
	KASSERT(sc->sc_cio > 0, ("%s: sc_cio underflow", __func__));
	sc->sc_cio--;
	post = sc->sc_cio == 0 && (sc->sc_flags & SCF_ORPHAN) != 0 &&
	    (sc->sc_flags & SCF_DETACHQ) == 0 && sc->sc_consumer != NULL;
	if (post)
		sc->sc_flags |= SCF_DETACHQ;
	mtx_unlock(&sc->sc_mtx);
	if (post && g_post_event(g_hast_detach_event, sc, M_NOWAIT, sc,
	    NULL) != 0) {
		/* Retried by the next completion or by destroy. */
		mtx_lock(&sc->sc_mtx);
		sc->sc_flags &= ~SCF_DETACHQ;
		mtx_unlock(&sc->sc_mtx);
	}
}

/* The result of a local bio, as the core should see it. */
static int
g_hast_bio_error(const struct bio *bp)
{
	int error;

	error = bp->bio_error;
	if (error == 0 && (bp->bio_cmd == BIO_READ ||
	    bp->bio_cmd == BIO_WRITE) && bp->bio_completed != bp->bio_length)
		error = EIO;
	/* A disk without TRIM or a write cache has nothing to do. */
	if (error == EOPNOTSUPP &&
	    (bp->bio_cmd == BIO_DELETE || bp->bio_cmd == BIO_FLUSH))
		error = 0;
	return (error);
}

static void
g_hast_io_done(struct bio *cbp)
{
	struct g_hast_softc *sc;
	struct g_hast_io *gio;
	struct bio *pbp;
	uint64_t seq;
	int error;

	gio = cbp->bio_caller1;
	sc = gio->gio_sc;
	seq = gio->gio_lseq;
	pbp = cbp->bio_parent;
	error = g_hast_bio_error(cbp);
	g_destroy_bio(cbp);
	pbp->bio_inbed++;
	g_hast_issued_done(sc);
	g_hast_core_local_done(sc, seq, error);
}

/* The bio an ioctl thread waits for is done (from its bio_done). */
static void
g_hast_wait_wakeup(struct g_hast_softc *sc, struct g_hast_wait *w, int error)
{

	mtx_lock(&sc->sc_mtx);
	w->w_error = error;
	w->w_done = 1;
	wakeup(w);
	mtx_unlock(&sc->sc_mtx);
}

/* In the ioctl thread: sleep, not interruptibly, until the bio is done. */
static int
g_hast_wait_sleep(struct g_hast_softc *sc, struct g_hast_wait *w,
    const char *wmesg)
{

	mtx_lock(&sc->sc_mtx);
	while (!w->w_done)
		msleep(w, &sc->sc_mtx, PRIBIO, wmesg, 0);
	mtx_unlock(&sc->sc_mtx);
	return (w->w_error);
}

static void
g_hast_sio_finish(struct g_hast_softc *sc, struct g_hast_sio *sio, int error)
{

	g_hast_core_local_done(sc, sio->sio_seq, error);
	g_hast_wait_wakeup(sc, &sio->sio_wait, error);
}

static void
g_hast_mio_done(struct bio *bp)
{
	struct g_hast_mio *mio;
	struct g_hast_softc *sc;
	int error;

	mio = bp->bio_caller1;
	sc = mio->mio_sc;
	error = g_hast_bio_error(bp);
	g_hast_issued_done(sc);
	g_hast_wait_wakeup(sc, &mio->mio_wait, error);
}

/*
 * One bio on the local provider outside the core, from an ioctl thread
 * (never the I/O path): wait for it like bwait(9).
 */
static int
g_hast_wait_bio(struct g_hast_softc *sc, int cmd, off_t offset, void *data,
    off_t length)
{
	struct g_hast_mio mio;
	struct bio *bp;
	int error;

	mio.mio_sc = sc;
	mio.mio_wait.w_error = 0;
	mio.mio_wait.w_done = 0;
	bp = g_alloc_bio();
	bp->bio_cmd = cmd;
	bp->bio_offset = offset;
	bp->bio_length = length;
	bp->bio_data = data;
	bp->bio_done = g_hast_mio_done;
	bp->bio_caller1 = &mio;
	error = g_hast_issue(sc, bp);
	if (error == 0)
		error = g_hast_wait_sleep(sc, &mio.mio_wait, "hastmeta");
	g_destroy_bio(bp);
	return (error);
}

/*
 * HAST_MAPOP_METADATA: the engine's metadata block at offset 0, then a
 * flush, so that a counter it records is on stable storage when it
 * returns.  Whole sectors, ending at or before the activemap.
 */
static int
g_hast_metadata_write(struct g_hast_softc *sc, struct hast_abi_map *m)
{
	struct g_consumer *cp;
	uint8_t *buf;
	u_int secsize;
	int error;

	mtx_lock(&sc->sc_mtx);
	cp = sc->sc_consumer;
	secsize = cp != NULL ? cp->provider->sectorsize : 0;
	mtx_unlock(&sc->sc_mtx);
	if (secsize == 0)
		return (ENXIO);
	if (m->hm_size == 0 || m->hm_size % secsize != 0 ||
	    (off_t)m->hm_size > sc->sc_mapoff)
		return (EINVAL);
	buf = malloc(m->hm_size, M_HAST, M_WAITOK);
	error = copyin((void *)(uintptr_t)m->hm_data, buf, m->hm_size);
	if (error == 0)
		error = g_hast_wait_bio(sc, BIO_WRITE, 0, buf,
		    (off_t)m->hm_size);
	if (error == 0) {
		error = g_hast_wait_bio(sc, BIO_FLUSH, 0, NULL, 0);
		/* A disk without a write cache has nothing to flush. */
		if (error == EOPNOTSUPP)
			error = 0;
	}
	free(buf, M_HAST);
	return (error);
}

static void
g_hast_sio_done(struct bio *bp)
{
	struct g_hast_sio *sio;
	struct g_hast_softc *sc;
	int error;

	sio = bp->bio_caller1;
	sc = sio->sio_sc;
	error = g_hast_bio_error(bp);
	g_hast_issued_done(sc);
	g_hast_sio_finish(sc, sio, error);
}

static void
g_hast_mapflush_done(struct bio *bp)
{
	struct g_hast_softc *sc;
	int error;

	sc = bp->bio_caller1;
	error = g_hast_bio_error(bp);
	g_hast_issued_done(sc);
	g_hast_core_map_done(sc, error);
}

/* The local half of the core's own flush. */
static void
g_hast_iflush_done(struct bio *bp)
{
	struct g_hast_softc *sc;
	int error;

	sc = bp->bio_caller1;
	error = g_hast_bio_error(bp);
	g_hast_issued_done(sc);
	g_hast_core_local_done(sc, sc->sc_iflushseq, error);
}

static void
g_hast_map_done(struct bio *bp)
{
	struct g_hast_softc *sc;
	struct bio *fbp;
	int error;

	sc = bp->bio_caller1;
	error = g_hast_bio_error(bp);
	g_hast_issued_done(sc);
	if (error == 0 && (sc->sc_flags & SCF_METAFLUSH) != 0) {
		fbp = sc->sc_flushbio;
		g_reset_bio(fbp);
		fbp->bio_cmd = BIO_FLUSH;
		fbp->bio_offset = sc->sc_lmediasize;
		fbp->bio_length = 0;
		fbp->bio_done = g_hast_mapflush_done;
		fbp->bio_caller1 = sc;
		error = g_hast_issue(sc, fbp);
		if (error == 0)
			return;
	}
	g_hast_core_map_done(sc, error);
}

/*
 * Callbacks of the core (struct hast_core_ops).  Called without the
 * core's lock and never with sc_mtx held; none sleeps.
 */
static void
g_hast_op_local_io(void *arg, const struct hast_core_io *io)
{
	struct g_hast_softc *sc;
	struct g_hast_io *gio;
	struct g_hast_sio *sio;
	struct bio *bp;

	sc = arg;
	if ((io->hio_flags & HAST_IOF_INTERNAL) != 0) {
		/* The core's own flush: at most one, its bio preallocated. */
		bp = sc->sc_iflushbio;
		g_reset_bio(bp);
		bp->bio_cmd = BIO_FLUSH;
		bp->bio_offset = sc->sc_lmediasize;
		bp->bio_length = 0;
		bp->bio_done = g_hast_iflush_done;
		bp->bio_caller1 = sc;
		sc->sc_iflushseq = io->hio_seq;
		if (g_hast_issue(sc, bp) != 0)
			g_hast_core_local_done(sc, io->hio_seq, ENXIO);
		return;
	}
	if ((io->hio_flags & HAST_IOF_SYNC) != 0) {
		sio = (struct g_hast_sio *)(uintptr_t)io->hio_cookie;
		sio->sio_seq = io->hio_seq;
		bp = sio->sio_bio;
		g_reset_bio(bp);
		bp->bio_cmd = io->hio_cmd == HAST_CMD_READ ? BIO_READ :
		    BIO_WRITE;
		bp->bio_offset = sc->sc_localoff + (off_t)io->hio_offset;
		bp->bio_length = (off_t)io->hio_length;
		bp->bio_data = sio->sio_buf;
		bp->bio_done = g_hast_sio_done;
		bp->bio_caller1 = sio;
		if (g_hast_issue(sc, bp) != 0)
			g_hast_sio_finish(sc, sio, ENXIO);
		return;
	}
	gio = (struct g_hast_io *)(uintptr_t)io->hio_cookie;
	mtx_lock(&sc->sc_mtx);
	bp = gio->gio_cbp;
	gio->gio_cbp = NULL;
	gio->gio_lseq = io->hio_seq;
	mtx_unlock(&sc->sc_mtx);
	KASSERT(bp != NULL, ("%s: local half issued twice", __func__));
	KASSERT(io->hio_cmd == gio->gio_cmd, ("%s: command changed",
	    __func__));
	if (io->hio_cmd == HAST_CMD_FLUSH) {
		bp->bio_offset = sc->sc_lmediasize;
		bp->bio_length = 0;
	} else {
		bp->bio_offset = sc->sc_localoff + (off_t)io->hio_offset;
		bp->bio_length = (off_t)io->hio_length;
	}
	bp->bio_done = g_hast_io_done;
	bp->bio_caller1 = gio;
	if (g_hast_issue(sc, bp) != 0) {
		bp->bio_parent->bio_inbed++;
		g_destroy_bio(bp);
		g_hast_core_local_done(sc, io->hio_seq, ENXIO);
	}
}

static void
g_hast_op_map_write(void *arg, const uint8_t *map, uint32_t size)
{
	struct g_hast_softc *sc;
	struct bio *bp;

	sc = arg;
	KASSERT(size <= sc->sc_mapsize, ("%s: map of %u bytes", __func__,
	    size));
	bp = sc->sc_mapbio;
	g_reset_bio(bp);
	bp->bio_cmd = BIO_WRITE;
	bp->bio_offset = sc->sc_mapoff;
	bp->bio_length = size;
	/* The core keeps map unchanged until hast_core_map_done(). */
	bp->bio_data = __DECONST(char *, map);
	bp->bio_done = g_hast_map_done;
	bp->bio_caller1 = sc;
	if (g_hast_issue(sc, bp) != 0)
		g_hast_core_map_done(sc, ENXIO);
}

static void
g_hast_op_complete(void *arg, uint64_t cookie, int32_t error)
{
	struct g_hast_softc *sc;
	struct g_hast_io *gio;
	struct g_hast_fin fin;

	sc = arg;
	gio = (struct g_hast_io *)(uintptr_t)cookie;
	mtx_lock(&sc->sc_mtx);
	KASSERT((gio->gio_flags & GIO_COMPLETED) == 0,
	    ("%s: completed twice", __func__));
	gio->gio_flags |= GIO_COMPLETED;
	gio->gio_error = error;
	g_hast_settle(gio, &fin);
	mtx_unlock(&sc->sc_mtx);
	g_hast_finish(&fin);
}

static void
g_hast_op_release(void *arg, uint64_t cookie)
{
	struct g_hast_softc *sc;
	struct g_hast_io *gio;
	struct g_hast_fin fin;

	sc = arg;
	gio = (struct g_hast_io *)(uintptr_t)cookie;
	mtx_lock(&sc->sc_mtx);
	gio->gio_flags |= GIO_RELEASED;
	if ((gio->gio_flags & GIO_TAKEN) != 0) {
		TAILQ_REMOVE(&sc->sc_reads, gio, gio_next);
		gio->gio_flags &= ~GIO_TAKEN;
	}
	g_hast_settle(gio, &fin);
	mtx_unlock(&sc->sc_mtx);
	g_hast_finish(&fin);
}

static void
g_hast_op_notify(void *arg)
{
	struct g_hast_softc *sc;

	sc = arg;
	mtx_lock(&sc->sc_mtx);
	wakeup(&sc->sc_upsleep);
	mtx_unlock(&sc->sc_mtx);
}

static const struct hast_core_ops g_hast_core_ops = {
	.hco_local_io =		g_hast_op_local_io,
	.hco_map_write =	g_hast_op_map_write,
	.hco_complete =		g_hast_op_complete,
	.hco_release =		g_hast_op_release,
	.hco_notify =		g_hast_op_notify,
};

/*
 * GEOM methods.
 */
static void
g_hast_start(struct bio *bp)
{
	struct g_hast_softc *sc;
	struct g_hast_io *gio;
	struct bio *cbp;
	uint64_t offset, length;
	uint32_t cmd;
	int error;

	sc = bp->bio_to->geom->softc;
	if (sc == NULL) {
		g_io_deliver(bp, ENXIO);
		return;
	}
	switch (bp->bio_cmd) {
	case BIO_READ:
		cmd = HAST_CMD_READ;
		break;
	case BIO_WRITE:
		cmd = HAST_CMD_WRITE;
		break;
	case BIO_DELETE:
		cmd = HAST_CMD_DELETE;
		break;
	case BIO_FLUSH:
		cmd = HAST_CMD_FLUSH;
		break;
	case BIO_GETATTR:
		if (g_handleattr_int(bp, "GEOM::candelete", 1))
			return;
		g_io_deliver(bp, EOPNOTSUPP);
		return;
#ifdef BIO_SPEEDUP
	case BIO_SPEEDUP:
		/* Nothing is queued here that could be hurried. */
		bp->bio_completed = bp->bio_length;
		g_io_deliver(bp, 0);
		return;
#endif
	default:
		g_io_deliver(bp, EOPNOTSUPP);
		return;
	}
	if (cmd == HAST_CMD_FLUSH) {
		offset = 0;
		length = 0;
	} else {
		offset = (uint64_t)bp->bio_offset;
		length = (uint64_t)bp->bio_length;
	}
	gio = malloc(sizeof(*gio), M_HAST, M_NOWAIT | M_ZERO);
	if (gio == NULL) {
		g_io_deliver(bp, ENOMEM);
		return;
	}
	cbp = g_clone_bio(bp);
	if (cbp == NULL) {
		free(gio, M_HAST);
		g_io_deliver(bp, ENOMEM);
		return;
	}
	gio->gio_sc = sc;
	gio->gio_bp = bp;
	gio->gio_cbp = cbp;
	gio->gio_cmd = cmd;
	gio->gio_length = length;
	error = g_hast_enter(sc, 1);
	if (error == 0) {
		/* From here on gio belongs to the core's callbacks. */
		error = hast_core_submit(sc->sc_core, cmd, offset, length,
		    (uint64_t)(uintptr_t)gio, NULL);
		g_hast_exit(sc);
	}
	if (error != 0) {
		g_destroy_bio(cbp);
		bp->bio_children--;
		free(gio, M_HAST);
		g_io_deliver(bp, error);
	}
}

static int
g_hast_access(struct g_provider *pp, int dr, int dw, int de)
{
	struct g_hast_softc *sc;

	g_topology_assert();
	if (dr <= 0 && dw <= 0 && de <= 0)
		return (0);		/* closing never fails */
	sc = pp->geom->softc;
	if (sc == NULL || (sc->sc_flags & SCF_DESTROYING) != 0)
		return (ENXIO);
	return (0);
}

/*
 * The local provider went away.  The provider stays: reads the core routes
 * to the peer and writes the peer confirms still succeed (the extents stay
 * dirty); local I/O fails with ENXIO.  The consumer is closed and detached
 * as soon as no bio of ours is on it.
 */
static void
g_hast_orphan(struct g_consumer *cp)
{
	struct g_hast_softc *sc;
	int idle;

	g_topology_assert();
	sc = cp->geom->softc;
	if (sc == NULL)
		return;
	printf("GEOM_HAST: %s%s: local provider %s disappeared.\n",
	    G_HAST_PREFIX, sc->sc_name, sc->sc_local);
	mtx_lock(&sc->sc_mtx);
	sc->sc_flags |= SCF_ORPHAN;
	idle = sc->sc_cio == 0;
	mtx_unlock(&sc->sc_mtx);
	if (idle)
		g_hast_detach(sc);
}

static const char *
g_hast_mode_name(uint32_t mode)
{

	switch (mode) {
	case HAST_REPL_FULLSYNC:
		return ("fullsync");
	case HAST_REPL_MEMSYNC:
		return ("memsync");
	case HAST_REPL_ASYNC:
		return ("async");
	default:
		return ("unknown");
	}
}

static void
g_hast_dumpconf(struct sbuf *sb, const char *indent, struct g_geom *gp,
    struct g_consumer *cp, struct g_provider *pp)
{
	struct hast_abi_stats st;
	struct g_hast_softc *sc;

	g_topology_assert();
	sc = gp->softc;
	if (sc == NULL || cp != NULL || pp != NULL)
		return;
	sbuf_printf(sb, "%s<Unit>%ju</Unit>\n", indent,
	    (uintmax_t)sc->sc_unit);
	/* Both names were checked to need no XML escaping. */
	sbuf_printf(sb, "%s<Local>%s</Local>\n", indent, sc->sc_local);
	sbuf_printf(sb, "%s<LocalOffset>%jd</LocalOffset>\n", indent,
	    (intmax_t)sc->sc_localoff);
	sbuf_printf(sb, "%s<MapOffset>%jd</MapOffset>\n", indent,
	    (intmax_t)sc->sc_mapoff);
	sbuf_printf(sb, "%s<MapSize>%u</MapSize>\n", indent, sc->sc_mapsize);
	if (g_hast_enter(sc, 0) != 0)
		return;
	hast_core_stats(sc->sc_core, &st);
	g_hast_exit(sc);
	sbuf_printf(sb, "%s<Link>%s</Link>\n", indent,
	    st.hs_link == HAST_LINK_UP ? "up" : "down");
	sbuf_printf(sb, "%s<Replication>%s</Replication>\n", indent,
	    g_hast_mode_name(st.hs_mode));
	sbuf_printf(sb, "%s<Dirty>%ju</Dirty>\n", indent,
	    (uintmax_t)st.hs_dirty);
	sbuf_printf(sb, "%s<SyncDirty>%ju</SyncDirty>\n", indent,
	    (uintmax_t)st.hs_syncdirty);
	sbuf_printf(sb, "%s<QueueLocal>%ju</QueueLocal>\n", indent,
	    (uintmax_t)st.hs_q_local);
	sbuf_printf(sb, "%s<QueueSend>%ju</QueueSend>\n", indent,
	    (uintmax_t)st.hs_q_send);
	sbuf_printf(sb, "%s<QueueRecv>%ju</QueueRecv>\n", indent,
	    (uintmax_t)st.hs_q_recv);
}

/*
 * Instances.
 */
static struct g_hast_softc *
g_hast_hold(uint64_t unit)
{
	struct g_hast_softc *sc;

	mtx_lock(&g_hast_mtx);
	LIST_FOREACH(sc, &g_hast_units, sc_next) {
		if (sc->sc_unit == unit && sc->sc_live) {
			sc->sc_ref++;
			break;
		}
	}
	mtx_unlock(&g_hast_mtx);
	return (sc);
}

static void
g_hast_rele(struct g_hast_softc *sc)
{

	mtx_lock(&g_hast_mtx);
	KASSERT(sc->sc_ref > 0, ("%s: sc_ref underflow", __func__));
	sc->sc_ref--;
	if (sc->sc_ref <= 1)
		wakeup(&sc->sc_ref);
	mtx_unlock(&g_hast_mtx);
}

/*
 * Copy a name from an ioctl struct: it may be unterminated, so the copy is
 * bounded; it must be non-empty and is limited to characters that need no
 * escaping in GEOM's XML and no quoting in a path.
 */
static int
g_hast_copyname(char *dst, const char *src, int slash)
{
	size_t i, len;
	char c;

	len = strnlen(src, HAST_ABI_NAMELEN);
	if (len == 0 || len >= HAST_ABI_NAMELEN)
		return (EINVAL);
	for (i = 0; i < len; i++) {
		c = src[i];
		if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		    (c >= '0' && c <= '9') || c == '.' || c == '_' ||
		    c == '-' || c == ':' || c == '+' || (slash && c == '/'))
			continue;
		return (EINVAL);
	}
	memcpy(dst, src, len);
	dst[len] = '\0';
	return (0);
}

static void
g_hast_free_softc(struct g_hast_softc *sc)
{

	if (sc->sc_mapbio != NULL)
		g_destroy_bio(sc->sc_mapbio);
	if (sc->sc_flushbio != NULL)
		g_destroy_bio(sc->sc_flushbio);
	if (sc->sc_iflushbio != NULL)
		g_destroy_bio(sc->sc_iflushbio);
	mtx_destroy(&sc->sc_mtx);
	free(sc, M_HAST);
}

static void
g_hast_priv_dtor(void *data)
{
	struct g_hast_priv *pv;
	struct g_hast_owned *ow;
	struct g_hast_softc *sc;

	pv = data;
	for (;;) {
		mtx_lock(&g_hast_mtx);
		ow = LIST_FIRST(&pv->pv_units);
		if (ow != NULL)
			LIST_REMOVE(ow, ow_next);
		mtx_unlock(&g_hast_mtx);
		if (ow == NULL)
			break;
		sc = g_hast_hold(ow->ow_unit);
		free(ow, M_HAST);
		if (sc == NULL)
			continue;	/* destroyed meanwhile */
		if (g_hast_enter(sc, 0) == 0) {
			(void)hast_core_link(sc->sc_core, HAST_LINK_DOWN);
			g_hast_exit(sc);
		}
		g_hast_rele(sc);
	}
	free(pv, M_HAST);
}

static int
g_hast_open(struct cdev *dev, int oflags, int devtype, struct thread *td)
{
	struct g_hast_priv *pv;
	int error;

	pv = malloc(sizeof(*pv), M_HAST, M_WAITOK | M_ZERO);
	LIST_INIT(&pv->pv_units);
	error = devfs_set_cdevpriv(pv, g_hast_priv_dtor);
	if (error != 0)
		free(pv, M_HAST);
	return (error);
}

/* Remember that the current descriptor created unit. */
static void
g_hast_own(uint64_t unit)
{
	struct g_hast_owned *ow;
	struct g_hast_priv *pv;

	if (devfs_get_cdevpriv((void **)&pv) != 0)
		return;
	ow = malloc(sizeof(*ow), M_HAST, M_WAITOK | M_ZERO);
	ow->ow_unit = unit;
	mtx_lock(&g_hast_mtx);
	LIST_INSERT_HEAD(&pv->pv_units, ow, ow_next);
	mtx_unlock(&g_hast_mtx);
}

static int
g_hast_ctl_create(struct hast_abi_create *c)
{
	char pname[sizeof(G_HAST_PREFIX) + HAST_ABI_NAMELEN];
	struct hast_core_params params;
	struct g_hast_softc *sc, *osc;
	struct g_provider *lpp, *pp;
	struct g_consumer *cp;
	struct g_geom *gp;
	struct hast_core *core;
	uint64_t end;
	uint8_t *map;
	int error;

	sc = malloc(sizeof(*sc), M_HAST, M_WAITOK | M_ZERO);
	mtx_init(&sc->sc_mtx, "hast softc", NULL, MTX_DEF);
	TAILQ_INIT(&sc->sc_reads);
	LIST_INIT(&sc->sc_locks);
	error = g_hast_copyname(sc->sc_name, c->hc_name, 0);
	if (error == 0)
		error = g_hast_copyname(sc->sc_local, c->hc_local, 1);
	if (error == 0 && ((c->hc_flags & ~HAST_CREATEF_METAFLUSH) != 0 ||
	    c->hc_sectorsize < DEV_BSIZE || c->hc_sectorsize > MAXPHYS ||
	    !powerof2(c->hc_sectorsize) || c->hc_mediasize == 0 ||
	    c->hc_mediasize % c->hc_sectorsize != 0 ||
	    c->hc_mediasize > (uint64_t)OFF_MAX ||
	    c->hc_localoff > (uint64_t)OFF_MAX ||
	    c->hc_mapoff > c->hc_localoff))
		error = EINVAL;
	if (error != 0) {
		g_hast_free_softc(sc);
		return (error);
	}
	if ((c->hc_flags & HAST_CREATEF_METAFLUSH) != 0)
		sc->sc_flags |= SCF_METAFLUSH;
	sc->sc_localoff = (off_t)c->hc_localoff;
	sc->sc_mapoff = (off_t)c->hc_mapoff;

	params.hcp_mediasize = c->hc_mediasize;
	params.hcp_extentsize = c->hc_extentsize;
	params.hcp_sectorsize = c->hc_sectorsize;
	params.hcp_keepdirty = c->hc_keepdirty;
	params.hcp_mode = c->hc_mode;
	error = hast_core_create(&params, &g_hast_core_ops, sc, &core);
	if (error != 0) {
		g_hast_free_softc(sc);
		return (error);
	}
	sc->sc_core = core;
	sc->sc_mapsize = hast_core_map_size(core);
	sc->sc_mapbio = g_alloc_bio();
	sc->sc_flushbio = g_alloc_bio();
	sc->sc_iflushbio = g_alloc_bio();

	/* The on-disk map, before any client can reach the provider. */
	if (c->hc_map != 0) {
		if (c->hc_mapsize < sc->sc_mapsize) {
			error = EINVAL;
			goto fail_core;
		}
		map = malloc(sc->sc_mapsize, M_HAST, M_WAITOK);
		error = copyin((void *)(uintptr_t)c->hc_map, map,
		    sc->sc_mapsize);
		if (error == 0)
			error = hast_core_map_load(core, map, sc->sc_mapsize);
		free(map, M_HAST);
		if (error != 0)
			goto fail_core;
	}

	/* Reserve the name and a unit; unload waits for g_hast_nunits. */
	mtx_lock(&g_hast_mtx);
	if (g_hast_unloading)
		error = ENXIO;
	LIST_FOREACH(osc, &g_hast_units, sc_next) {
		if (strcmp(osc->sc_name, sc->sc_name) == 0)
			error = EEXIST;
	}
	if (error == 0) {
		sc->sc_unit = g_hast_nextunit++;
		g_hast_nunits++;
		LIST_INSERT_HEAD(&g_hast_units, sc, sc_next);
	}
	mtx_unlock(&g_hast_mtx);
	if (error != 0)
		goto fail_core;

	snprintf(pname, sizeof(pname), "%s%s", G_HAST_PREFIX, sc->sc_name);
	g_topology_lock();
	lpp = g_provider_by_name(sc->sc_local);
	if (lpp == NULL || lpp->error != 0 || lpp->sectorsize == 0) {
		error = ENOENT;
		goto fail_topo;
	}
	if (g_provider_by_name(pname) != NULL) {
		error = EEXIST;
		goto fail_topo;
	}
	/* The map area, then the data, inside the local provider. */
	end = c->hc_localoff + c->hc_mediasize;
	if (c->hc_sectorsize % lpp->sectorsize != 0 ||
	    c->hc_localoff % lpp->sectorsize != 0 ||
	    c->hc_mapoff % lpp->sectorsize != 0 ||
	    sc->sc_mapsize > c->hc_localoff - c->hc_mapoff ||
	    end < c->hc_localoff || end > (uint64_t)lpp->mediasize) {
		error = EINVAL;
		goto fail_topo;
	}
	gp = g_new_geomf(&g_hast_class, "%s", pname);
	gp->softc = sc;
	cp = g_new_consumer(gp);
	error = g_attach(cp, lpp);
	if (error != 0) {
		g_destroy_consumer(cp);
		g_destroy_geom(gp);
		goto fail_topo;
	}
	/* Exclusive: nothing writes the disk behind HAST's back. */
	error = g_access(cp, 1, 1, 1);
	if (error != 0) {
		g_detach(cp);
		g_destroy_consumer(cp);
		g_destroy_geom(gp);
		goto fail_topo;
	}
	sc->sc_access = 1;
	sc->sc_geom = gp;
	sc->sc_consumer = cp;
	sc->sc_lmediasize = lpp->mediasize;
	pp = g_new_providerf(gp, "%s", pname);
	pp->mediasize = (off_t)c->hc_mediasize;
	pp->sectorsize = c->hc_sectorsize;
	sc->sc_provider = pp;
	g_error_provider(pp, 0);
	g_topology_unlock();

	mtx_lock(&g_hast_mtx);
	sc->sc_live = 1;
	mtx_unlock(&g_hast_mtx);
	c->hc_unit = sc->sc_unit;
	return (0);

fail_topo:
	g_topology_unlock();
	mtx_lock(&g_hast_mtx);
	LIST_REMOVE(sc, sc_next);
	g_hast_nunits--;
	mtx_unlock(&g_hast_mtx);
fail_core:
	(void)hast_core_destroy(core);	/* never used: idle */
	g_hast_free_softc(sc);
	return (error);
}

/*
 * Bring the core to idle on the way to destroy: the link goes down (every
 * remote half fails and its extents stay dirty), sync locks are released
 * without clearing, upcalls nobody will answer are dropped and a pending
 * bump fails.  Then free the core if it is idle.  Returns 0 once the core
 * is gone, EBUSY while local I/O or a sync I/O is still in flight.
 */
static int
g_hast_drain(struct g_hast_softc *sc)
{
	LIST_HEAD(, g_hast_lk) locks;
	struct hast_abi_upcall up;
	struct g_hast_fin fin;
	struct g_hast_io *gio;
	struct g_hast_lk *lk;
	int error;

	if (g_hast_enter(sc, 0) != 0)
		return (0);
	(void)hast_core_link(sc->sc_core, HAST_LINK_DOWN);
	LIST_INIT(&locks);
	mtx_lock(&sc->sc_mtx);
	while ((lk = LIST_FIRST(&sc->sc_locks)) != NULL) {
		LIST_REMOVE(lk, lk_next);
		LIST_INSERT_HEAD(&locks, lk, lk_next);
	}
	mtx_unlock(&sc->sc_mtx);
	while ((lk = LIST_FIRST(&locks)) != NULL) {
		LIST_REMOVE(lk, lk_next);
		if (hast_core_sync_release(sc->sc_core, lk->lk_seq, 0) ==
		    HAST_EBUSY) {
			mtx_lock(&sc->sc_mtx);
			LIST_INSERT_HEAD(&sc->sc_locks, lk, lk_next);
			mtx_unlock(&sc->sc_mtx);
		} else
			free(lk, M_HAST);
	}
	g_hast_exit(sc);

	mtx_lock(&sc->sc_mtx);
	if (sc->sc_parked) {
		/* The link went down: its remote half has failed. */
		sc->sc_parked = 0;
		gio = (struct g_hast_io *)(uintptr_t)sc->sc_park.hu_cookie;
		gio->gio_holds--;
		g_hast_settle(gio, &fin);
		mtx_unlock(&sc->sc_mtx);
		g_hast_finish(&fin);
		mtx_lock(&sc->sc_mtx);
	}
	/* Grants, sync results, a bump: nobody will answer them now. */
	while (hast_core_upcall_next(sc->sc_core, &up)) {
		if (up.hu_kind != HAST_UP_READ && up.hu_kind != HAST_UP_WRITE &&
		    up.hu_kind != HAST_UP_DELETE && up.hu_kind != HAST_UP_FLUSH)
			continue;
		/* Not expected with the link down; fail it all the same. */
		mtx_unlock(&sc->sc_mtx);
		(void)g_hast_core_remote_done(sc, up.hu_seq, EIO);
		mtx_lock(&sc->sc_mtx);
	}
	mtx_unlock(&sc->sc_mtx);
	if (g_hast_enter(sc, 0) == 0) {
		(void)hast_core_bump_done(sc->sc_core, HAST_EIO);
		g_hast_exit(sc);
	}

	mtx_lock(&sc->sc_mtx);
	while (sc->sc_busy > 0)
		msleep(&sc->sc_busy, &sc->sc_mtx, 0, "hastbsy", hz / 10);
	error = hast_core_destroy(sc->sc_core);
	if (error == 0) {
		sc->sc_core = NULL;
		wakeup(&sc->sc_upsleep);
	}
	mtx_unlock(&sc->sc_mtx);
	return (error);
}

static int
g_hast_ctl_destroy(struct hast_abi_create *c)
{
	struct g_hast_softc *sc;
	struct g_provider *pp;
	struct g_hast_lk *lk;
	time_t deadline;
	int error;

	sc = g_hast_hold(c->hc_unit);
	if (sc == NULL)
		return (ENXIO);
	g_topology_lock();
	pp = sc->sc_provider;
	if (pp->acr != 0 || pp->acw != 0 || pp->ace != 0 ||
	    (sc->sc_flags & SCF_DESTROYING) != 0) {
		g_topology_unlock();
		g_hast_rele(sc);
		return (EBUSY);
	}
	/* No new opens (g_hast_access) and no new bios from here on. */
	mtx_lock(&sc->sc_mtx);
	sc->sc_flags |= SCF_DESTROYING;
	mtx_unlock(&sc->sc_mtx);
	g_topology_unlock();

	deadline = time_uptime + G_HAST_DESTROY_WAIT;
	for (;;) {
		error = g_hast_drain(sc);
		if (error == 0)
			break;
		if (time_uptime >= deadline) {
			error = EBUSY;
			break;
		}
		error = pause_sig("hastdst", hz / 10);
		if (error != 0 && error != EWOULDBLOCK)
			break;
	}
	if (error != 0) {
		/* Still alive: usable again (with the link down). */
		g_topology_lock();
		mtx_lock(&sc->sc_mtx);
		sc->sc_flags &= ~SCF_DESTROYING;
		mtx_unlock(&sc->sc_mtx);
		g_topology_unlock();
		g_hast_rele(sc);
		return (error);
	}

	g_topology_lock();
	g_cancel_event(sc);
	g_hast_detach(sc);
	sc->sc_geom->softc = NULL;
	g_wither_geom(sc->sc_geom, ENXIO);
	g_topology_unlock();

	mtx_lock(&g_hast_mtx);
	LIST_REMOVE(sc, sc_next);
	sc->sc_live = 0;
	while (sc->sc_ref > 1)
		msleep(&sc->sc_ref, &g_hast_mtx, 0, "hastref", 0);
	g_hast_nunits--;
	mtx_unlock(&g_hast_mtx);
	while ((lk = LIST_FIRST(&sc->sc_locks)) != NULL) {
		LIST_REMOVE(lk, lk_next);
		free(lk, M_HAST);
	}
	KASSERT(TAILQ_EMPTY(&sc->sc_reads), ("%s: reads left", __func__));
	g_hast_free_softc(sc);
	return (0);
}

/*
 * HAST_IOC_UPCALL: wait for the oldest upcall and take it.  A write's
 * payload is copied to hu_data; when hu_datalen is too small the upcall
 * stays parked in the kernel and the ioctl succeeds with hu_error = ENOMEM
 * and hu_datalen = the size needed (g_gate's convention), so that the
 * engine can retry with a bigger buffer and the order is kept.
 */
static int
g_hast_ctl_upcall(struct hast_abi_upcall *u)
{
	struct hast_abi_upcall up;
	struct g_hast_softc *sc;
	struct g_hast_fin fin;
	struct g_hast_io *gio;
	uint64_t ubuf, ulen;
	int error, got;

	sc = g_hast_hold(u->hu_unit);
	if (sc == NULL)
		return (ENXIO);
	ubuf = u->hu_data;
	ulen = u->hu_datalen;
	gio = NULL;
	got = 0;
	error = 0;
	mtx_lock(&sc->sc_mtx);
	for (;;) {
		if (sc->sc_core == NULL) {
			error = ENXIO;
			break;
		}
		if (sc->sc_parked) {
			up = sc->sc_park;
			gio = (struct g_hast_io *)(uintptr_t)up.hu_cookie;
			if ((gio->gio_flags & GIO_RELEASED) != 0) {
				/* Its remote half ended meanwhile. */
				sc->sc_parked = 0;
				gio->gio_holds--;
				g_hast_settle(gio, &fin);
				mtx_unlock(&sc->sc_mtx);
				g_hast_finish(&fin);
				mtx_lock(&sc->sc_mtx);
				continue;
			}
			if (up.hu_length <= ulen)
				sc->sc_parked = 0;
			got = 1;
			break;
		}
		if (hast_core_upcall_next(sc->sc_core, &up)) {
			got = 1;
			if (up.hu_kind == HAST_UP_WRITE) {
				gio = (struct g_hast_io *)(uintptr_t)
				    up.hu_cookie;
				gio->gio_holds++;	/* data stays put */
				if (up.hu_length > ulen) {
					sc->sc_park = up;
					sc->sc_parked = 1;
				}
			} else if (up.hu_kind == HAST_UP_READ) {
				gio = (struct g_hast_io *)(uintptr_t)
				    up.hu_cookie;
				gio->gio_rseq = up.hu_seq;
				gio->gio_flags |= GIO_TAKEN;
				TAILQ_INSERT_TAIL(&sc->sc_reads, gio, gio_next);
			}
			break;
		}
		sc->sc_upsleep++;
		error = msleep(&sc->sc_upsleep, &sc->sc_mtx, PCATCH, "hastup",
		    0);
		sc->sc_upsleep--;
		if (error != 0)
			break;
	}
	mtx_unlock(&sc->sc_mtx);
	if (!got) {
		g_hast_rele(sc);
		return (error);
	}
	up.hu_unit = sc->sc_unit;
	up.hu_cookie = 0;		/* no kernel address leaves */
	up.hu_data = 0;
	up.hu_datalen = 0;
	if (up.hu_kind == HAST_UP_WRITE) {
		if (up.hu_length > ulen) {
			up.hu_error = ENOMEM;
			up.hu_datalen = up.hu_length;
		} else {
			KASSERT(up.hu_length == gio->gio_length,
			    ("%s: write length changed", __func__));
			error = copyout(gio->gio_bp->bio_data,
			    (void *)(uintptr_t)ubuf, (size_t)up.hu_length);
			g_hast_unhold(sc, gio, error == 0 ? GIO_PAYLOAD : 0);
			if (error != 0) {
				/* Never sent: the extent stays dirty. */
				(void)g_hast_core_remote_done(sc, up.hu_seq,
				    error);
				g_hast_rele(sc);
				return (error);
			}
			up.hu_data = ubuf;
			up.hu_datalen = up.hu_length;
		}
	}
	*u = up;
	g_hast_rele(sc);
	return (0);
}

/* HAST_DOWN_REMOTE_DONE: for a peer read, its data first. */
static int
g_hast_remote_done(struct g_hast_softc *sc, struct hast_abi_downcall *d)
{
	struct g_hast_io *gio;
	struct bio *bp;
	int error, rc;

	error = 0;
	bp = NULL;
	mtx_lock(&sc->sc_mtx);
	TAILQ_FOREACH(gio, &sc->sc_reads, gio_next) {
		if (gio->gio_rseq == d->hd_seq)
			break;
	}
	if (gio != NULL) {
		if (d->hd_error == 0 && d->hd_datalen != gio->gio_length) {
			mtx_unlock(&sc->sc_mtx);
			return (EINVAL);
		}
		TAILQ_REMOVE(&sc->sc_reads, gio, gio_next);
		gio->gio_flags &= ~GIO_TAKEN;
		if (d->hd_error == 0 &&
		    (gio->gio_flags & GIO_DELIVERED) == 0) {
			gio->gio_holds++;
			bp = gio->gio_bp;
		}
	}
	mtx_unlock(&sc->sc_mtx);
	rc = d->hd_error;
	if (bp != NULL) {
		error = copyin((void *)(uintptr_t)d->hd_data, bp->bio_data,
		    (size_t)gio->gio_length);
		if (error != 0)
			rc = error;
		g_hast_unhold(sc, gio, 0);
	}
	rc = g_hast_core_remote_done(sc, d->hd_seq, rc);
	return (error != 0 ? error : rc);
}

static int
g_hast_ctl_downcall(struct hast_abi_downcall *d)
{
	struct g_hast_softc *sc;
	uint32_t gen;
	int error;

	if (d->hd_error < 0)
		return (EINVAL);
	sc = g_hast_hold(d->hd_unit);
	if (sc == NULL)
		return (ENXIO);
	if (d->hd_kind == HAST_DOWN_REMOTE_DONE) {
		error = g_hast_remote_done(sc, d);
		g_hast_rele(sc);
		return (error);
	}
	error = g_hast_enter(sc, 0);
	if (error != 0) {
		g_hast_rele(sc);
		return (error);
	}
	switch (d->hd_kind) {
	case HAST_DOWN_REMOTE_RECV:
		error = hast_core_remote_received(sc->sc_core, d->hd_seq);
		break;
	case HAST_DOWN_BUMP_DONE:
		error = hast_core_bump_done(sc->sc_core, d->hd_error);
		break;
	case HAST_DOWN_LINK:
		error = hast_core_link(sc->sc_core, d->hd_arg);
		break;
	case HAST_DOWN_SYNCDIR:
		error = hast_core_set_syncdir(sc->sc_core, d->hd_arg);
		break;
	case HAST_DOWN_MODE:
		error = hast_core_set_mode(sc->sc_core, d->hd_arg);
		break;
	case HAST_DOWN_FLUSH:
		error = hast_core_flush(sc->sc_core, &gen);
		d->hd_seq = gen;
		break;
	default:
		error = EINVAL;
		break;
	}
	g_hast_exit(sc);
	g_hast_rele(sc);
	return (error);
}

/* HAST_RANGE_IO: one local read or write under a granted sync lock. */
static int
g_hast_range_io(struct g_hast_softc *sc, struct hast_abi_range *r)
{
	struct g_hast_sio *sio;
	void *buf;
	uint64_t ioseq;
	int error;

	if ((r->hr_cmd != HAST_CMD_READ && r->hr_cmd != HAST_CMD_WRITE) ||
	    r->hr_length == 0 || r->hr_length > G_HAST_SYNC_MAXIO)
		return (EINVAL);
	buf = malloc((size_t)r->hr_length, M_HAST, M_WAITOK);
	sio = malloc(sizeof(*sio), M_HAST, M_WAITOK | M_ZERO);
	sio->sio_sc = sc;
	sio->sio_bio = g_alloc_bio();
	sio->sio_buf = buf;
	error = 0;
	if (r->hr_cmd == HAST_CMD_WRITE)
		error = copyin((void *)(uintptr_t)r->hr_data, buf,
		    (size_t)r->hr_length);
	if (error == 0)
		error = g_hast_enter(sc, 0);
	if (error == 0) {
		error = hast_core_sync_io(sc->sc_core, r->hr_seq, r->hr_cmd,
		    r->hr_offset, r->hr_length, (uint64_t)(uintptr_t)sio,
		    &ioseq);
		g_hast_exit(sc);
		if (error == 0) {
			error = g_hast_wait_sleep(sc, &sio->sio_wait,
			    "hastsio");
			r->hr_ioseq = ioseq;
		}
	}
	if (error == 0 && r->hr_cmd == HAST_CMD_READ)
		error = copyout(buf, (void *)(uintptr_t)r->hr_data,
		    (size_t)r->hr_length);
	g_destroy_bio(sio->sio_bio);
	free(sio, M_HAST);
	free(buf, M_HAST);
	return (error);
}

static int
g_hast_ctl_range(struct hast_abi_range *r)
{
	struct g_hast_softc *sc;
	struct g_hast_lk *lk;
	uint64_t seq;
	int error;

	sc = g_hast_hold(r->hr_unit);
	if (sc == NULL)
		return (ENXIO);
	switch (r->hr_op) {
	case HAST_RANGE_LOCK:
		lk = malloc(sizeof(*lk), M_HAST, M_WAITOK | M_ZERO);
		error = g_hast_enter(sc, 1);
		if (error == 0) {
			error = hast_core_sync_lock(sc->sc_core, r->hr_offset,
			    r->hr_length, &seq);
			g_hast_exit(sc);
		}
		if (error != 0) {
			free(lk, M_HAST);
			break;
		}
		lk->lk_seq = seq;
		mtx_lock(&sc->sc_mtx);
		LIST_INSERT_HEAD(&sc->sc_locks, lk, lk_next);
		mtx_unlock(&sc->sc_mtx);
		r->hr_seq = seq;
		break;
	case HAST_RANGE_IO:
		error = g_hast_range_io(sc, r);
		break;
	case HAST_RANGE_RELEASE:
		if ((r->hr_flags & ~HAST_RANGEF_CLEAR) != 0) {
			error = EINVAL;
			break;
		}
		error = g_hast_enter(sc, 0);
		if (error != 0)
			break;
		error = hast_core_sync_release(sc->sc_core, r->hr_seq,
		    (r->hr_flags & HAST_RANGEF_CLEAR) != 0);
		g_hast_exit(sc);
		if (error == HAST_EBUSY)
			break;
		/* Released (EIO: released, extents left dirty) or unknown. */
		mtx_lock(&sc->sc_mtx);
		LIST_FOREACH(lk, &sc->sc_locks, lk_next) {
			if (lk->lk_seq == r->hr_seq) {
				LIST_REMOVE(lk, lk_next);
				break;
			}
		}
		mtx_unlock(&sc->sc_mtx);
		if (lk != NULL)
			free(lk, M_HAST);
		break;
	default:
		error = EINVAL;
		break;
	}
	g_hast_rele(sc);
	return (error);
}

/*
 * HAST_IOC_MAP: the bitmap is exactly hast_core_map_size() bytes.  A GET
 * with hm_data 0 only reports that size in hm_size.
 */
static int
g_hast_ctl_map(struct hast_abi_map *m)
{
	struct g_hast_softc *sc;
	uint8_t *buf;
	uint32_t size;
	int error;

	if (m->hm_op != HAST_MAPOP_GET && m->hm_op != HAST_MAPOP_LOAD &&
	    m->hm_op != HAST_MAPOP_MERGE && m->hm_op != HAST_MAPOP_METADATA)
		return (EINVAL);
	sc = g_hast_hold(m->hm_unit);
	if (sc == NULL)
		return (ENXIO);
	if (m->hm_op == HAST_MAPOP_METADATA) {
		error = g_hast_enter(sc, 0);
		if (error == 0) {
			error = g_hast_metadata_write(sc, m);
			g_hast_exit(sc);
		}
		g_hast_rele(sc);
		return (error);
	}
	size = sc->sc_mapsize;
	if (m->hm_op == HAST_MAPOP_GET && m->hm_data == 0) {
		m->hm_size = size;
		g_hast_rele(sc);
		return (0);
	}
	if (m->hm_size < size) {
		g_hast_rele(sc);
		return (EINVAL);
	}
	buf = malloc(size, M_HAST, M_WAITOK | M_ZERO);
	error = 0;
	if (m->hm_op != HAST_MAPOP_GET)
		error = copyin((void *)(uintptr_t)m->hm_data, buf, size);
	if (error == 0)
		error = g_hast_enter(sc, 0);
	if (error == 0) {
		switch (m->hm_op) {
		case HAST_MAPOP_GET:
			error = hast_core_map_get(sc->sc_core, m->hm_which,
			    buf, size);
			break;
		case HAST_MAPOP_LOAD:
			error = hast_core_map_load(sc->sc_core, buf, size);
			break;
		default:
			error = hast_core_map_merge(sc->sc_core, buf, size);
			break;
		}
		g_hast_exit(sc);
	}
	if (error == 0 && m->hm_op == HAST_MAPOP_GET) {
		error = copyout(buf, (void *)(uintptr_t)m->hm_data, size);
		m->hm_size = size;
	}
	free(buf, M_HAST);
	g_hast_rele(sc);
	return (error);
}

static int
g_hast_ctl_stats(struct hast_abi_stats *s)
{
	struct g_hast_softc *sc;
	uint64_t unit;
	int error;

	unit = s->hs_unit;
	sc = g_hast_hold(unit);
	if (sc == NULL)
		return (ENXIO);
	error = g_hast_enter(sc, 0);
	if (error == 0) {
		hast_core_stats(sc->sc_core, s);
		g_hast_exit(sc);
		s->hs_unit = unit;
	}
	g_hast_rele(sc);
	return (error);
}

/*
 * The ioctl contract (what the engine's kernel transport relies on).
 *
 * Every struct starts with its uint32_t ABI version, checked first
 * (EPROTONOSUPPORT); every command but STATS needs the device open for
 * writing (EBADF).  A failing ioctl copies nothing back, so results that
 * come with data are reported with a 0 return.  Unknown units: ENXIO.
 *
 * CREATE    names are bounded and checked (non-empty, [A-Za-z0-9._:+-],
 *           '/' allowed in hc_local only); the local provider is opened
 *           exclusively; the core starts with the link down and a localcnt
 *           bump owed.  hc_map (hc_mapsize bytes, at least the map's size)
 *           is loaded as the on-disk map before hast/NAME appears; without
 *           it, LOAD the map before the first write.  Out:
 *           hc_unit (never reused; also <Unit> in kern.geom.confxml, for
 *           an engine that restarts).  When the last reference to the
 *           descriptor that created it is closed, its link goes down.
 * DESTROY   EBUSY while hast/NAME is open.  Otherwise the link goes down,
 *           the engine's sync locks are released (not cleared), pending
 *           upcalls are dropped and a pending bump fails; once the local
 *           I/O in flight has finished the instance goes away.  EBUSY if
 *           that takes longer than G_HAST_DESTROY_WAIT seconds (the
 *           instance then stays, with the link down).
 * UPCALL    sleeps (interruptible) until an upcall exists.  WRITE: the
 *           payload is copied to hu_data when hu_datalen >= hu_length, and
 *           hu_datalen says how many bytes; otherwise hu_error = ENOMEM,
 *           hu_datalen = the size needed, and the same upcall comes again
 *           on the next call.  A copyout fault fails the remote half (the
 *           extent stays dirty) and returns EFAULT.  hu_cookie is always 0.
 *           In async mode a write is acknowledged to its client only once
 *           its payload has been taken here (or its remote half ended).
 * DOWNCALL  REMOTE_DONE of a peer READ with hd_error 0 needs hd_datalen ==
 *           the read's length (else EINVAL, nothing changes) and copies
 *           hd_data into the client's buffer.  Returns the core's answer
 *           (ENOENT: that seq has no remote half any more, e.g. after a
 *           link loss; the engine should ignore it).
 * RANGE     LOCK -> hr_seq (granted later by a SYNC_LOCKED upcall).  IO
 *           (at most G_HAST_SYNC_MAXIO bytes) reads into or writes from
 *           hr_data and returns when the local I/O has finished, with its
 *           error; hr_ioseq is the seq of the SYNC_IO_DONE upcall that also
 *           follows and must be taken.  RELEASE with HAST_RANGEF_CLEAR.
 * MAP       exactly hast_core_map_size() bytes; GET with hm_data 0 only
 *           reports that size in hm_size.  METADATA writes hm_size bytes
 *           (whole sectors, at most hc_mapoff) at offset 0 of the local
 *           provider, flushes, and returns when both finished (EINVAL for
 *           a bad size, ENXIO once the local provider is gone).
 * STATS     hast_core_stats().
 */
static int
g_hast_ioctl(struct cdev *dev, u_long cmd, caddr_t data, int fflag,
    struct thread *td)
{
	int error;

	switch (cmd) {
	case HAST_IOC_CREATE:
	case HAST_IOC_DESTROY:
	case HAST_IOC_UPCALL:
	case HAST_IOC_DOWNCALL:
	case HAST_IOC_RANGE:
	case HAST_IOC_MAP:
	case HAST_IOC_STATS:
		break;
	default:
		return (ENOTTY);
	}
	if (*(const uint32_t *)data != HAST_ABI_VERSION)
		return (EPROTONOSUPPORT);
	if (cmd != HAST_IOC_STATS && (fflag & FWRITE) == 0)
		return (EBADF);
	switch (cmd) {
	case HAST_IOC_CREATE:
		error = g_hast_ctl_create((struct hast_abi_create *)data);
		if (error == 0)
			g_hast_own(((struct hast_abi_create *)data)->hc_unit);
		/*
		 * The new provider is being tasted, which needs this very
		 * device to answer: do not wait for GEOM to settle on the
		 * way out of the syscall.
		 */
		td->td_pflags &= ~TDP_GEOM;
		return (error);
	case HAST_IOC_DESTROY:
		error = g_hast_ctl_destroy((struct hast_abi_create *)data);
		td->td_pflags &= ~TDP_GEOM;
		return (error);
	case HAST_IOC_UPCALL:
		return (g_hast_ctl_upcall((struct hast_abi_upcall *)data));
	case HAST_IOC_DOWNCALL:
		return (g_hast_ctl_downcall((struct hast_abi_downcall *)data));
	case HAST_IOC_RANGE:
		return (g_hast_ctl_range((struct hast_abi_range *)data));
	case HAST_IOC_MAP:
		return (g_hast_ctl_map((struct hast_abi_map *)data));
	default:
		return (g_hast_ctl_stats((struct hast_abi_stats *)data));
	}
}

static int
g_hast_modevent(module_t mod, int type, void *data)
{
	int error;

	error = 0;
	switch (type) {
	case MOD_LOAD:
		mtx_init(&g_hast_mtx, "hast units", NULL, MTX_DEF);
		g_hast_dev = make_dev(&g_hast_cdevsw, 0, UID_ROOT, GID_WHEEL,
		    0600, G_HAST_CTL_NAME);
		break;
	case MOD_QUIESCE:
		mtx_lock(&g_hast_mtx);
		if (g_hast_nunits > 0)
			error = EBUSY;
		mtx_unlock(&g_hast_mtx);
		break;
	case MOD_UNLOAD:
		mtx_lock(&g_hast_mtx);
		if (g_hast_nunits > 0)
			error = EBUSY;
		else
			g_hast_unloading = 1;	/* refuse creates */
		mtx_unlock(&g_hast_mtx);
		if (error != 0)
			break;
		/*
		 * Waits for threads inside g_hast_ioctl (none can sleep there
		 * without an instance, and none is left) and runs the close
		 * destructors of descriptors still open.
		 */
		if (g_hast_dev != NULL)
			destroy_dev(g_hast_dev);
		g_hast_dev = NULL;
		mtx_destroy(&g_hast_mtx);
		break;
	default:
		error = EOPNOTSUPP;
		break;
	}
	return (error);
}

static moduledata_t g_hast_ctl_mod = {
	"hastctl",
	g_hast_modevent,
	NULL
};

/* The class loads first and unloads last (SI_ORDER_SECOND). */
DECLARE_MODULE(geom_hast, g_hast_ctl_mod, SI_SUB_DRIVERS, SI_ORDER_MIDDLE);
DECLARE_GEOM_CLASS(g_hast_class, g_hast);
MODULE_VERSION(geom_hast, 0);
