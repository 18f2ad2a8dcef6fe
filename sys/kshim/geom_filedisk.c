/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * geom_filedisk.c: a disk for the shim: a GEOM provider (class FILEDISK)
 * backed by a file or block device, like a vnode-backed md(4).  Its start
 * method queues bios for a pool of I/O threads, which do the positioned
 * I/O and complete each bio with g_io_deliver from their own thread (so
 * done routines run on g_up, never inside start).  Tests can slow I/O down
 * (each waits a random time up to a bound, so I/Os overtake each other),
 * hold I/O until released, make commands fail with an error, or pull the
 * disk out: then its provider is orphaned (every consumer's
 * orphan method runs) and queued and new I/O fails with ENXIO.
 */

#include "kshim_impl.h"

#include <fcntl.h>
#include <unistd.h>
#include <linux/falloc.h>

#define	FILEDISK_MAXTHREADS	16

struct filedisk {
	LIST_ENTRY(filedisk)	 fd_list;
	char			 fd_name[256];
	int			 fd_fd;
	struct g_geom		*fd_gp;
	struct mtx		 fd_mtx;
	TAILQ_HEAD(, bio)	 fd_queue;
	uint32_t		 fd_busy;	/* queued and running */
	int			 fd_hold;
	int			 fd_gone;	/* orphaned */
	int			 fd_dying;	/* provider destroyed */
	uint32_t		 fd_delay_us;
	uint64_t		 fd_rng;
	uint32_t		 fd_failmask;
	int			 fd_failerr;	/* kernel errno */
	uint32_t		 fd_nthreads;
	pthread_t		 fd_threads[FILEDISK_MAXTHREADS];
};

static pthread_mutex_t filedisk_list_mtx = PTHREAD_MUTEX_INITIALIZER;
static LIST_HEAD(, filedisk) filedisks = LIST_HEAD_INITIALIZER(filedisks);

static g_start_t filedisk_start;
static g_access_t filedisk_access;
static g_provgone_t filedisk_providergone;

static struct g_class filedisk_class = {
	.name =		"FILEDISK",
	.version =	G_VERSION,
	.start =	filedisk_start,
	.access =	filedisk_access,
	.providergone =	filedisk_providergone,
};

void
kshim_filedisk_init(void)
{

	g_topology_lock();
	kshim_class_register(&filedisk_class);
	g_topology_unlock();
}

static struct filedisk *
filedisk_find(const char *name)
{
	struct filedisk *d;

	pthread_mutex_lock(&filedisk_list_mtx);
	LIST_FOREACH(d, &filedisks, fd_list) {
		if (strcmp(d->fd_name, name) == 0)
			break;
	}
	pthread_mutex_unlock(&filedisk_list_mtx);
	return (d);
}

static void
filedisk_start(struct bio *bp)
{
	struct filedisk *d;

	d = bp->bio_to->geom->softc;
	if (bp->bio_cmd == BIO_GETATTR) {
		if (g_handleattr_int(bp, "GEOM::candelete", 1))
			return;
		g_io_deliver(bp, KERR_EOPNOTSUPP);
		return;
	}
	mtx_lock(&d->fd_mtx);
	if (d->fd_gone) {
		mtx_unlock(&d->fd_mtx);
		g_io_deliver(bp, KERR_ENXIO);
		return;
	}
	TAILQ_INSERT_TAIL(&d->fd_queue, bp, bio_queue);
	d->fd_busy++;
	wakeup(d);
	mtx_unlock(&d->fd_mtx);
}

static int
filedisk_access(struct g_provider *pp, int dr, int dw, int de)
{
	struct filedisk *d;

	(void)dr;
	(void)dw;
	(void)de;
	d = pp->geom->softc;
	if ((dr > 0 || dw > 0 || de > 0) && d->fd_gone)
		return (KERR_ENXIO);
	return (0);
}

/* Under the topology lock, from the washer: the threads may go. */
static void
filedisk_providergone(struct g_provider *pp)
{
	struct filedisk *d;

	d = pp->geom->softc;
	mtx_lock(&d->fd_mtx);
	d->fd_dying = 1;
	wakeup(d);
	mtx_unlock(&d->fd_mtx);
}

/* The I/O itself: a kernel errno. */
static int
filedisk_io(struct filedisk *d, struct bio *bp)
{
	char *p;
	off_t off;
	ssize_t n;
	size_t left;

	switch (bp->bio_cmd) {
	case BIO_READ:
	case BIO_WRITE:
		p = bp->bio_data;
		off = bp->bio_offset;
		left = (size_t)bp->bio_length;
		while (left > 0) {
			if (bp->bio_cmd == BIO_READ)
				n = pread(d->fd_fd, p, left, off);
			else
				n = pwrite(d->fd_fd, p, left, off);
			if (n < 0) {
				if (errno == EINTR)
					continue;
				return (kshim_errno_from_host(errno));
			}
			if (n == 0) {
				if (bp->bio_cmd == BIO_WRITE)
					return (KERR_EIO);
				memset(p, 0, left);	/* past the end */
				n = (ssize_t)left;
			}
			p += n;
			off += n;
			left -= (size_t)n;
			bp->bio_completed += n;
		}
		return (0);
	case BIO_DELETE:
		if (fallocate(d->fd_fd, FALLOC_FL_PUNCH_HOLE |
		    FALLOC_FL_KEEP_SIZE, bp->bio_offset, bp->bio_length) != 0)
			return (kshim_errno_from_host(errno));
		bp->bio_completed = bp->bio_length;
		return (0);
	case BIO_FLUSH:
		if (fdatasync(d->fd_fd) != 0)
			return (kshim_errno_from_host(errno));
		return (0);
	default:
		return (KERR_EOPNOTSUPP);
	}
}

static void *
filedisk_worker(void *arg)
{
	struct filedisk *d;
	struct bio *bp;
	uint32_t delay;
	int error;

	d = arg;
	curthread->td_name = "filedisk";
	for (;;) {
		mtx_lock(&d->fd_mtx);
		while (!d->fd_dying && (TAILQ_EMPTY(&d->fd_queue) ||
		    d->fd_hold))
			msleep(d, &d->fd_mtx, PRIBIO, "fdwait", 0);
		bp = TAILQ_FIRST(&d->fd_queue);
		if (bp == NULL) {
			/* Dying and nothing queued. */
			mtx_unlock(&d->fd_mtx);
			break;
		}
		TAILQ_REMOVE(&d->fd_queue, bp, bio_queue);
		delay = d->fd_delay_us;
		if (delay > 0) {
			/* Up to delay: I/Os overtake each other. */
			d->fd_rng = d->fd_rng * 6364136223846793005ULL +
			    1442695040888963407ULL;
			delay = (uint32_t)((d->fd_rng >> 33) % (delay + 1));
		}
		mtx_unlock(&d->fd_mtx);
		if (delay > 0)
			(void)pause_sig("fddelay", (int)((uint64_t)delay * hz /
			    1000000 > 0 ? (uint64_t)delay * hz / 1000000 : 1));
		mtx_lock(&d->fd_mtx);
		if (d->fd_gone)
			error = KERR_ENXIO;
		else if (((1U << bp->bio_cmd) & d->fd_failmask) != 0)
			error = d->fd_failerr;
		else
			error = -1;
		mtx_unlock(&d->fd_mtx);
		if (error == -1)
			error = filedisk_io(d, bp);
		if (error != 0)
			bp->bio_completed = 0;
		mtx_lock(&d->fd_mtx);
		d->fd_busy--;
		mtx_unlock(&d->fd_mtx);
		g_io_deliver(bp, error);
	}
	return (NULL);
}

int
kshim_disk_create(const char *name, const char *path, uint32_t sectorsize,
    uint32_t nthreads)
{
	struct filedisk *d;
	struct g_provider *pp;
	off_t size;
	uint32_t i;
	int fd;

	kshim_init();
	if (name == NULL || name[0] == '\0' || strlen(name) >= 256 ||
	    sectorsize < 512 || !powerof2(sectorsize))
		return (EINVAL);
	if (nthreads == 0)
		nthreads = 4;
	if (nthreads > FILEDISK_MAXTHREADS)
		nthreads = FILEDISK_MAXTHREADS;
	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return (errno);
	size = lseek(fd, 0, SEEK_END);
	if (size < 0) {
		int e = errno;

		close(fd);
		return (e);
	}
	size -= size % sectorsize;
	if (size == 0) {
		close(fd);
		return (EINVAL);
	}
	d = kshim_malloc(sizeof(*d), M_KSHIM, M_WAITOK | M_ZERO, __FILE__,
	    __LINE__);
	snprintf(d->fd_name, sizeof(d->fd_name), "%s", name);
	d->fd_fd = fd;
	mtx_init(&d->fd_mtx, "filedisk", NULL, MTX_DEF);
	TAILQ_INIT(&d->fd_queue);

	g_topology_lock();
	if (g_provider_by_name(name) != NULL || filedisk_find(name) != NULL) {
		g_topology_unlock();
		mtx_destroy(&d->fd_mtx);
		close(fd);
		kshim_free(d, M_KSHIM, __FILE__, __LINE__);
		return (EEXIST);
	}
	for (i = 0; i < nthreads; i++) {
		kshim_pthread_check(pthread_create(&d->fd_threads[i], NULL,
		    filedisk_worker, d), "pthread_create(filedisk)");
		d->fd_nthreads++;
	}
	d->fd_gp = g_new_geomf(&filedisk_class, "%s", name);
	d->fd_gp->softc = d;
	pp = g_new_providerf(d->fd_gp, "%s", name);
	pp->mediasize = size;
	pp->sectorsize = sectorsize;
	g_error_provider(pp, 0);
	pthread_mutex_lock(&filedisk_list_mtx);
	LIST_INSERT_HEAD(&filedisks, d, fd_list);
	pthread_mutex_unlock(&filedisk_list_mtx);
	g_topology_unlock();
	return (0);
}

int
kshim_disk_orphan(const char *name)
{
	struct filedisk *d;

	kshim_init();
	d = filedisk_find(name);
	if (d == NULL)
		return (ENOENT);
	g_topology_lock();
	mtx_lock(&d->fd_mtx);
	if (d->fd_gone) {
		mtx_unlock(&d->fd_mtx);
		g_topology_unlock();
		return (0);
	}
	d->fd_gone = 1;
	wakeup(d);
	mtx_unlock(&d->fd_mtx);
	g_wither_geom(d->fd_gp, KERR_ENXIO);
	g_topology_unlock();
	return (0);
}

int
kshim_disk_destroy(const char *name, uint32_t wait_ms)
{
	struct filedisk *d;
	uint32_t waited, i;
	int dying;

	d = filedisk_find(name);
	if (d == NULL)
		return (ENOENT);
	(void)kshim_disk_orphan(name);
	for (waited = 0;; waited++) {
		mtx_lock(&d->fd_mtx);
		dying = d->fd_dying;
		mtx_unlock(&d->fd_mtx);
		if (dying)
			break;
		if (waited >= wait_ms)
			return (EBUSY);
		(void)pause_sig("fddest", hz / 1000 > 0 ? hz / 1000 : 1);
	}
	for (i = 0; i < d->fd_nthreads; i++)
		pthread_join(d->fd_threads[i], NULL);
	/* The washer that destroyed the provider removed the geom too. */
	g_topology_lock();
	g_topology_unlock();
	pthread_mutex_lock(&filedisk_list_mtx);
	LIST_REMOVE(d, fd_list);
	pthread_mutex_unlock(&filedisk_list_mtx);
	close(d->fd_fd);
	mtx_destroy(&d->fd_mtx);
	kshim_free(d, M_KSHIM, __FILE__, __LINE__);
	return (0);
}

int
kshim_disk_delay(const char *name, uint32_t usec)
{
	struct filedisk *d;

	d = filedisk_find(name);
	if (d == NULL)
		return (ENOENT);
	mtx_lock(&d->fd_mtx);
	d->fd_delay_us = usec;
	mtx_unlock(&d->fd_mtx);
	return (0);
}

int
kshim_disk_hold(const char *name, int hold)
{
	struct filedisk *d;

	d = filedisk_find(name);
	if (d == NULL)
		return (ENOENT);
	mtx_lock(&d->fd_mtx);
	d->fd_hold = hold != 0;
	wakeup(d);
	mtx_unlock(&d->fd_mtx);
	return (0);
}

int
kshim_disk_fail(const char *name, uint32_t cmdmask, int error)
{
	struct filedisk *d;

	d = filedisk_find(name);
	if (d == NULL)
		return (ENOENT);
	mtx_lock(&d->fd_mtx);
	d->fd_failmask = error != 0 ? cmdmask : 0;
	d->fd_failerr = kshim_errno_from_host(error);
	mtx_unlock(&d->fd_mtx);
	return (0);
}

int
kshim_disk_queued(const char *name, uint32_t *countp)
{
	struct filedisk *d;

	d = filedisk_find(name);
	if (d == NULL)
		return (ENOENT);
	mtx_lock(&d->fd_mtx);
	*countp = d->fd_busy;
	mtx_unlock(&d->fd_mtx);
	return (0);
}
