/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * kshim_impl.h: what the shim's own sources share (never included by the
 * module).  They are ordinary userland C: the C library and pthreads
 * underneath, the kernel interfaces of kshim_kern.h on top.
 */

#ifndef _KSHIM_IMPL_H_
#define	_KSHIM_IMPL_H_

#define	KSHIM_HOST	1

#include <sys/types.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kshim_kern.h"
#include "kshim_api.h"

/*
 * Fields GEOM reads without the topology lock (g_io_check on g_down) or
 * writes without it (g_orphan_provider from a driver): accessed atomically
 * so that a race detector sees no race in the shim itself.
 */
#define	KLOAD(x)	__atomic_load_n(&(x), __ATOMIC_RELAXED)
#define	KSTORE(x, v)	__atomic_store_n(&(x), (v), __ATOMIC_RELAXED)
#define	KOR(x, v)	((void)__atomic_fetch_or(&(x), (v), __ATOMIC_RELAXED))
#define	KAND(x, v)	((void)__atomic_fetch_and(&(x), (v), __ATOMIC_RELAXED))

/* Start the GEOM threads and internal classes once (any API call). */
void	kshim_init(void);

/* Fault injection: nonzero when this call of `which` must fail. */
int	kshim_fail_check(int which);

/* Internal malloc types (not the module's). */
extern struct malloc_type M_GEOM[1];
extern struct malloc_type M_KSHIM[1];
#define	g_malloc(size, flags)						\
	kshim_malloc((size), M_GEOM, (flags), __FILE__, __LINE__)
#define	g_free(p)	kshim_free((p), M_GEOM, __FILE__, __LINE__)
/* Outstanding allocations of every type not marked internal. */
void	kshim_malloc_module_usage(int64_t *allocs, int64_t *bytes);
/* Panic if a module type still holds memory (after MOD_UNLOAD). */
void	kshim_malloc_check_module_types(void);
/* Describe the live allocations of module types into buf. */
void	kshim_malloc_describe(char *buf, size_t len);

/* Witness bookkeeping. */
int64_t	kshim_witness_orders(void);
/* Panic if the current thread holds any lock (return to user, etc.). */
void	kshim_witness_assert_none(const char *where);
/* The same, except for the (sleepable) topology lock. */
void	kshim_witness_assert_none_but_topology(const char *where);

/* GEOM internals shared by geom_*.c. */
extern struct mtx g_eventlock;
extern int g_wither_work;
void	g_do_wither(void);
int	g_wither_washer(void);
void	kshim_geom_start_threads(void);
void	kshim_geom_counts(int64_t *events, int64_t *geoms);
int64_t	kshim_geom_describe_nondisk(char *buf, size_t len);
void	kshim_bio_counts(int64_t *live, int64_t *inflight);
void	kshim_bio_describe(char *buf, size_t len);
void	kshim_class_register(struct g_class *mp);
int	kshim_client_count(void);
void	kshim_filedisk_init(void);
void	kshim_client_init(void);

/* kern_synch.c and kern_mutex.c */
void	kshim_lock_release_for_sleep(struct kshim_lock_object *lo,
	    const char *file, int line);
void	kshim_lock_reacquire_after_sleep(struct kshim_lock_object *lo,
	    const char *file, int line);
int	kshim_sleepq_interrupt(const char *wmesg);

/* geom_io.c */
int	kshim_consumer_idle(struct g_consumer *cp);
void	kshim_bio_start_threads(void);

/* Device files open. */
int64_t	kshim_dev_files(void);

/* Append to buf (bounded, always terminated). */
void	kshim_bufcat(char *buf, size_t len, const char *fmt, ...)
	    __printflike(3, 4);

/* Host pthread helpers that abort on failure. */
void	kshim_pthread_check(int error, const char *what);

#endif	/* !_KSHIM_IMPL_H_ */
