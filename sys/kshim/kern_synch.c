/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * kern_synch.c: msleep(9), wakeup(9), pause(9) on a sleep queue.
 *
 * A sleeper enters the queue (one host mutex for all channels) before it
 * drops its interlock, and a waker must take the same queue lock, so a
 * wakeup between the two cannot be lost.  Timeouts are in ticks (hz).  A
 * PCATCH sleep ends with EINTR when kshim_interrupt() signals it.
 */

#include "kshim_impl.h"

struct kshim_sleeper {
	void			*s_chan;
	struct thread		*s_td;
	const char		*s_wmesg;
	int			 s_catch;
	int			 s_woken;
	pthread_cond_t		 s_cv;
	struct kshim_sleeper	*s_next;
};

static pthread_mutex_t sleepq_mtx = PTHREAD_MUTEX_INITIALIZER;
static struct kshim_sleeper *sleepq;


static int
kshim_sleep(void *chan, struct kshim_lock_object *lock, int pri,
    const char *wmesg, int timo, const char *what, const char *file,
    int line)
{
	struct kshim_sleeper s, **sp;
	struct timespec deadline;
	pthread_condattr_t ca;
	struct thread *td;
	int error, rc;

	td = curthread;
	kshim_witness_sleep(what, lock, file, line);
	if (chan == NULL)
		panic("%s on a NULL channel at %s:%d", what, file, line);
	memset(&s, 0, sizeof(s));
	s.s_chan = chan;
	s.s_td = td;
	s.s_wmesg = wmesg;
	s.s_catch = (pri & PCATCH) != 0;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	kshim_pthread_check(pthread_cond_init(&s.s_cv, &ca),
	    "pthread_cond_init");
	pthread_condattr_destroy(&ca);
	if (timo > 0) {
		clock_gettime(CLOCK_MONOTONIC, &deadline);
		deadline.tv_sec += timo / hz;
		deadline.tv_nsec += (long)(timo % hz) * (1000000000L / hz);
		if (deadline.tv_nsec >= 1000000000L) {
			deadline.tv_sec++;
			deadline.tv_nsec -= 1000000000L;
		}
	}

	pthread_mutex_lock(&sleepq_mtx);
	s.s_next = sleepq;
	sleepq = &s;
	if (lock != NULL)
		kshim_lock_release_for_sleep(lock, file, line);
	td->td_wmesg = wmesg;
	error = 0;
	for (;;) {
		if (s.s_woken)
			break;
		if (s.s_catch && td->td_sigpending) {
			error = KERR_EINTR;
			break;
		}
		if (timo > 0) {
			rc = pthread_cond_timedwait(&s.s_cv, &sleepq_mtx,
			    &deadline);
			if (rc == ETIMEDOUT && !s.s_woken) {
				error = KERR_EWOULDBLOCK;
				break;
			}
		} else
			pthread_cond_wait(&s.s_cv, &sleepq_mtx);
	}
	td->td_wmesg = NULL;
	for (sp = &sleepq; *sp != NULL; sp = &(*sp)->s_next) {
		if (*sp == &s) {
			*sp = s.s_next;
			break;
		}
	}
	pthread_mutex_unlock(&sleepq_mtx);
	pthread_cond_destroy(&s.s_cv);
	if (lock != NULL && (pri & PDROP) == 0)
		kshim_lock_reacquire_after_sleep(lock, file, line);
	return (error);
}

int
_msleep(void *chan, struct kshim_lock_object *lock, int pri,
    const char *wmesg, int timo, const char *file, int line)
{

	return (kshim_sleep(chan, lock, pri, wmesg, timo, "msleep", file,
	    line));
}

int
_sx_sleep(void *chan, struct sx *sx, int pri, const char *wmesg, int timo,
    const char *file, int line)
{

	return (kshim_sleep(chan, &sx->lock_object, pri, wmesg, timo,
	    "sx_sleep", file, line));
}

int
_pause_sig(const char *wmesg, int timo, const char *file, int line)
{
	int chan;

	/* Nobody knows this channel: only the timeout or a signal end it. */
	return (kshim_sleep(&chan, NULL, PCATCH, wmesg, timo > 0 ? timo : 1,
	    "pause", file, line));
}

static void
kshim_wakeup(void *chan, int one)
{
	struct kshim_sleeper *s;

	pthread_mutex_lock(&sleepq_mtx);
	for (s = sleepq; s != NULL; s = s->s_next) {
		if (s->s_chan != chan || s->s_woken)
			continue;
		s->s_woken = 1;
		pthread_cond_signal(&s->s_cv);
		if (one)
			break;
	}
	pthread_mutex_unlock(&sleepq_mtx);
}

void
wakeup(void *chan)
{

	kshim_wakeup(chan, 0);
}

void
wakeup_one(void *chan)
{

	kshim_wakeup(chan, 1);
}

int
kshim_sleepq_interrupt(const char *wmesg)
{
	struct kshim_sleeper *s;
	int n;

	n = 0;
	pthread_mutex_lock(&sleepq_mtx);
	for (s = sleepq; s != NULL; s = s->s_next) {
		if (!s->s_catch || s->s_woken)
			continue;
		if (wmesg != NULL && (s->s_wmesg == NULL ||
		    strcmp(wmesg, s->s_wmesg) != 0))
			continue;
		s->s_td->td_sigpending = 1;
		pthread_cond_signal(&s->s_cv);
		n++;
	}
	pthread_mutex_unlock(&sleepq_mtx);
	return (n);
}
