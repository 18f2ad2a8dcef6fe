/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * kshim_test.c: the geom_hast module under the kernel shim, driven from C
 * with no Rust in the process, so that it can be built with
 * AddressSanitizer or ThreadSanitizer (tests/kshim-sanitize.sh).  A small
 * engine thread answers the module's upcalls through /dev/hastctl ioctls
 * (a peer held in memory); clients send bios to hast/NAME.  Scenarios:
 *
 *   basic      writes, the counter bump, peer reads, resync under a lock,
 *              flush, delete, metadata, stats, GETATTR, confxml, destroy
 *   enomem     g_clone_bio and M_NOWAIT failures: GEOM retries, all done
 *   orphan     the local disk disappears under writes in flight
 *   destroy    destroy with requests, a sync lock, the upcall sleeper and
 *              a map write in flight
 *   unload     refused while an instance exists; the open control file
 *   copyout    a copyout fault on UPCALL: the extent stays dirty
 *   stress     clients, engine, link flaps, flushes, resync, injected
 *              allocation failures and copyout faults at once (for
 *              ThreadSanitizer)
 *   orphanstress  the same, the local disk pulled out halfway
 *   destroystress the same, then a destroy while the engine's link flaps,
 *              sync locks, sync I/O and flushes go on
 *
 * Usage: kshim_test DIR [scenario...]   (DIR: where disk files go)
 * Exit 0 when every scenario passed; a failed check prints and exits 1; a
 * kernel panic (any shim check) aborts.
 */

#include <sys/stat.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "hast_abi.h"
#include "kshim_api.h"

/* The FreeBSD encoding the module decodes: the same bits on this host. */
_Static_assert(HAST_IOC_UPCALL == 0xc0484803UL, "ioctl encoding");

#define	KIB		1024ULL
#define	MIB		(1024 * KIB)
#define	EXTENT		(64 * KIB)
#define	DATASIZE	(4 * MIB)
#define	MAPOFF		4096ULL
#define	LOCALOFF	8192ULL
#define	SECTOR		512U

static const char *dir;
static const char *scenario;

static void __attribute__((__noreturn__, __format__(__printf__, 2, 3)))
fail(int line, const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "FAIL [%s] kshim_test.c:%d: ", scenario, line);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

#define	CHECK(cond, ...) do {						\
	if (!(cond))							\
		fail(__LINE__, __VA_ARGS__);				\
} while (0)
#define	CHECK0(expr) do {						\
	int _e = (expr);						\
	if (_e != 0)							\
		fail(__LINE__, "%s: %s", #expr, strerror(_e));		\
} while (0)

static void
msleep_ms(unsigned ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

static void
pattern(uint8_t *p, size_t len, uint64_t off, uint32_t tag)
{
	size_t i;

	for (i = 0; i < len; i++)
		p[i] = (uint8_t)((off + i) * 31 + tag * 7 + ((off + i) >> 9));
}

/*
 * The control device.
 */
static int
ioc(struct kshim_file *fp, unsigned long cmd, void *arg)
{

	return (kshim_dev_ioctl(fp, cmd, arg));
}

static int
down(struct kshim_file *fp, uint64_t unit, uint32_t kind, uint64_t seq,
    int32_t error, uint32_t arg)
{
	struct hast_abi_downcall d;

	memset(&d, 0, sizeof(d));
	d.hd_version = HAST_ABI_VERSION;
	d.hd_kind = kind;
	d.hd_unit = unit;
	d.hd_seq = seq;
	d.hd_error = error;
	d.hd_arg = arg;
	return (ioc(fp, HAST_IOC_DOWNCALL, &d));
}

static int
map_op(struct kshim_file *fp, uint64_t unit, uint32_t op, uint32_t which,
    void *buf, uint32_t size)
{
	struct hast_abi_map m;

	memset(&m, 0, sizeof(m));
	m.hm_version = HAST_ABI_VERSION;
	m.hm_op = op;
	m.hm_which = which;
	m.hm_size = size;
	m.hm_unit = unit;
	m.hm_data = (uint64_t)(uintptr_t)buf;
	return (ioc(fp, HAST_IOC_MAP, &m));
}

static int
range_op(struct kshim_file *fp, uint64_t unit, uint32_t op, uint64_t *seq,
    uint64_t off, uint64_t len, uint32_t cmd, uint32_t flags, void *buf)
{
	struct hast_abi_range r;
	int error;

	memset(&r, 0, sizeof(r));
	r.hr_version = HAST_ABI_VERSION;
	r.hr_op = op;
	r.hr_unit = unit;
	r.hr_seq = *seq;
	r.hr_offset = off;
	r.hr_length = len;
	r.hr_cmd = cmd;
	r.hr_flags = flags;
	r.hr_data = (uint64_t)(uintptr_t)buf;
	error = ioc(fp, HAST_IOC_RANGE, &r);
	if (error == 0 && op == HAST_RANGE_LOCK)
		*seq = r.hr_seq;
	return (error);
}

static struct hast_abi_stats
stats(struct kshim_file *fp, uint64_t unit)
{
	struct hast_abi_stats st;

	memset(&st, 0, sizeof(st));
	st.hs_version = HAST_ABI_VERSION;
	st.hs_unit = unit;
	CHECK0(ioc(fp, HAST_IOC_STATS, &st));
	return (st);
}

/*
 * The engine: answers upcalls from a peer held in memory.
 */
struct engine {
	struct kshim_file	*fp;
	uint64_t		 unit;
	pthread_t		 thr;
	pthread_mutex_t		 mtx;
	pthread_cond_t		 cv;
	uint8_t			*peer;
	int			 hold;		/* keep remote requests */
	struct hast_abi_upcall	 held[512];
	int			 nheld;
	uint64_t		 granted[64];
	int			 ngranted;
	uint64_t		 nwrite, nread, ndelete, nflush, nbump;
	uint64_t		 nsyncio, nfault;
	int			 exited;
	int			 exit_error;
};

static void
engine_answer(struct engine *e, const struct hast_abi_upcall *up)
{
	struct hast_abi_downcall d;
	int error;

	if (up->hu_kind == HAST_UP_WRITE && (up->hu_flags & HAST_UPF_MEMSYNC))
		(void)down(e->fp, e->unit, HAST_DOWN_REMOTE_RECV, up->hu_seq,
		    0, 0);
	memset(&d, 0, sizeof(d));
	d.hd_version = HAST_ABI_VERSION;
	d.hd_kind = HAST_DOWN_REMOTE_DONE;
	d.hd_unit = e->unit;
	d.hd_seq = up->hu_seq;
	if (up->hu_kind == HAST_UP_READ) {
		d.hd_data = (uint64_t)(uintptr_t)(e->peer + up->hu_offset);
		d.hd_datalen = up->hu_length;
	}
	error = ioc(e->fp, HAST_IOC_DOWNCALL, &d);
	/* ENOENT: the link went down meanwhile; ENXIO: destroyed. */
	if (error != 0 && error != ENOENT && error != ENXIO)
		fail(__LINE__, "REMOTE_DONE of seq %ju: %s",
		    (uintmax_t)up->hu_seq, strerror(error));
}

static void *
engine_run(void *arg)
{
	struct hast_abi_upcall up;
	struct engine *e;
	uint8_t *buf;
	size_t cap;
	int error;

	e = arg;
	cap = 1 * MIB;
	buf = malloc(cap);
	CHECK(buf != NULL, "malloc");
	for (;;) {
		memset(&up, 0, sizeof(up));
		up.hu_version = HAST_ABI_VERSION;
		up.hu_unit = e->unit;
		up.hu_data = (uint64_t)(uintptr_t)buf;
		up.hu_datalen = cap;
		error = ioc(e->fp, HAST_IOC_UPCALL, &up);
		if (error == EINTR)
			continue;
		if (error == EFAULT) {
			pthread_mutex_lock(&e->mtx);
			e->nfault++;
			pthread_cond_broadcast(&e->cv);
			pthread_mutex_unlock(&e->mtx);
			continue;
		}
		if (error != 0) {
			pthread_mutex_lock(&e->mtx);
			e->exited = 1;
			e->exit_error = error;
			pthread_cond_broadcast(&e->cv);
			pthread_mutex_unlock(&e->mtx);
			break;
		}
		CHECK(up.hu_version == HAST_ABI_VERSION && up.hu_cookie == 0,
		    "upcall version %u cookie %ju", up.hu_version,
		    (uintmax_t)up.hu_cookie);
		pthread_mutex_lock(&e->mtx);
		switch (up.hu_kind) {
		case HAST_UP_WRITE:
			CHECK(up.hu_error == 0 && up.hu_datalen == up.hu_length,
			    "write upcall: error %d, %ju of %ju bytes",
			    up.hu_error, (uintmax_t)up.hu_datalen,
			    (uintmax_t)up.hu_length);
			CHECK(up.hu_offset + up.hu_length <= DATASIZE,
			    "write past the end");
			memcpy(e->peer + up.hu_offset, buf, up.hu_length);
			e->nwrite++;
			break;
		case HAST_UP_DELETE:
			memset(e->peer + up.hu_offset, 0, up.hu_length);
			e->ndelete++;
			break;
		case HAST_UP_READ:
			e->nread++;
			break;
		case HAST_UP_FLUSH:
			e->nflush++;
			break;
		case HAST_UP_BUMP:
			e->nbump++;
			pthread_mutex_unlock(&e->mtx);
			CHECK0(down(e->fp, e->unit, HAST_DOWN_BUMP_DONE, 0, 0,
			    0));
			pthread_mutex_lock(&e->mtx);
			pthread_cond_broadcast(&e->cv);
			pthread_mutex_unlock(&e->mtx);
			continue;
		case HAST_UP_SYNC_LOCKED:
			if (e->ngranted < 64)
				e->granted[e->ngranted++] = up.hu_seq;
			pthread_cond_broadcast(&e->cv);
			pthread_mutex_unlock(&e->mtx);
			continue;
		case HAST_UP_SYNC_IO_DONE:
			e->nsyncio++;
			pthread_cond_broadcast(&e->cv);
			pthread_mutex_unlock(&e->mtx);
			continue;
		default:
			fail(__LINE__, "unknown upcall kind %u", up.hu_kind);
		}
		if (e->hold && e->nheld < 512) {
			e->held[e->nheld++] = up;
			pthread_cond_broadcast(&e->cv);
			pthread_mutex_unlock(&e->mtx);
			continue;
		}
		pthread_cond_broadcast(&e->cv);
		pthread_mutex_unlock(&e->mtx);
		engine_answer(e, &up);
	}
	free(buf);
	return (NULL);
}

static void
engine_start(struct engine *e, struct kshim_file *fp, uint64_t unit)
{

	memset(e, 0, sizeof(*e));
	e->fp = fp;
	e->unit = unit;
	e->peer = calloc(1, DATASIZE);
	CHECK(e->peer != NULL, "calloc");
	pthread_mutex_init(&e->mtx, NULL);
	pthread_cond_init(&e->cv, NULL);
	CHECK0(pthread_create(&e->thr, NULL, engine_run, e));
}

static void
engine_release(struct engine *e)
{
	struct hast_abi_upcall held[512];
	int i, n;

	pthread_mutex_lock(&e->mtx);
	e->hold = 0;
	n = e->nheld;
	memcpy(held, e->held, sizeof(held[0]) * (size_t)n);
	e->nheld = 0;
	pthread_mutex_unlock(&e->mtx);
	for (i = 0; i < n; i++)
		engine_answer(e, &held[i]);
}

/* Wait until *counter (under e->mtx) reaches want. */
static void
engine_wait(struct engine *e, const uint64_t *counter, uint64_t want,
    const char *what)
{
	struct timespec ts;

	pthread_mutex_lock(&e->mtx);
	while (*counter < want) {
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_sec += 10;
		if (pthread_cond_timedwait(&e->cv, &e->mtx, &ts) != 0) {
			pthread_mutex_unlock(&e->mtx);
			fail(__LINE__, "timed out waiting for %s (%ju of %ju)",
			    what, (uintmax_t)*counter, (uintmax_t)want);
		}
	}
	pthread_mutex_unlock(&e->mtx);
}

static void
engine_join(struct engine *e)
{

	CHECK0(pthread_join(e->thr, NULL));
	CHECK(e->exited && e->exit_error == ENXIO,
	    "the engine ended with %s, not ENXIO", strerror(e->exit_error));
	pthread_mutex_destroy(&e->mtx);
	pthread_cond_destroy(&e->cv);
	free(e->peer);
}

/*
 * Clients.
 */
struct cio {
	pthread_mutex_t	m;
	pthread_cond_t	c;
	int		done;
	int		error;
	int64_t		completed;
};

static void
cio_done(void *arg, int error, int64_t completed)
{
	struct cio *w;

	w = arg;
	pthread_mutex_lock(&w->m);
	w->done = 1;
	w->error = error;
	w->completed = completed;
	pthread_cond_signal(&w->c);
	pthread_mutex_unlock(&w->m);
}

static void
cio_start(struct cio *w, struct kshim_client *c, int cmd, uint64_t off,
    uint64_t len, void *buf)
{

	pthread_mutex_init(&w->m, NULL);
	pthread_cond_init(&w->c, NULL);
	w->done = 0;
	w->error = -1;
	CHECK0(kshim_client_io(c, cmd, (int64_t)off, (int64_t)len, buf,
	    cio_done, w));
}

static int
cio_finished(struct cio *w)
{
	int d;

	pthread_mutex_lock(&w->m);
	d = w->done;
	pthread_mutex_unlock(&w->m);
	return (d);
}

#define	cio_wait(w, t)	cio_wait_at((w), (t), __LINE__)

static int
cio_wait_at(struct cio *w, unsigned timeout_ms, int line)
{
	struct timespec ts;
	int error;

	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += timeout_ms / 1000;
	ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&w->m);
	while (!w->done) {
		if (pthread_cond_timedwait(&w->c, &w->m, &ts) != 0) {
			pthread_mutex_unlock(&w->m);
			fail(line, "a client request was never answered");
		}
	}
	error = w->error;
	pthread_mutex_unlock(&w->m);
	pthread_mutex_destroy(&w->m);
	pthread_cond_destroy(&w->c);
	return (error);
}

static int
cio_sync(struct kshim_client *c, int cmd, uint64_t off, uint64_t len,
    void *buf)
{
	struct cio w;

	cio_start(&w, c, cmd, off, len, buf);
	return (cio_wait(&w, 20000));
}

/*
 * One instance on one disk file.
 */
struct inst {
	char			 disk[64];
	char			 path[512];
	struct kshim_file	*fp;
	uint64_t		 unit;
	struct kshim_client	*client;
	struct engine		 eng;
	int			 engine_on;
};

static void
inst_create(struct inst *in, const char *name, uint32_t mode, int engine)
{
	struct hast_abi_create c;
	uint8_t map[512];
	int fd;

	memset(in, 0, sizeof(*in));
	snprintf(in->disk, sizeof(in->disk), "kd-%s", name);
	snprintf(in->path, sizeof(in->path), "%s/%s.img", dir, name);
	fd = open(in->path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	CHECK(fd >= 0, "create %s: %s", in->path, strerror(errno));
	CHECK(ftruncate(fd, (off_t)(LOCALOFF + DATASIZE)) == 0, "ftruncate");
	close(fd);
	CHECK0(kshim_disk_create(in->disk, in->path, SECTOR, 4));
	CHECK0(kshim_dev_open("hastctl", KSHIM_FREAD | KSHIM_FWRITE,
	    &in->fp));
	memset(&c, 0, sizeof(c));
	memset(map, 0, sizeof(map));
	c.hc_version = HAST_ABI_VERSION;
	c.hc_mode = mode;
	snprintf(c.hc_name, sizeof(c.hc_name), "%s", name);
	snprintf(c.hc_local, sizeof(c.hc_local), "%s", in->disk);
	c.hc_mediasize = DATASIZE;
	c.hc_localoff = LOCALOFF;
	c.hc_mapoff = MAPOFF;
	c.hc_extentsize = EXTENT;
	c.hc_keepdirty = 8;
	c.hc_sectorsize = SECTOR;
	c.hc_flags = HAST_CREATEF_METAFLUSH;
	c.hc_map = (uint64_t)(uintptr_t)map;
	c.hc_mapsize = sizeof(map);
	CHECK0(ioc(in->fp, HAST_IOC_CREATE, &c));
	CHECK(c.hc_unit != 0, "no unit");
	in->unit = c.hc_unit;
	{
		char prov[128];

		snprintf(prov, sizeof(prov), "hast/%s", name);
		CHECK0(kshim_client_open(prov, 1, 1, 0, &in->client));
	}
	if (engine) {
		engine_start(&in->eng, in->fp, in->unit);
		in->engine_on = 1;
	}
}

static int
inst_destroy_ioctl(struct inst *in)
{
	struct hast_abi_create c;

	memset(&c, 0, sizeof(c));
	c.hc_version = HAST_ABI_VERSION;
	c.hc_unit = in->unit;
	return (ioc(in->fp, HAST_IOC_DESTROY, &c));
}

static void
check_idle(void)
{
	char buf[2048];
	int error, i;

	/* GEOM's washer runs on its own thread: give it a moment. */
	for (i = 0; i < 200; i++) {
		buf[0] = '\0';
		error = kshim_check_idle(buf, sizeof(buf));
		if (error == 0)
			return;
		msleep_ms(10);
	}
	fail(__LINE__, "not idle at the end:%s", buf);
}

static void
inst_teardown(struct inst *in)
{

	if (in->client != NULL)
		CHECK0(kshim_client_close(in->client));
	in->client = NULL;
	CHECK0(inst_destroy_ioctl(in));
	if (in->engine_on)
		engine_join(&in->eng);
	kshim_dev_close(in->fp);
	CHECK0(kshim_disk_destroy(in->disk, 5000));
	unlink(in->path);
	check_idle();
}

static void
read_file(const char *path, uint64_t off, void *buf, size_t len)
{
	int fd;

	fd = open(path, O_RDONLY);
	CHECK(fd >= 0, "open %s", path);
	CHECK(pread(fd, buf, len, (off_t)off) == (ssize_t)len, "pread");
	close(fd);
}

/*
 * basic
 */
static void
t_basic(void)
{
	struct hast_abi_stats st;
	struct inst in;
	uint8_t *w, *r, map[512], meta[512], disk[512];
	uint64_t lk, gen;
	char xml[65536];
	int val, error;

	inst_create(&in, "basic", HAST_REPL_FULLSYNC, 1);
	w = malloc(256 * KIB);
	r = malloc(256 * KIB);
	CHECK(w != NULL && r != NULL, "malloc");

	/* Link down: the first write waits for the counter bump. */
	pattern(w, 64 * KIB, 0, 1);
	CHECK0(cio_sync(in.client, KSHIM_BIO_WRITE, 0, 64 * KIB, w));
	CHECK(in.eng.nbump == 1, "bumps: %ju", (uintmax_t)in.eng.nbump);
	CHECK(in.eng.nwrite == 0, "replicated with the link down");

	/* Link up: a write reaches the peer before it is acknowledged. */
	CHECK0(down(in.fp, in.unit, HAST_DOWN_LINK, 0, 0, HAST_LINK_UP));
	pattern(w, 128 * KIB, MIB, 2);
	CHECK0(cio_sync(in.client, KSHIM_BIO_WRITE, MIB, 128 * KIB, w));
	CHECK(in.eng.nwrite == 1, "writes at the peer: %ju",
	    (uintmax_t)in.eng.nwrite);
	CHECK(memcmp(in.eng.peer + MIB, w, 128 * KIB) == 0, "peer data");
	read_file(in.path, LOCALOFF + MIB, r, 128 * KIB);
	CHECK(memcmp(r, w, 128 * KIB) == 0, "local data at localoff");
	memset(r, 0, 128 * KIB);
	CHECK0(cio_sync(in.client, KSHIM_BIO_READ, MIB, 128 * KIB, r));
	CHECK(memcmp(r, w, 128 * KIB) == 0, "read back");
	CHECK(in.eng.nread == 0, "a local read went to the peer");

	/* Extent 32 (2 MiB) stale locally: reads come from the peer. */
	pattern(in.eng.peer + 2 * MIB, EXTENT, 2 * MIB, 3);
	memset(map, 0, sizeof(map));
	map[4] = 1;
	CHECK0(map_op(in.fp, in.unit, HAST_MAPOP_MERGE, 0, map, sizeof(map)));
	CHECK0(down(in.fp, in.unit, HAST_DOWN_SYNCDIR, 0, 0,
	    HAST_SYNC_FROM_PEER));
	CHECK0(cio_sync(in.client, KSHIM_BIO_READ, 2 * MIB, 8 * KIB, r));
	CHECK(in.eng.nread == 1, "peer reads: %ju", (uintmax_t)in.eng.nread);
	CHECK(memcmp(r, in.eng.peer + 2 * MIB, 8 * KIB) == 0,
	    "peer read data");

	/* Resync that extent under a range lock. */
	lk = 0;
	CHECK0(range_op(in.fp, in.unit, HAST_RANGE_LOCK, &lk, 2 * MIB, EXTENT,
	    0, 0, NULL));
	pthread_mutex_lock(&in.eng.mtx);
	while (in.eng.ngranted == 0)
		pthread_cond_wait(&in.eng.cv, &in.eng.mtx);
	CHECK(in.eng.granted[0] == lk, "granted %ju, asked %ju",
	    (uintmax_t)in.eng.granted[0], (uintmax_t)lk);
	pthread_mutex_unlock(&in.eng.mtx);
	CHECK0(range_op(in.fp, in.unit, HAST_RANGE_IO, &lk, 2 * MIB, EXTENT,
	    HAST_CMD_WRITE, 0, in.eng.peer + 2 * MIB));
	memset(r, 0, EXTENT);
	CHECK0(range_op(in.fp, in.unit, HAST_RANGE_IO, &lk, 2 * MIB, EXTENT,
	    HAST_CMD_READ, 0, r));
	CHECK(memcmp(r, in.eng.peer + 2 * MIB, EXTENT) == 0, "sync read");
	engine_wait(&in.eng, &in.eng.nsyncio, 2, "SYNC_IO_DONE upcalls");
	CHECK0(range_op(in.fp, in.unit, HAST_RANGE_RELEASE, &lk, 0, 0, 0,
	    HAST_RANGEF_CLEAR, NULL));
	CHECK0(map_op(in.fp, in.unit, HAST_MAPOP_GET, HAST_MAP_SYNC, map,
	    sizeof(map)));
	CHECK(map[4] == 0, "extent 32 still in the sync map");
	CHECK0(down(in.fp, in.unit, HAST_DOWN_SYNCDIR, 0, 0, HAST_SYNC_NONE));

	/* Flush and delete go to both sides. */
	CHECK0(cio_sync(in.client, KSHIM_BIO_FLUSH, 0, 0, NULL));
	CHECK(in.eng.nflush >= 1, "no flush at the peer");
	CHECK0(cio_sync(in.client, KSHIM_BIO_DELETE, MIB, 64 * KIB, NULL));
	CHECK(in.eng.ndelete == 1, "no delete at the peer");
	error = down(in.fp, in.unit, HAST_DOWN_FLUSH, 0, 0, 0);
	CHECK(error == 0 || error == EBUSY, "DOWN_FLUSH: %s",
	    strerror(error));
	(void)gen;

	/* The metadata block through the module, then flushed. */
	memset(meta, 0, sizeof(meta));
	strcpy((char *)meta, "metadata block");
	CHECK0(map_op(in.fp, in.unit, HAST_MAPOP_METADATA, 0, meta,
	    sizeof(meta)));
	read_file(in.path, 0, disk, sizeof(disk));
	CHECK(memcmp(disk, meta, sizeof(meta)) == 0, "metadata on disk");
	error = map_op(in.fp, in.unit, HAST_MAPOP_METADATA, 0, meta, 100);
	CHECK(error == EINVAL, "a partial sector: %s", strerror(error));

	/* Bad arguments. */
	{
		struct hast_abi_stats bad;

		memset(&bad, 0, sizeof(bad));
		bad.hs_version = HAST_ABI_VERSION + 1;
		bad.hs_unit = in.unit;
		CHECK(ioc(in.fp, HAST_IOC_STATS, &bad) == EPROTONOSUPPORT,
		    "ABI version check");
		bad.hs_version = HAST_ABI_VERSION;
		bad.hs_unit = in.unit + 1000;
		CHECK(ioc(in.fp, HAST_IOC_STATS, &bad) == ENXIO, "bad unit");
	}

	st = stats(in.fp, in.unit);
	CHECK(st.hs_writes == 2 && st.hs_reads == 2 && st.hs_deletes == 1,
	    "stats: %ju writes %ju reads %ju deletes", (uintmax_t)st.hs_writes,
	    (uintmax_t)st.hs_reads, (uintmax_t)st.hs_deletes);
	CHECK(st.hs_link == HAST_LINK_UP, "link");

	CHECK0(kshim_client_getattr_int(in.client, "GEOM::candelete", &val));
	CHECK(val == 1, "candelete %d", val);
	CHECK0(kshim_confxml(xml, sizeof(xml)));
	CHECK(strstr(xml, "<Unit>") != NULL && strstr(xml, "<Local>kd-basic"
	    "</Local>") != NULL, "confxml:\n%s", xml);

	/* Open: destroy refuses. */
	CHECK(inst_destroy_ioctl(&in) == EBUSY, "destroy while open");
	inst_teardown(&in);
	free(w);
	free(r);
}


static int upcall_once_error;

static void *
upcall_once(void *arg)
{
	struct hast_abi_upcall up;
	struct inst *in;

	in = arg;
	memset(&up, 0, sizeof(up));
	up.hu_version = HAST_ABI_VERSION;
	up.hu_unit = in->unit;
	upcall_once_error = ioc(in->fp, HAST_IOC_UPCALL, &up);
	return (NULL);
}

/* Write with the link down (the bump), then bring the link up. */
static void
inst_up(struct inst *in, uint8_t *buf)
{

	pattern(buf, 4 * KIB, 0, 99);
	CHECK0(cio_sync(in->client, KSHIM_BIO_WRITE, 0, 4 * KIB, buf));
	CHECK0(down(in->fp, in->unit, HAST_DOWN_LINK, 0, 0, HAST_LINK_UP));
}

/*
 * enomem: GEOM retries a bio answered ENOMEM; every allocation of CREATE
 * may fail without a leak.
 */
static void
t_enomem(void)
{
	struct hast_abi_create c;
	struct kshim_file *fp;
	struct inst in;
	uint8_t *w, *r;
	uint64_t hits;
	uint32_t k;
	int error, created;

	inst_create(&in, "enomem", HAST_REPL_FULLSYNC, 1);
	w = malloc(64 * KIB);
	r = malloc(64 * KIB);
	CHECK(w != NULL && r != NULL, "malloc");
	inst_up(&in, w);

	/* g_clone_bio fails three times: the write is retried and lands. */
	kshim_fail_set(KSHIM_FAIL_CLONE_BIO, 0, 3);
	pattern(w, 64 * KIB, 3 * MIB, 5);
	CHECK0(cio_sync(in.client, KSHIM_BIO_WRITE, 3 * MIB, 64 * KIB, w));
	CHECK(kshim_fail_hits(KSHIM_FAIL_CLONE_BIO) == 3, "clone failures: "
	    "%ju", (uintmax_t)kshim_fail_hits(KSHIM_FAIL_CLONE_BIO));
	CHECK(memcmp(in.eng.peer + 3 * MIB, w, 64 * KIB) == 0, "peer data");

	/* M_NOWAIT fails: the g_hast_io, then the core's request. */
	hits = kshim_fail_hits(KSHIM_FAIL_MALLOC_NOWAIT);
	kshim_fail_set(KSHIM_FAIL_MALLOC_NOWAIT, 0, 2);
	pattern(w, 64 * KIB, 3 * MIB, 6);
	CHECK0(cio_sync(in.client, KSHIM_BIO_WRITE, 3 * MIB, 64 * KIB, w));
	CHECK(kshim_fail_hits(KSHIM_FAIL_MALLOC_NOWAIT) == hits + 2,
	    "M_NOWAIT failures");
	kshim_fail_set(KSHIM_FAIL_MALLOC_NOWAIT, 1, 1);
	CHECK0(cio_sync(in.client, KSHIM_BIO_READ, 3 * MIB, 64 * KIB, r));
	CHECK(memcmp(r, w, 64 * KIB) == 0, "read back");
	kshim_fail_clear();

	/* The core's own flush and a sync lock answer ENOMEM. */
	kshim_fail_set(KSHIM_FAIL_MALLOC_NOWAIT, 0, 1);
	error = down(in.fp, in.unit, HAST_DOWN_FLUSH, 0, 0, 0);
	CHECK(error == ENOMEM, "DOWN_FLUSH with no memory: %s",
	    strerror(error));
	{
		uint64_t lk = 0;

		kshim_fail_set(KSHIM_FAIL_MALLOC_NOWAIT, 0, 1);
		error = range_op(in.fp, in.unit, HAST_RANGE_LOCK, &lk, 0,
		    EXTENT, 0, 0, NULL);
		CHECK(error == ENOMEM, "RANGE_LOCK with no memory: %s",
		    strerror(error));
	}
	kshim_fail_clear();
	inst_teardown(&in);

	/* CREATE with each of its M_NOWAIT allocations failing in turn. */
	in.fp = NULL;
	inst_create(&in, "enomem2", HAST_REPL_MEMSYNC, 0);
	CHECK0(kshim_client_close(in.client));
	in.client = NULL;
	CHECK0(inst_destroy_ioctl(&in));
	kshim_dev_close(in.fp);
	CHECK0(kshim_dev_open("hastctl", KSHIM_FREAD | KSHIM_FWRITE, &fp));
	created = 0;
	for (k = 0; k < 64 && !created; k++) {
		memset(&c, 0, sizeof(c));
		c.hc_version = HAST_ABI_VERSION;
		c.hc_mode = HAST_REPL_MEMSYNC;
		strcpy(c.hc_name, "enomem3");
		strcpy(c.hc_local, in.disk);
		c.hc_mediasize = DATASIZE;
		c.hc_localoff = LOCALOFF;
		c.hc_mapoff = MAPOFF;
		c.hc_extentsize = EXTENT;
		c.hc_keepdirty = 8;
		c.hc_sectorsize = SECTOR;
		kshim_fail_set(KSHIM_FAIL_MALLOC_NOWAIT, k, 1);
		error = ioc(fp, HAST_IOC_CREATE, &c);
		kshim_fail_clear();
		if (error == 0) {
			created = 1;
			c.hc_version = HAST_ABI_VERSION;
			CHECK0(ioc(fp, HAST_IOC_DESTROY, &c));
		} else
			CHECK(error == ENOMEM, "CREATE failing allocation %u: "
			    "%s", k, strerror(error));
		kshim_dev_close(fp);
		check_idle();
		CHECK0(kshim_dev_open("hastctl", KSHIM_FREAD | KSHIM_FWRITE,
		    &fp));
	}
	CHECK(created && k > 5, "CREATE allocations: %u", k);
	kshim_dev_close(fp);
	CHECK0(kshim_disk_destroy(in.disk, 5000));
	unlink(in.path);
	check_idle();
	free(w);
	free(r);
}

/*
 * orphan: the local disk goes away with local halves in flight; writes
 * the peer confirms still succeed, reads come from the peer.
 */
static void
t_orphan(void)
{
	struct cio ws[8];
	struct inst in;
	uint8_t *w, *r, map[512];
	uint32_t queued;
	int i;

	inst_create(&in, "orphan", HAST_REPL_FULLSYNC, 1);
	w = malloc(8 * 64 * KIB);
	r = malloc(64 * KIB);
	CHECK(w != NULL && r != NULL, "malloc");
	inst_up(&in, w);
	/* Extents 0-7 marked on disk first. */
	for (i = 0; i < 8; i++) {
		pattern(w + i * 64 * KIB, 64 * KIB, (uint64_t)i * EXTENT, 10);
		CHECK0(cio_sync(in.client, KSHIM_BIO_WRITE, (uint64_t)i *
		    EXTENT, 64 * KIB, w + i * 64 * KIB));
	}
	/* Eight more writes whose local halves wait on the disk. */
	CHECK0(kshim_disk_hold(in.disk, 1));
	for (i = 0; i < 8; i++) {
		pattern(w + i * 64 * KIB, 64 * KIB, (uint64_t)i * EXTENT, 11);
		cio_start(&ws[i], in.client, KSHIM_BIO_WRITE, (uint64_t)i *
		    EXTENT, 64 * KIB, w + i * 64 * KIB);
	}
	for (i = 0; i < 500; i++) {
		CHECK0(kshim_disk_queued(in.disk, &queued));
		if (queued == 8)
			break;
		msleep_ms(10);
	}
	CHECK(queued == 8, "local halves queued: %u", queued);
	engine_wait(&in.eng, &in.eng.nwrite, 8 + 8, "remote halves");
	/* The disk disappears; the held I/O fails when it runs. */
	CHECK0(kshim_disk_orphan(in.disk));
	CHECK0(kshim_disk_hold(in.disk, 0));
	for (i = 0; i < 8; i++)
		CHECK(cio_wait(&ws[i], 20000) == 0, "write %d failed after the "
		    "orphan", i);
	/* New I/O: local fails at once, the peer has it. */
	pattern(w, 64 * KIB, 0, 12);
	CHECK0(cio_sync(in.client, KSHIM_BIO_WRITE, 0, 64 * KIB, w));
	CHECK(memcmp(in.eng.peer, w, 64 * KIB) == 0, "peer data");
	memset(r, 0, 64 * KIB);
	CHECK0(cio_sync(in.client, KSHIM_BIO_READ, EXTENT, 64 * KIB, r));
	CHECK(memcmp(r, w + 64 * KIB, 64 * KIB) == 0, "read from the peer");
	CHECK(in.eng.nread >= 1, "no peer read");
	/* Every extent written since is dirty: the local copy needs repair. */
	CHECK0(map_op(in.fp, in.unit, HAST_MAPOP_GET, HAST_MAP_SYNC, map,
	    sizeof(map)));
	CHECK(map[0] == 0xff, "sync map after the orphan: %#x", map[0]);
	inst_teardown(&in);
	free(w);
	free(r);
}

struct destroyer {
	struct inst	*in;
	pthread_mutex_t	 m;
	int		 done;
	int		 error;
};

static void *
destroy_thread(void *arg)
{
	struct destroyer *d;
	int error;

	d = arg;
	error = inst_destroy_ioctl(d->in);
	pthread_mutex_lock(&d->m);
	d->done = 1;
	d->error = error;
	pthread_mutex_unlock(&d->m);
	return (NULL);
}

/*
 * destroy: with client requests waiting for the peer, a sync lock held,
 * the upcall thread asleep and a map write in flight.
 */
static void
t_destroy(void)
{
	struct destroyer d;
	struct cio ws[4];
	struct inst in;
	pthread_t t;
	uint8_t *w, map[512];
	uint64_t lk;
	int i, done;

	inst_create(&in, "destroy", HAST_REPL_FULLSYNC, 1);
	w = malloc(4 * 64 * KIB);
	CHECK(w != NULL, "malloc");
	inst_up(&in, w);
	pthread_mutex_lock(&in.eng.mtx);
	in.eng.hold = 1;
	pthread_mutex_unlock(&in.eng.mtx);
	for (i = 0; i < 4; i++) {
		pattern(w + i * 64 * KIB, 64 * KIB, (uint64_t)i * EXTENT, 20);
		cio_start(&ws[i], in.client, KSHIM_BIO_WRITE, (uint64_t)(i + 4)
		    * EXTENT, 64 * KIB, w + i * 64 * KIB);
	}
	engine_wait(&in.eng, &in.eng.nwrite, 4, "remote halves");
	lk = 0;
	CHECK0(range_op(in.fp, in.unit, HAST_RANGE_LOCK, &lk, 32 * EXTENT,
	    EXTENT, 0, 0, NULL));
	CHECK(inst_destroy_ioctl(&in) == EBUSY, "destroy while open");
	for (i = 0; i < 4; i++)
		CHECK(!cio_finished(&ws[i]), "fullsync write %d acknowledged "
		    "before its remote half", i);
	/* The link goes: the writes end (their extents stay dirty). */
	CHECK0(down(in.fp, in.unit, HAST_DOWN_LINK, 0, 0, HAST_LINK_DOWN));
	for (i = 0; i < 4; i++)
		CHECK(cio_wait(&ws[i], 20000) == 0, "write %d", i);
	engine_release(&in.eng);	/* too late: ENOENT, ignored */
	CHECK0(kshim_client_close(in.client));
	in.client = NULL;
	/* A map write in flight on a held disk. */
	CHECK0(kshim_disk_hold(in.disk, 1));
	memset(map, 0, sizeof(map));
	map[6] = 0x0f;
	CHECK0(map_op(in.fp, in.unit, HAST_MAPOP_MERGE, 0, map, sizeof(map)));
	d.in = &in;
	d.done = 0;
	pthread_mutex_init(&d.m, NULL);
	CHECK0(pthread_create(&t, NULL, destroy_thread, &d));
	msleep_ms(400);
	pthread_mutex_lock(&d.m);
	done = d.done;
	pthread_mutex_unlock(&d.m);
	CHECK(!done, "destroy returned with a map write in flight (%s)",
	    strerror(d.error));
	CHECK0(kshim_disk_hold(in.disk, 0));
	CHECK0(pthread_join(t, NULL));
	CHECK(d.error == 0, "destroy: %s", strerror(d.error));
	pthread_mutex_destroy(&d.m);
	engine_join(&in.eng);
	{
		struct hast_abi_stats st;

		memset(&st, 0, sizeof(st));
		st.hs_version = HAST_ABI_VERSION;
		st.hs_unit = in.unit;
		CHECK(ioc(in.fp, HAST_IOC_STATS, &st) == ENXIO,
		    "a destroyed unit answers");
	}
	kshim_dev_close(in.fp);
	CHECK0(kshim_disk_destroy(in.disk, 5000));
	unlink(in.path);
	check_idle();
	free(w);
}

/* unload: refused while an instance exists (the final unload: main). */
static void
t_unload(void)
{
	struct hast_abi_stats st;
	struct inst in;

	inst_create(&in, "unload", HAST_REPL_MEMSYNC, 1);
	CHECK(kshim_unload() == EBUSY, "unload with an instance");
	CHECK(kshim_loaded(), "unloaded anyway");
	/* The instance still works. */
	st = stats(in.fp, in.unit);
	CHECK(st.hs_link == HAST_LINK_DOWN, "link");
	inst_teardown(&in);
}

/* The module goes, with a control file still open. */
static void
final_unload(void)
{
	struct hast_abi_stats st;
	struct kshim_file *fp;

	CHECK0(kshim_dev_open("hastctl", KSHIM_FREAD | KSHIM_FWRITE, &fp));
	CHECK0(kshim_unload());
	memset(&st, 0, sizeof(st));
	st.hs_version = HAST_ABI_VERSION;
	st.hs_unit = 1;
	CHECK(ioc(fp, HAST_IOC_STATS, &st) == ENXIO, "ioctl after unload");
	kshim_dev_close(fp);
	CHECK(kshim_dev_open("hastctl", KSHIM_FREAD, &fp) == ENOENT,
	    "hastctl after unload");
	check_idle();
	CHECK(kshim_load() == ESTALE, "a second load in one process");
}

/* copyout: a fault while UPCALL copies a payload out. */
static void
t_copyout(void)
{
	struct hast_abi_upcall up;
	struct inst in;
	struct cio wc;
	uint8_t *w, *buf, map[512];
	int error;

	inst_create(&in, "copyout", HAST_REPL_FULLSYNC, 0);
	w = malloc(64 * KIB);
	buf = malloc(64 * KIB);
	CHECK(w != NULL && buf != NULL, "malloc");
	/* The outage's bump by hand. */
	pattern(w, 4 * KIB, 0, 1);
	cio_start(&wc, in.client, KSHIM_BIO_WRITE, 0, 4 * KIB, w);
	memset(&up, 0, sizeof(up));
	up.hu_version = HAST_ABI_VERSION;
	up.hu_unit = in.unit;
	CHECK0(ioc(in.fp, HAST_IOC_UPCALL, &up));
	CHECK(up.hu_kind == HAST_UP_BUMP, "kind %u", up.hu_kind);
	CHECK0(down(in.fp, in.unit, HAST_DOWN_BUMP_DONE, 0, 0, 0));
	CHECK0(cio_wait(&wc, 20000));
	CHECK0(down(in.fp, in.unit, HAST_DOWN_LINK, 0, 0, HAST_LINK_UP));

	pattern(w, 64 * KIB, 5 * EXTENT, 30);
	cio_start(&wc, in.client, KSHIM_BIO_WRITE, 5 * EXTENT, 64 * KIB, w);
	kshim_fail_set(KSHIM_FAIL_COPYOUT, 0, 1);
	memset(&up, 0, sizeof(up));
	up.hu_version = HAST_ABI_VERSION;
	up.hu_unit = in.unit;
	up.hu_data = (uint64_t)(uintptr_t)buf;
	up.hu_datalen = 64 * KIB;
	error = ioc(in.fp, HAST_IOC_UPCALL, &up);
	CHECK(error == EFAULT, "UPCALL with a copyout fault: %s",
	    strerror(error));
	CHECK(kshim_fail_hits(KSHIM_FAIL_COPYOUT) == 1, "no fault injected");
	kshim_fail_clear();
	/*
	 * Never sent: the peer lacks an update made while connected, as in
	 * an outage, so the write waits for a counter bump; then it is
	 * acknowledged from the local copy and its extent stays dirty.
	 */
	memset(&up, 0, sizeof(up));
	up.hu_version = HAST_ABI_VERSION;
	up.hu_unit = in.unit;
	CHECK0(ioc(in.fp, HAST_IOC_UPCALL, &up));
	CHECK(up.hu_kind == HAST_UP_BUMP, "after the fault: kind %u",
	    up.hu_kind);
	CHECK(!cio_finished(&wc), "acknowledged before the bump");
	CHECK0(down(in.fp, in.unit, HAST_DOWN_BUMP_DONE, 0, 0, 0));
	CHECK0(cio_wait(&wc, 20000));
	CHECK0(map_op(in.fp, in.unit, HAST_MAPOP_GET, HAST_MAP_SYNC, map,
	    sizeof(map)));
	/* Extent 0: written in the outage; extent 5: never sent. */
	CHECK(map[0] == 0x21, "sync map after the fault: %#x", map[0]);

	/* A payload larger than the buffer stays parked: ENOMEM, again. */
	pattern(w, 64 * KIB, 6 * EXTENT, 31);
	cio_start(&wc, in.client, KSHIM_BIO_WRITE, 6 * EXTENT, 64 * KIB, w);
	up.hu_version = HAST_ABI_VERSION;
	up.hu_unit = in.unit;
	up.hu_data = (uint64_t)(uintptr_t)buf;
	up.hu_datalen = 4 * KIB;
	CHECK0(ioc(in.fp, HAST_IOC_UPCALL, &up));
	CHECK(up.hu_kind == HAST_UP_WRITE && up.hu_error == ENOMEM &&
	    up.hu_datalen == 64 * KIB, "parked: kind %u error %d len %ju",
	    up.hu_kind, up.hu_error, (uintmax_t)up.hu_datalen);
	up.hu_version = HAST_ABI_VERSION;
	up.hu_unit = in.unit;
	up.hu_data = (uint64_t)(uintptr_t)buf;
	up.hu_datalen = 64 * KIB;
	CHECK0(ioc(in.fp, HAST_IOC_UPCALL, &up));
	CHECK(up.hu_kind == HAST_UP_WRITE && up.hu_error == 0 &&
	    up.hu_offset == 6 * EXTENT && memcmp(buf, w, 64 * KIB) == 0,
	    "the parked write's payload");
	CHECK(!cio_finished(&wc), "acknowledged before the peer");
	CHECK0(down(in.fp, in.unit, HAST_DOWN_REMOTE_DONE, up.hu_seq, 0, 0));
	CHECK0(cio_wait(&wc, 20000));

	/* A signal interrupts the sleeping UPCALL. */
	{
		struct destroyer d;
		pthread_t t;

		(void)d;
		CHECK0(pthread_create(&t, NULL, upcall_once, &in));
		for (error = 0; error < 500; error++) {
			if (kshim_interrupt("hastup") > 0)
				break;
			msleep_ms(10);
		}
		CHECK(error < 500, "no UPCALL sleeper to interrupt");
		CHECK0(pthread_join(t, NULL));
		CHECK(upcall_once_error == EINTR, "interrupted UPCALL: %s",
		    strerror(upcall_once_error));
	}
	inst_teardown(&in);
	free(w);
	free(buf);
}

/*
 * stress: clients, the engine, link flaps, the core's flushes, resync
 * locks and injected allocation failures at once.  At the end every
 * extent the map calls clean holds the same bytes on both sides.
 */
struct stress {
	struct inst	*in;
	int		 stop;		/* atomic */
	unsigned	 seed;
	uint64_t	 ops;
	uint64_t	 errors;
	int		*orphaned;	/* atomic: errors allowed from now */
	int		 destroying;	/* atomic: ENXIO allowed from now */
};

static unsigned
rnd(unsigned *seed)
{

	*seed = *seed * 1103515245u + 12345u;
	return ((*seed >> 8) & 0xffffff);
}

static void *
stress_client(void *arg)
{
	struct stress *st;
	uint64_t off, len;
	uint8_t *buf;
	unsigned seed, op;
	int error, cmd;

	st = arg;
	seed = st->seed;
	buf = malloc(128 * KIB);
	CHECK(buf != NULL, "malloc");
	while (!__atomic_load_n(&st->stop, __ATOMIC_RELAXED)) {
		len = (uint64_t)(1 + rnd(&seed) % 32) * 4 * KIB;
		off = (uint64_t)(rnd(&seed) % ((DATASIZE - len) / (4 * KIB))) *
		    4 * KIB;
		op = rnd(&seed) % 100;
		if (op < 65) {
			cmd = KSHIM_BIO_WRITE;
			pattern(buf, len, off, rnd(&seed));
		} else if (op < 90)
			cmd = KSHIM_BIO_READ;
		else if (op < 95) {
			cmd = KSHIM_BIO_DELETE;
		} else {
			cmd = KSHIM_BIO_FLUSH;
			off = 0;
			len = 0;
		}
		error = cio_sync(st->in->client, cmd, off, len,
		    cmd == KSHIM_BIO_WRITE || cmd == KSHIM_BIO_READ ? buf :
		    NULL);
		/* Once the disk is gone, a request fails when the link is. */
		if (error != 0 && st->orphaned != NULL &&
		    __atomic_load_n(st->orphaned, __ATOMIC_RELAXED))
			st->errors++;
		else
			CHECK(error == 0, "client cmd %d at %ju+%ju: %s", cmd,
			    (uintmax_t)off, (uintmax_t)len, strerror(error));
		__atomic_add_fetch(&st->ops, 1, __ATOMIC_RELAXED);
	}
	free(buf);
	return (NULL);
}

/* Wait for lock lk's grant in the engine's list; 0 if the instance went. */
static int
wait_grant(struct engine *e, uint64_t lk)
{
	struct timespec ts;
	int i, found;

	pthread_mutex_lock(&e->mtx);
	for (;;) {
		found = 0;
		for (i = 0; i < e->ngranted; i++) {
			if (e->granted[i] == lk) {
				e->granted[i] = e->granted[--e->ngranted];
				found = 1;
				break;
			}
		}
		if (found)
			break;
		if (e->exited) {
			pthread_mutex_unlock(&e->mtx);
			return (0);
		}
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_sec += 20;
		if (pthread_cond_timedwait(&e->cv, &e->mtx, &ts) != 0) {
			pthread_mutex_unlock(&e->mtx);
			fail(__LINE__, "sync lock %ju never granted",
			    (uintmax_t)lk);
		}
	}
	pthread_mutex_unlock(&e->mtx);
	return (1);
}

/* In the chaos thread: an answer of a destroyed instance ends it. */
#define	CHAOS_GONE(st, error)						\
	((error) == ENXIO && __atomic_load_n(&(st)->destroying,		\
	    __ATOMIC_RELAXED))

static void *
stress_chaos(void *arg)
{
	struct stress *st;
	struct inst *in;
	uint8_t *buf;
	uint64_t lk, ext;
	unsigned seed, op;
	int error, orphaned;

	st = arg;
	in = st->in;
	seed = st->seed;
	buf = malloc(EXTENT);
	CHECK(buf != NULL, "malloc");
	while (!__atomic_load_n(&st->stop, __ATOMIC_RELAXED)) {
		msleep_ms(5 + rnd(&seed) % 20);
		op = rnd(&seed) % 3;
		if (op == 0) {
			error = down(in->fp, in->unit, HAST_DOWN_LINK, 0, 0,
			    HAST_LINK_DOWN);
			if (CHAOS_GONE(st, error))
				break;
			CHECK0(error);
			msleep_ms(rnd(&seed) % 20);
			error = down(in->fp, in->unit, HAST_DOWN_LINK, 0, 0,
			    HAST_LINK_UP);
			if (CHAOS_GONE(st, error))
				break;
			CHECK0(error);
		} else if (op == 1) {
			error = down(in->fp, in->unit, HAST_DOWN_FLUSH, 0, 0,
			    0);
			if (CHAOS_GONE(st, error))
				break;
			CHECK(error == 0 || error == EBUSY || error == ENOMEM ||
			    error == EIO, "DOWN_FLUSH: %s", strerror(error));
		} else {
			ext = rnd(&seed) % (DATASIZE / EXTENT);
			lk = 0;
			error = range_op(in->fp, in->unit, HAST_RANGE_LOCK, &lk,
			    ext * EXTENT, EXTENT, 0, 0, NULL);
			if (error == ENOMEM)
				continue;
			if (CHAOS_GONE(st, error))
				break;
			CHECK0(error);
			if (!wait_grant(&in->eng, lk))
				break;
			error = range_op(in->fp, in->unit, HAST_RANGE_IO, &lk,
			    ext * EXTENT, EXTENT, HAST_CMD_READ, 0, buf);
			if (CHAOS_GONE(st, error))
				break;
			/* EINVAL: the destroy released the lock meanwhile. */
			/* The flag is set before the disk goes: read it now. */
			orphaned = st->orphaned != NULL &&
			    __atomic_load_n(st->orphaned, __ATOMIC_RELAXED);
			CHECK(error == 0 || error == ENOMEM || error == EFAULT ||
			    (orphaned && error == ENXIO) ||
			    (__atomic_load_n(&st->destroying, __ATOMIC_RELAXED)
			    && (error == EINVAL || error == ENOENT)),
			    "RANGE_IO: %s", strerror(error));
			error = range_op(in->fp, in->unit, HAST_RANGE_RELEASE,
			    &lk, 0, 0, 0, 0, NULL);
			if (CHAOS_GONE(st, error))
				break;
			CHECK(error == 0 || error == EIO || error == ENOENT ||
			    error == EINVAL, "RANGE_RELEASE: %s",
			    strerror(error));
		}
	}
	free(buf);
	return (NULL);
}

#define	STRESS_ORPHAN	1	/* the local disk goes halfway */
#define	STRESS_DESTROY	2	/* destroy under the engine's chaos */

static void
stress_run(int mode)
{
	struct stress cl[3], chaos;
	int orphaned;
	pthread_t tc[3], tx;
	struct inst in;
	uint8_t *local, map[512], *w;
	uint64_t e, seconds, total;
	const char *env;
	int i, differ;

	env = getenv("KSHIM_STRESS_SECONDS");
	seconds = env != NULL ? strtoull(env, NULL, 10) : 3;
	inst_create(&in, scenario, HAST_REPL_MEMSYNC, 1);
	orphaned = 0;
	w = malloc(4 * KIB);
	CHECK(w != NULL, "malloc");
	inst_up(&in, w);
	kshim_fail_rate(KSHIM_FAIL_MALLOC_NOWAIT, 20000, 7);
	kshim_fail_rate(KSHIM_FAIL_CLONE_BIO, 20000, 11);
	kshim_fail_rate(KSHIM_FAIL_COPYOUT, 10000, 13);
	for (i = 0; i < 3; i++) {
		memset(&cl[i], 0, sizeof(cl[i]));
		cl[i].in = &in;
		cl[i].orphaned = &orphaned;
		cl[i].seed = (unsigned)(i + 1) * 7919u;
		CHECK0(pthread_create(&tc[i], NULL, stress_client, &cl[i]));
	}
	memset(&chaos, 0, sizeof(chaos));
	chaos.in = &in;
	chaos.orphaned = &orphaned;
	chaos.seed = 4242;
	CHECK0(pthread_create(&tx, NULL, stress_chaos, &chaos));
	if (mode == STRESS_ORPHAN) {
		/* The disk goes in the middle of it all. */
		msleep_ms((unsigned)(seconds * 500));
		__atomic_store_n(&orphaned, 1, __ATOMIC_RELAXED);
		CHECK0(kshim_disk_orphan(in.disk));
		msleep_ms((unsigned)(seconds * 500));
	} else
		msleep_ms((unsigned)(seconds * 1000));
	if (mode != STRESS_DESTROY) {
		__atomic_store_n(&chaos.stop, 1, __ATOMIC_RELAXED);
		CHECK0(pthread_join(tx, NULL));
	}
	for (i = 0; i < 3; i++)
		__atomic_store_n(&cl[i].stop, 1, __ATOMIC_RELAXED);
	total = 0;
	for (i = 0; i < 3; i++) {
		CHECK0(pthread_join(tc[i], NULL));
		total += cl[i].ops;
	}
	if (mode == STRESS_DESTROY) {
		/*
		 * Clients gone, hast/NAME closed; the engine, link flaps, sync
		 * locks and I/O and flushes go on while it is destroyed.
		 */
		CHECK0(kshim_client_close(in.client));
		in.client = NULL;
		__atomic_store_n(&chaos.destroying, 1, __ATOMIC_RELAXED);
		msleep_ms(50);
		CHECK0(inst_destroy_ioctl(&in));
		CHECK0(pthread_join(tx, NULL));
		kshim_fail_clear();
		fprintf(stderr, "kshim_test: %s: %ju client requests before "
		    "the destroy\n", scenario, (uintmax_t)total);
		engine_join(&in.eng);
		kshim_dev_close(in.fp);
		CHECK0(kshim_disk_destroy(in.disk, 5000));
		unlink(in.path);
		check_idle();
		free(w);
		return;
	}
	CHECK(total > 50, "only %ju client requests", (uintmax_t)total);
	CHECK(kshim_fail_hits(KSHIM_FAIL_MALLOC_NOWAIT) > 0 &&
	    kshim_fail_hits(KSHIM_FAIL_CLONE_BIO) > 0 &&
	    kshim_fail_hits(KSHIM_FAIL_COPYOUT) > 0, "no failure injected");
	pthread_mutex_lock(&in.eng.mtx);
	CHECK(in.eng.nfault > 0, "no UPCALL saw a copyout fault");
	pthread_mutex_unlock(&in.eng.mtx);
	kshim_fail_clear();
	fprintf(stderr, "kshim_test: %s: %ju client requests, %ju and "
	    "%ju allocation failures injected\n", scenario, (uintmax_t)total,
	    (uintmax_t)kshim_fail_hits(KSHIM_FAIL_MALLOC_NOWAIT),
	    (uintmax_t)kshim_fail_hits(KSHIM_FAIL_CLONE_BIO));
	if (mode == STRESS_ORPHAN) {
		/* The peer has it all: a read comes from there. */
		CHECK0(down(in.fp, in.unit, HAST_DOWN_LINK, 0, 0,
		    HAST_LINK_UP));
		pattern(w, 4 * KIB, 0, 77);
		CHECK0(cio_sync(in.client, KSHIM_BIO_WRITE, 0, 4 * KIB, w));
		memset(w, 0, 4 * KIB);
		CHECK0(cio_sync(in.client, KSHIM_BIO_READ, 0, 4 * KIB, w));
		pthread_mutex_lock(&in.eng.mtx);
		CHECK(memcmp(w, in.eng.peer, 4 * KIB) == 0, "peer read");
		pthread_mutex_unlock(&in.eng.mtx);
		free(w);
		inst_teardown(&in);
		return;
	}

	/* A flush of both sides, then compare what the map calls clean. */
	CHECK0(down(in.fp, in.unit, HAST_DOWN_LINK, 0, 0, HAST_LINK_UP));
	CHECK0(cio_sync(in.client, KSHIM_BIO_FLUSH, 0, 0, NULL));
	CHECK0(map_op(in.fp, in.unit, HAST_MAPOP_GET, HAST_MAP_DIRTY, map,
	    sizeof(map)));
	local = malloc(DATASIZE);
	CHECK(local != NULL, "malloc");
	read_file(in.path, LOCALOFF, local, DATASIZE);
	differ = 0;
	for (e = 0; e < DATASIZE / EXTENT; e++) {
		if (map[e / 8] & (1 << (e % 8)))
			continue;
		pthread_mutex_lock(&in.eng.mtx);
		if (memcmp(local + e * EXTENT, in.eng.peer + e * EXTENT,
		    EXTENT) != 0)
			differ++;
		pthread_mutex_unlock(&in.eng.mtx);
	}
	CHECK(differ == 0, "%d clean extent(s) differ between the copies",
	    differ);
	free(local);
	free(w);
	inst_teardown(&in);
}

static void
t_stress(void)
{

	stress_run(0);
}

/* Destroy while the engine's requests are all still going. */
static void
t_destroy_stress(void)
{

	stress_run(STRESS_DESTROY);
}

/* The same with the local disk pulled out halfway. */
static void
t_orphan_stress(void)
{

	stress_run(STRESS_ORPHAN);
}

static void
usage(void)
{

	fprintf(stderr, "usage: kshim_test DIR [basic|enomem|orphan|destroy|"
	    "unload|copyout|stress|orphanstress|destroystress]...\n");
	exit(2);
}

int
main(int argc, char **argv)
{
	static const struct {
		const char	*name;
		void		(*fn)(void);
	} tests[] = {
		{ "basic", t_basic },
		{ "enomem", t_enomem },
		{ "orphan", t_orphan },
		{ "destroy", t_destroy },
		{ "unload", t_unload },
		{ "copyout", t_copyout },
		{ "stress", t_stress },
		{ "orphanstress", t_orphan_stress },
		{ "destroystress", t_destroy_stress },
	};
	size_t i;
	int a, ran;

	if (argc < 2)
		usage();
	dir = argv[1];
	CHECK0(kshim_load());
	for (i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
		ran = 0;
		for (a = 2; a < argc; a++)
			if (strcmp(argv[a], tests[i].name) == 0)
				ran = 1;
		if (argc > 2 && !ran)
			continue;
		scenario = tests[i].name;
		fprintf(stderr, "kshim_test: %s\n", scenario);
		tests[i].fn();
		fprintf(stderr, "kshim_test: %s ok\n", scenario);
	}
	scenario = "final unload";
	final_unload();
	fprintf(stderr, "kshim_test: all passed\n");
	return (0);
}
