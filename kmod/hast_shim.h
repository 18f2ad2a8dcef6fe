/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * hast_shim.h: the few services the portable core (hast_core.c) needs from
 * its environment.  Two implementations exist: the FreeBSD kernel one in
 * g_hast.c (mtx(9) MTX_DEF, malloc(9) with M_NOWAIT | M_ZERO, wakeup(9),
 * getnanouptime(9), panic(9)) and the userland one in
 * sys/csrc/hast_shim_user.c (pthreads, calloc, clock_gettime, abort).
 *
 * None of these functions may sleep: the core calls them from the I/O path
 * (GEOM's g_down/g_up threads on FreeBSD).
 */

#ifndef _HAST_SHIM_H_
#define	_HAST_SHIM_H_

#include "hast_abi.h"

struct hast_shim_lock;

/* A new non-recursive, non-sleepable mutex, or NULL when out of memory. */
struct hast_shim_lock	*hast_shim_lock_alloc(void);
/* Destroy an unlocked mutex. */
void	hast_shim_lock_free(struct hast_shim_lock *lk);
void	hast_shim_lock(struct hast_shim_lock *lk);
void	hast_shim_unlock(struct hast_shim_lock *lk);

/* size zeroed bytes, or NULL; never sleeps (M_NOWAIT). */
void	*hast_shim_alloc(uint64_t size);
/* Free memory from hast_shim_alloc(); NULL is ignored. */
void	hast_shim_free(void *p);

/* Wake every thread sleeping on chan (wakeup(9)); may be a no-op. */
void	hast_shim_wakeup(void *chan);

/* Monotonic time in nanoseconds. */
uint64_t	hast_shim_time_ns(void);

/* An internal invariant failed: panic (kernel) or abort (userland). */
void	hast_shim_assert_fail(const char *expr, const char *file, int line);

#endif	/* !_HAST_SHIM_H_ */
