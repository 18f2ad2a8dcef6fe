/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * hast_shim_user.c: the userland implementation of kmod/hast_shim.h, so the
 * kernel's fast-path core runs (and is tested) in an ordinary process:
 * pthread mutexes, calloc/free, CLOCK_MONOTONIC, abort on a failed
 * invariant.  Wakeups are a no-op: userland hosts register hco_notify.
 */

#define	_POSIX_C_SOURCE	200809L

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "hast_shim.h"

struct hast_shim_lock {
	pthread_mutex_t	l_mtx;
};

struct hast_shim_lock *
hast_shim_lock_alloc(void)
{
	struct hast_shim_lock *lk;

	lk = calloc(1, sizeof(*lk));
	if (lk == NULL)
		return (NULL);
	if (pthread_mutex_init(&lk->l_mtx, NULL) != 0) {
		free(lk);
		return (NULL);
	}
	return (lk);
}

void
hast_shim_lock_free(struct hast_shim_lock *lk)
{

	(void)pthread_mutex_destroy(&lk->l_mtx);
	free(lk);
}

void
hast_shim_lock(struct hast_shim_lock *lk)
{

	if (pthread_mutex_lock(&lk->l_mtx) != 0)
		hast_shim_assert_fail("pthread_mutex_lock", __FILE__, __LINE__);
}

void
hast_shim_unlock(struct hast_shim_lock *lk)
{

	if (pthread_mutex_unlock(&lk->l_mtx) != 0)
		hast_shim_assert_fail("pthread_mutex_unlock", __FILE__,
		    __LINE__);
}

void *
hast_shim_alloc(uint64_t size)
{

	if (size == 0 || size > SIZE_MAX)
		return (NULL);
	return (calloc(1, (size_t)size));
}

void
hast_shim_free(void *p)
{

	free(p);
}

void
hast_shim_wakeup(void *chan)
{

	(void)chan;
}

uint64_t
hast_shim_time_ns(void)
{
	struct timespec ts;

	if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
		return (0);
	return ((uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec);
}

void
hast_shim_assert_fail(const char *expr, const char *file, int line)
{

	(void)fprintf(stderr, "hast_core: assertion failed: %s at %s:%d\n",
	    expr, file, line);
	abort();
}
