/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * kshim_kern.h: the kernel interfaces the geom_hast module uses, as the
 * userland kernel shim implements them (tests only).  Written from the
 * FreeBSD manual pages (mutex(9), msleep(9), malloc(9), copy(9),
 * make_dev(9), devfs_set_cdevpriv(9), DECLARE_MODULE(9), g_bio(9),
 * g_access(9), g_attach(9), g_consumer(9), g_event(9), g_geom(9),
 * g_provider(9), g_data(9)) with constants and field names that match
 * FreeBSD's headers.
 *
 * Two kinds of translation unit include it:
 *  - the module (kmod/g_hast.c, kmod/hast_core.c), compiled freestanding
 *    with include/ first in the path, whose <sys/...> and <geom/geom.h>
 *    headers all lead here: every type comes from this file;
 *  - the shim's own sources, which define KSHIM_HOST and use the C
 *    library: types the C library defines are taken from it.
 *
 * Every check a debugging kernel makes is on (INVARIANTS, WITNESS): a
 * failed KASSERT, a lock order reversal, a sleep with a mutex held or in
 * a GEOM thread, a bad access count or a bio freed twice panics, which
 * here prints the reason and aborts the process.
 */

#ifndef _KSHIM_KERN_H_
#define	_KSHIM_KERN_H_

#ifdef KSHIM_HOST
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#else
/*
 * The module is built freestanding for __FreeBSD__: the compiler's
 * <stddef.h> would then look for FreeBSD's <sys/_types.h>, so the few
 * things it gives come from the compiler's built-ins.
 */
#include <stdint.h>
typedef	__SIZE_TYPE__		size_t;
typedef	__PTRDIFF_TYPE__	ptrdiff_t;
typedef	__builtin_va_list	va_list;
#define	va_start(ap, last)	__builtin_va_start((ap), (last))
#define	va_arg(ap, type)	__builtin_va_arg((ap), type)
#define	va_end(ap)		__builtin_va_end((ap))
#define	offsetof(type, field)	__builtin_offsetof(type, field)
#endif

/*
 * Basic types.
 */
#ifndef KSHIM_HOST
typedef	unsigned char	u_char;
typedef	unsigned short	u_short;
typedef	unsigned int	u_int;
typedef	unsigned long	u_long;
typedef	int64_t		off_t;
typedef	int64_t		time_t;
typedef	int64_t		daddr_t;
typedef	uint32_t	uid_t;
typedef	uint32_t	gid_t;
typedef	char		*caddr_t;
typedef	long		ssize_t;

struct timespec {
	time_t	tv_sec;
	long	tv_nsec;
};

/* The C library functions the kernel has too (libkern, subr_prf). */
void	*memcpy(void *, const void *, size_t);
void	*memset(void *, int, size_t);
int	memcmp(const void *, const void *, size_t);
size_t	strlen(const char *);
size_t	strnlen(const char *, size_t);
int	strcmp(const char *, const char *);
int	strncmp(const char *, const char *, size_t);
int	snprintf(char *, size_t, const char *, ...)
	    __attribute__((__format__(__printf__, 3, 4)));
#define	bzero(p, n)	memset((p), 0, (n))
#define	bcopy(s, d, n)	memcpy((d), (s), (n))
#endif	/* !KSHIM_HOST */

#ifndef NULL
#define	NULL	((void *)0)
#endif

#define	__unused		__attribute__((__unused__))
#define	__printflike(f, a)	__attribute__((__format__(__printf__, f, a)))
#define	__predict_true(e)	__builtin_expect((e), 1)
#define	__predict_false(e)	__builtin_expect((e), 0)
#define	__DECONST(type, var)	((type)(uintptr_t)(const void *)(var))
#define	__DEVOLATILE(type, var)	((type)(uintptr_t)(volatile void *)(var))
#define	nitems(x)		(sizeof((x)) / sizeof((x)[0]))
#ifndef powerof2
#define	powerof2(x)		((((x) - 1) & (x)) == 0)
#endif
#ifndef MIN
#define	MIN(a, b)		(((a) < (b)) ? (a) : (b))
#define	MAX(a, b)		(((a) > (b)) ? (a) : (b))
#endif

#define	DEV_BSHIFT	9
#define	DEV_BSIZE	(1 << DEV_BSHIFT)
/* FreeBSD 13's MAXPHYS: the largest bio a client sends (g_dev splits). */
#define	MAXPHYS		(1024 * 1024)
#define	OFF_MAX		INT64_MAX
#define	OFF_MIN		INT64_MIN

/* open(2) flags as the kernel sees them (sys/fcntl.h). */
#define	FREAD		0x0001
#define	FWRITE		0x0002

/*
 * Error numbers: the kernel's own (FreeBSD's values); the shim translates
 * at its edges (kshim_errno_to_host, kshim_errno_from_host).
 */
#ifndef KSHIM_HOST
#define	EPERM		1
#define	ENOENT		2
#define	ESRCH		3
#define	EINTR		4
#define	EIO		5
#define	ENXIO		6
#define	E2BIG		7
#define	EBADF		9
#define	EDEADLK		11
#define	ENOMEM		12
#define	EACCES		13
#define	EFAULT		14
#define	EBUSY		16
#define	EEXIST		17
#define	ENODEV		19
#define	EINVAL		22
#define	ENOTTY		25
#define	EFBIG		27
#define	ENOSPC		28
#define	EROFS		30
#define	ERANGE		34
#define	EAGAIN		35
#define	EWOULDBLOCK	EAGAIN
#define	EPROTONOSUPPORT	43
#define	EOPNOTSUPP	45
#define	ENOTSUP		EOPNOTSUPP
#define	ETIMEDOUT	60
#define	ENOSYS		78
#define	ERESTART	(-1)
#define	EJUSTRETURN	(-2)
#define	ENOIOCTL	(-3)
#endif	/* !KSHIM_HOST */

/* Kernel errno values the shim's host-side code needs by name. */
#define	KERR_EPERM		1
#define	KERR_ENOENT		2
#define	KERR_EINTR		4
#define	KERR_EIO		5
#define	KERR_ENXIO		6
#define	KERR_EBADF		9
#define	KERR_ENOMEM		12
#define	KERR_EFAULT		14
#define	KERR_EBUSY		16
#define	KERR_EEXIST		17
#define	KERR_EINVAL		22
#define	KERR_ENOTTY		25
#define	KERR_EAGAIN		35
#define	KERR_EWOULDBLOCK	KERR_EAGAIN
#define	KERR_EOPNOTSUPP		45
#define	KERR_ERESTART		(-1)
#define	KERR_EJUSTRETURN	(-2)

int	kshim_errno_to_host(int kerr);
int	kshim_errno_from_host(int herr);

/*
 * sys/queue.h: singly and doubly linked lists and tail queues.
 */
#define	LIST_HEAD(name, type)						\
struct name {								\
	struct type *lh_first;						\
}
#define	LIST_HEAD_INITIALIZER(head)	{ NULL }
#define	LIST_ENTRY(type)						\
struct {								\
	struct type *le_next;						\
	struct type **le_prev;						\
}
#define	LIST_FIRST(head)	((head)->lh_first)
#define	LIST_EMPTY(head)	((head)->lh_first == NULL)
#define	LIST_NEXT(elm, field)	((elm)->field.le_next)
#define	LIST_INIT(head)		do { LIST_FIRST((head)) = NULL; } while (0)
#define	LIST_INSERT_HEAD(head, elm, field) do {				\
	if ((LIST_NEXT((elm), field) = LIST_FIRST((head))) != NULL)	\
		LIST_FIRST((head))->field.le_prev =			\
		    &LIST_NEXT((elm), field);				\
	LIST_FIRST((head)) = (elm);					\
	(elm)->field.le_prev = &LIST_FIRST((head));			\
} while (0)
#define	LIST_REMOVE(elm, field) do {					\
	if (LIST_NEXT((elm), field) != NULL)				\
		LIST_NEXT((elm), field)->field.le_prev =		\
		    (elm)->field.le_prev;				\
	*(elm)->field.le_prev = LIST_NEXT((elm), field);		\
	(elm)->field.le_next = (void *)-1;				\
	(elm)->field.le_prev = (void *)-1;				\
} while (0)
#define	LIST_FOREACH(var, head, field)					\
	for ((var) = LIST_FIRST((head)); (var);				\
	    (var) = LIST_NEXT((var), field))
#define	LIST_FOREACH_SAFE(var, head, field, tvar)			\
	for ((var) = LIST_FIRST((head));				\
	    (var) && ((tvar) = LIST_NEXT((var), field), 1);		\
	    (var) = (tvar))

#define	TAILQ_HEAD(name, type)						\
struct name {								\
	struct type *tqh_first;						\
	struct type **tqh_last;						\
}
#define	TAILQ_HEAD_INITIALIZER(head)	{ NULL, &(head).tqh_first }
#define	TAILQ_ENTRY(type)						\
struct {								\
	struct type *tqe_next;						\
	struct type **tqe_prev;						\
}
#define	TAILQ_FIRST(head)	((head)->tqh_first)
#define	TAILQ_EMPTY(head)	((head)->tqh_first == NULL)
#define	TAILQ_NEXT(elm, field)	((elm)->field.tqe_next)
#define	TAILQ_INIT(head) do {						\
	TAILQ_FIRST((head)) = NULL;					\
	(head)->tqh_last = &TAILQ_FIRST((head));			\
} while (0)
#define	TAILQ_INSERT_HEAD(head, elm, field) do {			\
	if ((TAILQ_NEXT((elm), field) = TAILQ_FIRST((head))) != NULL)	\
		TAILQ_FIRST((head))->field.tqe_prev =			\
		    &TAILQ_NEXT((elm), field);				\
	else								\
		(head)->tqh_last = &TAILQ_NEXT((elm), field);		\
	TAILQ_FIRST((head)) = (elm);					\
	(elm)->field.tqe_prev = &TAILQ_FIRST((head));			\
} while (0)
#define	TAILQ_INSERT_TAIL(head, elm, field) do {			\
	TAILQ_NEXT((elm), field) = NULL;				\
	(elm)->field.tqe_prev = (head)->tqh_last;			\
	*(head)->tqh_last = (elm);					\
	(head)->tqh_last = &TAILQ_NEXT((elm), field);			\
} while (0)
#define	TAILQ_REMOVE(head, elm, field) do {				\
	if ((TAILQ_NEXT((elm), field)) != NULL)				\
		TAILQ_NEXT((elm), field)->field.tqe_prev =		\
		    (elm)->field.tqe_prev;				\
	else								\
		(head)->tqh_last = (elm)->field.tqe_prev;		\
	*(elm)->field.tqe_prev = TAILQ_NEXT((elm), field);		\
	(elm)->field.tqe_next = (void *)-1;				\
	(elm)->field.tqe_prev = (void *)-1;				\
} while (0)
#define	TAILQ_FOREACH(var, head, field)					\
	for ((var) = TAILQ_FIRST((head)); (var);			\
	    (var) = TAILQ_NEXT((var), field))
#define	TAILQ_FOREACH_SAFE(var, head, field, tvar)			\
	for ((var) = TAILQ_FIRST((head));				\
	    (var) && ((tvar) = TAILQ_NEXT((var), field), 1);		\
	    (var) = (tvar))

/*
 * Panics and assertions (INVARIANTS is always on).
 */
void	panic(const char *fmt, ...) __printflike(1, 2)
	    __attribute__((__noreturn__));
void	kshim_kassert_panic(const char *fmt, ...) __printflike(1, 2)
	    __attribute__((__noreturn__));
#define	KASSERT(exp, msg) do {						\
	if (__predict_false(!(exp)))					\
		kshim_kassert_panic msg;				\
} while (0)
#define	MPASS(ex)	KASSERT((ex), ("Assertion %s failed at %s:%d",	\
			    #ex, __FILE__, __LINE__))
#define	CTASSERT(x)	_Static_assert(x, "compile-time assertion failed")

/* The console: the process's standard error, prefixed. */
int	kshim_printf(const char *fmt, ...) __printflike(1, 2);

/*
 * Threads.  Every host thread that enters the shim gets a struct thread
 * the first time.  td_no_sleeping > 0 in GEOM's g_up/g_down threads, the
 * event thread's callbacks and the disk's completion paths (what
 * THREAD_NO_SLEEPING marks in the kernel): a sleep there panics.
 */
struct file;
struct kshim_lock_instance;

#define	KSHIM_MAXHELD	16

struct kshim_held {
	struct kshim_lock_object *h_lock;
	const char	*h_file;
	int		 h_line;
};

struct thread {
	int		 td_pflags;	/* TDP_* */
	int		 td_no_sleeping;
	int		 td_sigpending;	/* interrupts a PCATCH sleep */
	int		 td_nheld;
	struct kshim_held td_held[KSHIM_MAXHELD];
	struct file	*td_fpop;	/* the file of the current ioctl */
	const char	*td_name;
	const char	*td_wmesg;	/* while sleeping */
	struct thread	*td_next;	/* all threads (kshim) */
};

#define	TDP_GEOM	0x00010000	/* settle GEOM before returning */

struct thread	*kshim_curthread(void);
#define	curthread	(kshim_curthread())
#define	THREAD_NO_SLEEPING()	(curthread->td_no_sleeping++)
#define	THREAD_SLEEPING_OK()	(curthread->td_no_sleeping--)

/*
 * Time: hz ticks a second; time_uptime in seconds since the shim started.
 */
extern int hz;
time_t	kshim_time_uptime(void);
#define	time_uptime	(kshim_time_uptime())
void	getnanouptime(struct timespec *ts);
void	nanouptime(struct timespec *ts);

/*
 * Locks: mutex(9) and the sx lock behind the GEOM topology lock, with a
 * WITNESS-like checker (lock order by name, recursion, ownership, sleeps
 * with a mutex held).
 */
struct kshim_lock_object {
	const char	*lo_name;
	int		 lo_class;	/* witness class index, -1: none yet */
	int		 lo_flags;	/* LO_* */
	uint32_t	 lo_magic;
};

#define	LO_SLEEPABLE	0x0001	/* sx: may be held across a sleep */
#define	LO_RECURSABLE	0x0002
#define	LO_DUPOK	0x0004
#define	LO_NOWITNESS	0x0008

struct mtx {
	struct kshim_lock_object lock_object;
	struct thread	*mtx_owner;
	int		 mtx_recurse;
	void		*mtx_impl;	/* pthread_mutex_t, allocated */
};

struct sx {
	struct kshim_lock_object lock_object;
	struct thread	*sx_owner;
	void		*sx_impl;
};

#define	MTX_DEF		0x00000000
#define	MTX_SPIN	0x00000001
#define	MTX_RECURSE	0x00000004
#define	MTX_NOWITNESS	0x00000008
#define	MTX_DUPOK	0x00000020

#define	MA_OWNED	0x01
#define	MA_NOTOWNED	0x02
#define	MA_RECURSED	0x04
#define	MA_NOTRECURSED	0x08

#define	SA_XLOCKED	0x01
#define	SA_UNLOCKED	0x02

void	mtx_init(struct mtx *m, const char *name, const char *type, int opts);
void	mtx_destroy(struct mtx *m);
void	_mtx_lock_flags(struct mtx *m, int opts, const char *file, int line);
void	_mtx_unlock_flags(struct mtx *m, int opts, const char *file, int line);
int	mtx_owned(struct mtx *m);
void	_mtx_assert(struct mtx *m, int what, const char *file, int line);
#define	mtx_lock(m)	_mtx_lock_flags((m), 0, __FILE__, __LINE__)
#define	mtx_unlock(m)	_mtx_unlock_flags((m), 0, __FILE__, __LINE__)
#define	mtx_assert(m, what)	_mtx_assert((m), (what), __FILE__, __LINE__)

void	sx_init(struct sx *sx, const char *name);
void	sx_destroy(struct sx *sx);
void	_sx_xlock(struct sx *sx, const char *file, int line);
void	_sx_xunlock(struct sx *sx, const char *file, int line);
void	_sx_assert(struct sx *sx, int what, const char *file, int line);
int	sx_xlocked(struct sx *sx);
#define	sx_xlock(sx)	_sx_xlock((sx), __FILE__, __LINE__)
#define	sx_xunlock(sx)	_sx_xunlock((sx), __FILE__, __LINE__)
#define	sx_assert(sx, what)	_sx_assert((sx), (what), __FILE__, __LINE__)

/*
 * WITNESS_WARN(WARN_SLEEPOK): about to sleep; panics if a mutex other
 * than `interlock` is held or the thread must not sleep.  What is the
 * operation, for the message.
 */
void	kshim_witness_sleep(const char *what, struct kshim_lock_object *interlock,
	    const char *file, int line);
#define	WITNESS_SLEEP(what, il)						\
	kshim_witness_sleep((what), (il), __FILE__, __LINE__)

/*
 * Sleeping: msleep(9), wakeup(9), pause(9).
 */
#define	PRIBIO		(88)
#define	PZERO		(96)
#define	PPAUSE		(100)
#define	PCATCH		0x100
#define	PDROP		0x200

int	_msleep(void *chan, struct kshim_lock_object *lock, int pri,
	    const char *wmesg, int timo, const char *file, int line);
#define	msleep(chan, m, pri, wmesg, timo)				\
	_msleep((chan), ((m) == NULL ? NULL :				\
	    &((struct mtx *)(m))->lock_object), (pri), (wmesg), (timo),	\
	    __FILE__, __LINE__)
#define	tsleep(chan, pri, wmesg, timo)					\
	_msleep((chan), NULL, (pri), (wmesg), (timo), __FILE__, __LINE__)
int	_sx_sleep(void *chan, struct sx *sx, int pri, const char *wmesg,
	    int timo, const char *file, int line);
#define	sx_sleep(chan, sx, pri, wmesg, timo)				\
	_sx_sleep((chan), (sx), (pri), (wmesg), (timo), __FILE__, __LINE__)
void	wakeup(void *chan);
void	wakeup_one(void *chan);
int	_pause_sig(const char *wmesg, int timo, const char *file, int line);
#define	pause_sig(wmesg, timo)	_pause_sig((wmesg), (timo), __FILE__, __LINE__)
#ifndef KSHIM_HOST	/* the C library has a pause(3) */
#define	pause(wmesg, timo)	((void)_pause_sig((wmesg), (timo),	\
				    __FILE__, __LINE__))
#endif

/*
 * malloc(9).  M_NOWAIT allocations fail when the fail point says so;
 * M_WAITOK ones sleep-check and never fail.  Every type counts what is
 * outstanding: a module's types must be empty when it unloads.
 */
struct malloc_type {
	const char	*ks_shortdesc;
	const char	*ks_longdesc;
	int64_t		 ks_inuse;	/* allocations outstanding */
	int64_t		 ks_memuse;	/* bytes outstanding */
	int64_t		 ks_calls;
	int64_t		 ks_failed;	/* M_NOWAIT failures injected */
	struct malloc_type *ks_next;
	int		 ks_registered;
};

#define	M_NOWAIT	0x0001
#define	M_WAITOK	0x0002
#define	M_ZERO		0x0100

void	kshim_malloc_register(struct malloc_type *type);
void	*kshim_malloc(size_t size, struct malloc_type *type, int flags,
	    const char *file, int line);
void	kshim_free(void *addr, struct malloc_type *type, const char *file,
	    int line);

#define	MALLOC_DEFINE(type, shortdesc, longdesc)			\
	struct malloc_type type[1] = {					\
		{ .ks_shortdesc = (shortdesc), .ks_longdesc = (longdesc) } \
	};								\
	static void __attribute__((__constructor__))			\
	type##_kshim_register(void)					\
	{								\
		kshim_malloc_register(type);				\
	}
#define	MALLOC_DECLARE(type)	extern struct malloc_type type[1]

/*
 * copy(9): user addresses are plain pointers in this process; a fault
 * (address 0, or injected) is EFAULT.  Both may sleep.
 */
int	_copyin(const void *uaddr, void *kaddr, size_t len, const char *file,
	    int line);
int	_copyout(const void *kaddr, void *uaddr, size_t len, const char *file,
	    int line);
#define	copyin(u, k, l)		_copyin((u), (k), (l), __FILE__, __LINE__)
#define	copyout(k, u, l)	_copyout((k), (u), (l), __FILE__, __LINE__)

/*
 * Character devices: make_dev(9), destroy_dev(9), devfs_set_cdevpriv(9).
 */
struct cdev;
typedef int d_open_t(struct cdev *dev, int oflags, int devtype,
    struct thread *td);
typedef int d_close_t(struct cdev *dev, int fflag, int devtype,
    struct thread *td);
typedef int d_ioctl_t(struct cdev *dev, u_long cmd, caddr_t data,
    int fflag, struct thread *td);
typedef void d_priv_dtor_t(void *data);

#define	D_VERSION	0x5c48c353

struct cdevsw {
	int		 d_version;
	u_int		 d_flags;
	const char	*d_name;
	d_open_t	*d_open;
	d_close_t	*d_close;
	d_ioctl_t	*d_ioctl;
};

#define	UID_ROOT	0
#define	GID_WHEEL	0

struct cdev *make_dev(struct cdevsw *devsw, int unit, uid_t uid, gid_t gid,
    int perms, const char *fmt, ...) __printflike(6, 7);
void	destroy_dev(struct cdev *dev);
int	devfs_set_cdevpriv(void *priv, d_priv_dtor_t *dtr);
int	devfs_get_cdevpriv(void **datap);
void	devfs_clear_cdevpriv(void);

/*
 * ioctl command encoding (sys/ioccom.h).
 */
#define	IOCPARM_SHIFT	13
#define	IOCPARM_MASK	((1 << IOCPARM_SHIFT) - 1)
#define	IOCPARM_LEN(x)	(((x) >> 16) & IOCPARM_MASK)
#define	IOCPARM_MAX	(1 << IOCPARM_SHIFT)
#define	IOC_VOID	0x20000000UL
#define	IOC_OUT		0x40000000UL
#define	IOC_IN		0x80000000UL
#define	IOC_INOUT	(IOC_IN | IOC_OUT)
#define	_IOC(inout, group, num, len)	((unsigned long)		\
	((inout) | (((len) & IOCPARM_MASK) << 16) | ((group) << 8) | (num)))
#define	_IO(g, n)		_IOC(IOC_VOID, (g), (n), 0)
#define	_IOR(g, n, t)		_IOC(IOC_OUT, (g), (n), sizeof(t))
#define	_IOW(g, n, t)		_IOC(IOC_IN, (g), (n), sizeof(t))
#define	_IOWR(g, n, t)		_IOC(IOC_INOUT, (g), (n), sizeof(t))

/*
 * Modules: DECLARE_MODULE(9).  Registration happens when the program
 * starts (as the linker's SYSINITs are found when a file is loaded);
 * kshim_load() then runs every module's MOD_LOAD in SYSINIT order.
 */
struct module;
typedef struct module *module_t;
typedef int (*modeventhand_t)(module_t, int, void *);
typedef struct moduledata {
	const char	*name;
	modeventhand_t	 evhand;
	void		*priv;
} moduledata_t;

enum modeventtype {
	MOD_LOAD,
	MOD_UNLOAD,
	MOD_SHUTDOWN,
	MOD_QUIESCE
};

#define	SI_SUB_DRIVERS		0x3100000
#define	SI_ORDER_FIRST		0x0000000
#define	SI_ORDER_SECOND		0x0000001
#define	SI_ORDER_MIDDLE		0x1000000
#define	SI_ORDER_ANY		0xfffffff

void	kshim_module_register(moduledata_t *data, int sub, int order);
#define	DECLARE_MODULE(name, data, sub, order)				\
	static void __attribute__((__constructor__))			\
	name##_kshim_modreg(void)					\
	{								\
		kshim_module_register(&(data), (sub), (order));		\
	}
#define	MODULE_VERSION(module, version)					\
	static const int module##_kshim_version __unused = (version)
#define	MODULE_DEPEND(module, mdepend, vmin, vpref, vmax)		\
	static const int module##_##mdepend##_kshim_dep __unused = (vpref)

/*
 * sbuf(9), only what dumpconf needs.
 */
struct sbuf;
int	sbuf_printf(struct sbuf *s, const char *fmt, ...) __printflike(2, 3);
int	sbuf_cat(struct sbuf *s, const char *str);

/*
 * GEOM: bios, classes, geoms, providers, consumers, events.
 */
#define	BIO_READ	0x01
#define	BIO_WRITE	0x02
#define	BIO_DELETE	0x03
#define	BIO_GETATTR	0x04
#define	BIO_FLUSH	0x05
#define	BIO_SPEEDUP	0x0a

#define	BIO_ERROR	0x01
#define	BIO_DONE	0x02
#define	BIO_ONQUEUE	0x04
#define	BIO_ORDERED	0x08

struct bio;
typedef void bio_done_t(struct bio *);

struct bio {
	uint16_t	 bio_cmd;
	uint16_t	 bio_flags;
	uint16_t	 bio_cflags;
	uint16_t	 bio_pflags;
	off_t		 bio_offset;
	long		 bio_bcount;
	caddr_t		 bio_data;
	int		 bio_error;
	long		 bio_resid;
	bio_done_t	*bio_done;
	void		*bio_driver1;
	void		*bio_driver2;
	void		*bio_caller1;
	void		*bio_caller2;
	TAILQ_ENTRY(bio) bio_queue;
	const char	*bio_attribute;
	struct g_consumer *bio_from;
	struct g_provider *bio_to;
	off_t		 bio_length;
	off_t		 bio_completed;
	u_int		 bio_children;
	u_int		 bio_inbed;
	struct bio	*bio_parent;
	/* The shim's bookkeeping (what the bio zone knows). */
	uint32_t	 bio_kshim_magic;
	uint32_t	 bio_kshim_state;	/* KSHIM_BIO_* */
	uint64_t	 bio_kshim_serial;
	TAILQ_ENTRY(bio) bio_kshim_all;
};

struct g_class;
struct g_geom;
struct g_consumer;
struct g_provider;

typedef struct g_geom *g_taste_t(struct g_class *, struct g_provider *,
    int flags);
typedef void g_init_t(struct g_class *mp);
typedef void g_fini_t(struct g_class *mp);
typedef int g_ctl_destroy_geom_t(void *req, struct g_class *mp,
    struct g_geom *gp);
typedef int g_access_t(struct g_provider *, int, int, int);
typedef void g_orphan_t(struct g_consumer *);
typedef void g_start_t(struct bio *);
typedef void g_spoiled_t(struct g_consumer *);
typedef void g_dumpconf_t(struct sbuf *, const char *indent,
    struct g_geom *, struct g_consumer *, struct g_provider *);
typedef void g_provgone_t(struct g_provider *);
typedef void g_event_t(void *, int flag);

#define	G_VERSION	0x20041207

struct g_class {
	const char		*name;
	u_int			 version;
	u_int			 spare0;
	g_taste_t		*taste;
	void			*config;
	void			*ctlreq;
	g_init_t		*init;
	g_fini_t		*fini;
	g_ctl_destroy_geom_t	*destroy_geom;
	g_start_t		*start;
	g_spoiled_t		*spoiled;
	void			*attrchanged;
	g_dumpconf_t		*dumpconf;
	g_access_t		*access;
	g_orphan_t		*orphan;
	void			*ioctl;
	g_provgone_t		*providergone;
	void			*resize;
	LIST_ENTRY(g_class)	 class;
	LIST_HEAD(, g_geom)	 geom;
};

struct g_geom {
	char			*name;
	struct g_class		*class;
	LIST_ENTRY(g_geom)	 geom;
	LIST_HEAD(, g_consumer)	 consumer;
	LIST_HEAD(, g_provider)	 provider;
	g_start_t		*start;
	g_spoiled_t		*spoiled;
	g_dumpconf_t		*dumpconf;
	g_access_t		*access;
	g_orphan_t		*orphan;
	g_provgone_t		*providergone;
	void			*softc;
	unsigned		 flags;
};
#define	G_GEOM_WITHER		0x01
#define	G_GEOM_IN_ACCESS	0x04

struct g_consumer {
	struct g_geom		*geom;
	LIST_ENTRY(g_consumer)	 consumer;
	struct g_provider	*provider;
	LIST_ENTRY(g_consumer)	 consumers;
	int			 acr, acw, ace;
	int			 flags;
	u_int			 nstart, nend;	/* under the bio lock */
	void			*private;
	u_int			 index;
};
#define	G_CF_SPOILED	0x1
#define	G_CF_ORPHAN	0x4

struct g_provider {
	char			*name;
	LIST_ENTRY(g_provider)	 provider;
	struct g_geom		*geom;
	LIST_HEAD(, g_consumer)	 consumers;
	int			 acr, acw, ace;
	int			 error;
	TAILQ_ENTRY(g_provider)	 orphan;
	off_t			 mediasize;
	u_int			 sectorsize;
	off_t			 stripesize;
	off_t			 stripeoffset;
	u_int			 flags;
	u_int			 nstart, nend;	/* under the bio lock */
	void			*private;
	u_int			 index;
};
#define	G_PF_WITHER	0x2
#define	G_PF_ORPHAN	0x4

#define	EV_CANCEL	1

void	g_topology_lock(void);
void	g_topology_unlock(void);
void	_g_topology_assert(int what, const char *file, int line);
void	g_topology_sleep(void *chan, int timo);
#define	g_topology_assert()	_g_topology_assert(SA_XLOCKED, __FILE__, __LINE__)
#define	g_topology_assert_not()	_g_topology_assert(SA_UNLOCKED, __FILE__, __LINE__)

int	g_post_event(g_event_t *func, void *arg, int flag, ...);
int	g_waitfor_event(g_event_t *func, void *arg, int flag, ...);
void	g_cancel_event(void *ref);
void	g_waitidle(void);

struct g_geom *g_new_geomf(struct g_class *mp, const char *fmt, ...)
	    __printflike(2, 3);
void	g_destroy_geom(struct g_geom *gp);
void	g_wither_geom(struct g_geom *gp, int error);
struct g_consumer *g_new_consumer(struct g_geom *gp);
void	g_destroy_consumer(struct g_consumer *cp);
int	g_attach(struct g_consumer *cp, struct g_provider *pp);
void	g_detach(struct g_consumer *cp);
int	g_access(struct g_consumer *cp, int dcr, int dcw, int dce);
struct g_provider *g_new_providerf(struct g_geom *gp, const char *fmt, ...)
	    __printflike(2, 3);
void	g_destroy_provider(struct g_provider *pp);
void	g_error_provider(struct g_provider *pp, int error);
void	g_orphan_provider(struct g_provider *pp, int error);
struct g_provider *g_provider_by_name(const char *name);
int	g_modevent(module_t mod, int type, void *data);

struct bio *g_new_bio(void);
struct bio *g_alloc_bio(void);
struct bio *g_clone_bio(struct bio *bp);
struct bio *g_duplicate_bio(struct bio *bp);
void	g_destroy_bio(struct bio *bp);
void	g_reset_bio(struct bio *bp);
void	g_io_request(struct bio *bp, struct g_consumer *cp);
void	g_io_deliver(struct bio *bp, int error);
void	g_std_done(struct bio *bp);
int	g_handleattr(struct bio *bp, const char *attribute, const void *val,
	    int len);
int	g_handleattr_int(struct bio *bp, const char *attribute, int val);
void	biodone(struct bio *bp);

#define	DECLARE_GEOM_CLASS(class, name)					\
	static moduledata_t name##_mod = {				\
		#name, g_modevent, &class				\
	};								\
	DECLARE_MODULE(name, name##_mod, SI_SUB_DRIVERS, SI_ORDER_SECOND)

#endif	/* !_KSHIM_KERN_H_ */
