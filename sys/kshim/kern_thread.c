/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * kern_thread.c: threads (curthread), time (hz, time_uptime,
 * getnanouptime), the console and panic, error number translation at the
 * shim's edge, and fault injection.
 */

#include "kshim_impl.h"

#include <stdarg.h>
#include <unistd.h>

int hz = 1000;

static pthread_once_t kshim_base_once = PTHREAD_ONCE_INIT;
static pthread_once_t kshim_geom_once = PTHREAD_ONCE_INIT;
static struct timespec kshim_boot;
static pthread_key_t kshim_td_key;
static __thread struct thread *kshim_td;

/* Every live thread, for kshim_interrupt(). */
static pthread_mutex_t kshim_td_mtx = PTHREAD_MUTEX_INITIALIZER;
static struct thread *kshim_threads;

void
kshim_pthread_check(int error, const char *what)
{

	if (error != 0)
		panic("kshim: %s failed: %s", what, strerror(error));
}

static void
kshim_td_dtor(void *arg)
{
	struct thread *td, **tdp;

	td = arg;
	if (td->td_nheld != 0)
		panic("thread %s exiting with %d lock(s) held, first %s "
		    "locked at %s:%d", td->td_name != NULL ? td->td_name : "?",
		    td->td_nheld, td->td_held[0].h_lock->lo_name,
		    td->td_held[0].h_file, td->td_held[0].h_line);
	pthread_mutex_lock(&kshim_td_mtx);
	for (tdp = &kshim_threads; *tdp != NULL; tdp = &(*tdp)->td_next) {
		if (*tdp == td) {
			*tdp = td->td_next;
			break;
		}
	}
	pthread_mutex_unlock(&kshim_td_mtx);
	free(td);
}

static void
kshim_base_init(void)
{

	clock_gettime(CLOCK_MONOTONIC, &kshim_boot);
	kshim_pthread_check(pthread_key_create(&kshim_td_key, kshim_td_dtor),
	    "pthread_key_create");
}

/* The clock and thread key first, then GEOM's threads and classes. */
void
kshim_init(void)
{

	pthread_once(&kshim_base_once, kshim_base_init);
	pthread_once(&kshim_geom_once, kshim_geom_start_threads);
}

struct thread *
kshim_curthread(void)
{
	struct thread *td;

	td = kshim_td;
	if (td != NULL)
		return (td);
	td = calloc(1, sizeof(*td));
	if (td == NULL)
		panic("kshim: no memory for a thread");
	td->td_name = "user";
	kshim_td = td;
	pthread_once(&kshim_base_once, kshim_base_init);
	(void)pthread_setspecific(kshim_td_key, td);
	pthread_mutex_lock(&kshim_td_mtx);
	td->td_next = kshim_threads;
	kshim_threads = td;
	pthread_mutex_unlock(&kshim_td_mtx);
	return (td);
}

/*
 * Time.
 */
static void
kshim_uptime(struct timespec *ts)
{
	struct timespec now;

	pthread_once(&kshim_base_once, kshim_base_init);
	clock_gettime(CLOCK_MONOTONIC, &now);
	ts->tv_sec = now.tv_sec - kshim_boot.tv_sec;
	ts->tv_nsec = now.tv_nsec - kshim_boot.tv_nsec;
	if (ts->tv_nsec < 0) {
		ts->tv_sec--;
		ts->tv_nsec += 1000000000;
	}
}

time_t
kshim_time_uptime(void)
{
	struct timespec ts;

	kshim_uptime(&ts);
	/* As the kernel's time_uptime: at least 1. */
	return (ts.tv_sec + 1);
}

void
getnanouptime(struct timespec *ts)
{

	kshim_uptime(ts);
}

void
nanouptime(struct timespec *ts)
{

	kshim_uptime(ts);
}

/*
 * The console and panic.
 */
static pthread_mutex_t kshim_cons_mtx = PTHREAD_MUTEX_INITIALIZER;

int
kshim_printf(const char *fmt, ...)
{
	va_list ap;
	int n;

	pthread_mutex_lock(&kshim_cons_mtx);
	fputs("kernel: ", stderr);
	va_start(ap, fmt);
	n = vfprintf(stderr, fmt, ap);
	va_end(ap);
	fflush(stderr);
	pthread_mutex_unlock(&kshim_cons_mtx);
	return (n);
}

static void __attribute__((__noreturn__))
kshim_vpanic(const char *fmt, va_list ap)
{
	char msg[1024];
	struct thread *td;

	vsnprintf(msg, sizeof(msg), fmt, ap);
	td = kshim_td;
	fprintf(stderr, "panic: %s\n", msg);
	if (td != NULL && td->td_nheld > 0) {
		int i;

		fprintf(stderr, "locks held by the panicking thread (%s):\n",
		    td->td_name != NULL ? td->td_name : "?");
		for (i = td->td_nheld - 1; i >= 0; i--)
			fprintf(stderr, "  %s locked at %s:%d\n",
			    td->td_held[i].h_lock->lo_name,
			    td->td_held[i].h_file, td->td_held[i].h_line);
	}
	fflush(stderr);
	abort();
}

void
panic(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	kshim_vpanic(fmt, ap);
}

void
kshim_kassert_panic(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	kshim_vpanic(fmt, ap);
}

void
kshim_bufcat(char *buf, size_t len, const char *fmt, ...)
{
	va_list ap;
	size_t used;

	if (len == 0)
		return;
	used = strnlen(buf, len);
	if (used >= len - 1)
		return;
	va_start(ap, fmt);
	vsnprintf(buf + used, len - used, fmt, ap);
	va_end(ap);
}

/*
 * Error numbers: the kernel's (FreeBSD's) against this host's.  Up to
 * ERANGE (34) they agree.
 */
static const struct {
	int	kern;
	int	host;
} kshim_errtab[] = {
	{ 11, EDEADLK },
	{ 35, EAGAIN },
	{ 36, EINPROGRESS },
	{ 37, EALREADY },
	{ 43, EPROTONOSUPPORT },
	{ 45, EOPNOTSUPP },
	{ 60, ETIMEDOUT },
	{ 78, ENOSYS },
};

int
kshim_errno_to_host(int kerr)
{
	size_t i;

	if (kerr == KERR_ERESTART)
		return (EINTR);
	if (kerr == KERR_EJUSTRETURN)
		return (0);
	for (i = 0; i < nitems(kshim_errtab); i++)
		if (kshim_errtab[i].kern == kerr)
			return (kshim_errtab[i].host);
	if (kerr >= 0 && kerr <= 34)
		return (kerr);
	return (EIO);
}

int
kshim_errno_from_host(int herr)
{
	size_t i;

	for (i = 0; i < nitems(kshim_errtab); i++)
		if (kshim_errtab[i].host == herr)
			return (kshim_errtab[i].kern);
	if (herr >= 0 && herr <= 34 && herr != EDEADLK)
		return (herr);
	return (KERR_EIO);
}

/*
 * Fault injection.
 */
struct kshim_fp {
	uint32_t	skip;
	uint32_t	count;
	uint32_t	rate;		/* per million */
	uint64_t	rng;
	uint64_t	hits;
};

static pthread_mutex_t kshim_fp_mtx = PTHREAD_MUTEX_INITIALIZER;
static struct kshim_fp kshim_fps[KSHIM_FAIL_NR];

void
kshim_fail_set(int which, uint32_t skip, uint32_t count)
{

	if (which < 0 || which >= KSHIM_FAIL_NR)
		return;
	pthread_mutex_lock(&kshim_fp_mtx);
	kshim_fps[which].skip = skip;
	kshim_fps[which].count = count;
	pthread_mutex_unlock(&kshim_fp_mtx);
}

void
kshim_fail_rate(int which, uint32_t per_million, uint64_t seed)
{

	if (which < 0 || which >= KSHIM_FAIL_NR)
		return;
	pthread_mutex_lock(&kshim_fp_mtx);
	kshim_fps[which].rate = per_million;
	kshim_fps[which].rng = seed != 0 ? seed : 0x9e3779b97f4a7c15ULL;
	pthread_mutex_unlock(&kshim_fp_mtx);
}

uint64_t
kshim_fail_hits(int which)
{
	uint64_t n;

	if (which < 0 || which >= KSHIM_FAIL_NR)
		return (0);
	pthread_mutex_lock(&kshim_fp_mtx);
	n = kshim_fps[which].hits;
	pthread_mutex_unlock(&kshim_fp_mtx);
	return (n);
}

void
kshim_fail_clear(void)
{
	int i;

	pthread_mutex_lock(&kshim_fp_mtx);
	for (i = 0; i < KSHIM_FAIL_NR; i++) {
		kshim_fps[i].skip = 0;
		kshim_fps[i].count = 0;
		kshim_fps[i].rate = 0;
	}
	pthread_mutex_unlock(&kshim_fp_mtx);
}

int
kshim_fail_check(int which)
{
	struct kshim_fp *fp;
	uint64_t x;
	int fail;

	fail = 0;
	pthread_mutex_lock(&kshim_fp_mtx);
	fp = &kshim_fps[which];
	if (fp->count > 0) {
		if (fp->skip > 0)
			fp->skip--;
		else {
			if (fp->count != UINT32_MAX)
				fp->count--;
			fail = 1;
		}
	}
	if (!fail && fp->rate > 0) {
		/* xorshift64 */
		x = fp->rng;
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		fp->rng = x;
		fail = (x % 1000000) < fp->rate;
	}
	if (fail)
		fp->hits++;
	pthread_mutex_unlock(&kshim_fp_mtx);
	return (fail);
}

/*
 * Signals: interrupt PCATCH sleeps (see kern_synch.c).
 */

int
kshim_interrupt(const char *wmesg)
{

	kshim_init();
	return (kshim_sleepq_interrupt(wmesg));
}

/*
 * Statistics and idle check.
 */
void
kshim_stats(struct kshim_stats *st)
{

	kshim_init();
	memset(st, 0, sizeof(*st));
	kshim_bio_counts(&st->ks_bios, &st->ks_bios_inflight);
	kshim_malloc_module_usage(&st->ks_module_allocs, &st->ks_module_bytes);
	kshim_geom_counts(&st->ks_events, &st->ks_geoms);
	st->ks_files = kshim_dev_files();
	st->ks_nowait_failed = (int64_t)kshim_fail_hits(
	    KSHIM_FAIL_MALLOC_NOWAIT);
	st->ks_lock_orders = kshim_witness_orders();
}

int
kshim_check_idle(char *buf, size_t len)
{
	struct kshim_stats st;
	int busy;

	kshim_stats(&st);
	if (len > 0)
		buf[0] = '\0';
	busy = 0;
	if (st.ks_bios != 0) {
		kshim_bufcat(buf, len, " %jd bio(s):", (intmax_t)st.ks_bios);
		kshim_bio_describe(buf, len);
		busy = 1;
	}
	if (st.ks_module_allocs != 0) {
		kshim_bufcat(buf, len, " module memory:");
		kshim_malloc_describe(buf, len);
		busy = 1;
	}
	if (st.ks_events != 0) {
		kshim_bufcat(buf, len, " %jd GEOM event(s)",
		    (intmax_t)st.ks_events);
		busy = 1;
	}
	if (st.ks_files != 0) {
		kshim_bufcat(buf, len, " %jd open device file(s)",
		    (intmax_t)st.ks_files);
		busy = 1;
	}
	if (kshim_client_count() != 0) {
		kshim_bufcat(buf, len, " %d client(s)", kshim_client_count());
		busy = 1;
	}
	if (kshim_geom_describe_nondisk(buf, len) != 0)
		busy = 1;
	return (busy ? EBUSY : 0);
}
