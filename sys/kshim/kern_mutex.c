/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * kern_mutex.c: mutex(9) (MTX_DEF), the exclusive sx lock behind GEOM's
 * topology lock, and a checker in the spirit of witness(4):
 *
 *  - lock order: every lock belongs to a class named after its type (or
 *    name); acquiring B while holding A records A -> B, and acquiring B
 *    while holding A when B -> ... -> A was seen before is a lock order
 *    reversal, reported even if no deadlock happened this time;
 *  - recursion on a non-recursive mutex, two locks of one class held at
 *    once (without MTX_DUPOK), unlocking a lock not owned, destroying or
 *    using a lock that is not initialized;
 *  - sleeping (msleep other than on the interlock, M_WAITOK, copyin,
 *    acquiring a sleepable lock, pause) with a mutex held or in a thread
 *    that must not sleep (GEOM's g_up/g_down, done routines).
 *
 * Every violation panics: the message, the locks held, abort().
 */

#include "kshim_impl.h"

#define	LO_MAGIC	0x4c4f434b	/* "LOCK" */
#define	LO_DEAD		0x44454144	/* "DEAD" */
#define	KSHIM_NCLASS	64

/* Owners are compared with curthread from any thread: atomically. */
#define	OWNER_GET(f)	__atomic_load_n(&(f), __ATOMIC_RELAXED)
#define	OWNER_SET(f, v)	__atomic_store_n(&(f), (v), __ATOMIC_RELAXED)

static pthread_mutex_t witness_mtx = PTHREAD_MUTEX_INITIALIZER;
static const char *witness_names[KSHIM_NCLASS];
static int witness_sleepable[KSHIM_NCLASS];
/* witness_order[a][b]: a was held when b was acquired. */
static unsigned char witness_order[KSHIM_NCLASS][KSHIM_NCLASS];
/* Where each pair was first seen, for the report. */
static const char *witness_where_file[KSHIM_NCLASS][KSHIM_NCLASS];
static int witness_where_line[KSHIM_NCLASS][KSHIM_NCLASS];
static int witness_nclass;
static int64_t witness_norders;

static int
witness_class(const char *name, int sleepable)
{
	int i;

	pthread_mutex_lock(&witness_mtx);
	for (i = 0; i < witness_nclass; i++)
		if (strcmp(witness_names[i], name) == 0)
			break;
	if (i == witness_nclass) {
		if (witness_nclass == KSHIM_NCLASS)
			panic("witness: more than %d lock classes",
			    KSHIM_NCLASS);
		witness_names[i] = name;
		witness_sleepable[i] = sleepable;
		witness_nclass++;
	}
	pthread_mutex_unlock(&witness_mtx);
	return (i);
}

int64_t
kshim_witness_orders(void)
{
	int64_t n;

	pthread_mutex_lock(&witness_mtx);
	n = witness_norders;
	pthread_mutex_unlock(&witness_mtx);
	return (n);
}

/* Is b -> ... -> a recorded?  (witness_mtx held) */
static int
witness_reaches(int from, int to, unsigned char *seen)
{
	int i;

	if (from == to)
		return (1);
	seen[from] = 1;
	for (i = 0; i < witness_nclass; i++)
		if (witness_order[from][i] && !seen[i] &&
		    witness_reaches(i, to, seen))
			return (1);
	return (0);
}

static void
lock_check_valid(struct kshim_lock_object *lo, const char *op,
    const char *file, int line)
{

	if (lo->lo_magic == LO_DEAD)
		panic("%s of destroyed lock %s at %s:%d", op, lo->lo_name,
		    file, line);
	if (lo->lo_magic != LO_MAGIC)
		panic("%s of uninitialized lock %p at %s:%d", op, (void *)lo,
		    file, line);
}

/* Before acquiring lo: order, recursion and sleep rules. */
static void
witness_checkorder(struct kshim_lock_object *lo, const char *file, int line)
{
	struct thread *td;
	struct kshim_held *h;
	unsigned char seen[KSHIM_NCLASS];
	int a, b, i;

	td = curthread;
	b = lo->lo_class;
	if ((lo->lo_flags & LO_SLEEPABLE) != 0)
		kshim_witness_sleep("acquiring a sleepable lock", NULL, file,
		    line);
	if ((lo->lo_flags & LO_NOWITNESS) != 0)
		return;
	for (i = 0; i < td->td_nheld; i++) {
		h = &td->td_held[i];
		if (h->h_lock == lo)
			continue;	/* recursion: checked by the caller */
		if ((h->h_lock->lo_flags & LO_NOWITNESS) != 0)
			continue;
		a = h->h_lock->lo_class;
		if (a == b) {
			if ((lo->lo_flags & LO_DUPOK) != 0)
				continue;
			panic("acquiring duplicate lock of same type \"%s\": "
			    "1st @ %s:%d, 2nd @ %s:%d", lo->lo_name,
			    h->h_file, h->h_line, file, line);
		}
		pthread_mutex_lock(&witness_mtx);
		if (!witness_order[a][b]) {
			memset(seen, 0, sizeof(seen));
			if (witness_reaches(b, a, seen)) {
				const char *of = witness_where_file[b][a];
				int ol = witness_where_line[b][a];

				pthread_mutex_unlock(&witness_mtx);
				panic("lock order reversal: 1st \"%s\" @ %s:%d, "
				    "2nd \"%s\" @ %s:%d; the order \"%s\" -> "
				    "\"%s\" was established%s%s:%d",
				    h->h_lock->lo_name, h->h_file, h->h_line,
				    lo->lo_name, file, line,
				    witness_names[b], witness_names[a],
				    of != NULL ? " at " : " (through others) ",
				    of != NULL ? of : "", of != NULL ? ol : 0);
			}
			witness_order[a][b] = 1;
			witness_where_file[a][b] = file;
			witness_where_line[a][b] = line;
			witness_norders++;
		}
		pthread_mutex_unlock(&witness_mtx);
	}
}

static void
witness_push(struct kshim_lock_object *lo, const char *file, int line)
{
	struct thread *td;

	td = curthread;
	if (td->td_nheld == KSHIM_MAXHELD)
		panic("thread holds more than %d locks", KSHIM_MAXHELD);
	td->td_held[td->td_nheld].h_lock = lo;
	td->td_held[td->td_nheld].h_file = file;
	td->td_held[td->td_nheld].h_line = line;
	td->td_nheld++;
}

static void
witness_pop(struct kshim_lock_object *lo, const char *file, int line)
{
	struct thread *td;
	int i;

	td = curthread;
	for (i = td->td_nheld - 1; i >= 0; i--) {
		if (td->td_held[i].h_lock == lo) {
			for (; i < td->td_nheld - 1; i++)
				td->td_held[i] = td->td_held[i + 1];
			td->td_nheld--;
			return;
		}
	}
	panic("lock \"%s\" released at %s:%d is not held by this thread",
	    lo->lo_name, file, line);
}

void
kshim_witness_sleep(const char *what, struct kshim_lock_object *interlock,
    const char *file, int line)
{
	struct thread *td;
	struct kshim_held *h;
	int i;

	td = curthread;
	if (td->td_no_sleeping > 0)
		panic("%s at %s:%d in thread \"%s\", which must not sleep "
		    "(GEOM's I/O path)", what, file, line,
		    td->td_name != NULL ? td->td_name : "?");
	for (i = 0; i < td->td_nheld; i++) {
		h = &td->td_held[i];
		if (h->h_lock == interlock)
			continue;
		if ((h->h_lock->lo_flags & LO_SLEEPABLE) != 0)
			continue;
		panic("sleeping with non-sleepable lock \"%s\" held: %s at "
		    "%s:%d (locked at %s:%d)", h->h_lock->lo_name, what, file,
		    line, h->h_file, h->h_line);
	}
}

void
kshim_witness_assert_none(const char *where)
{
	struct thread *td;

	td = curthread;
	if (td->td_nheld != 0)
		panic("%s with lock \"%s\" held (locked at %s:%d)", where,
		    td->td_held[0].h_lock->lo_name, td->td_held[0].h_file,
		    td->td_held[0].h_line);
}

/* As above, but the topology lock (sleepable) may be held. */
void
kshim_witness_assert_none_but_topology(const char *where)
{
	struct thread *td;
	int i;

	td = curthread;
	for (i = 0; i < td->td_nheld; i++) {
		if ((td->td_held[i].h_lock->lo_flags & LO_SLEEPABLE) != 0)
			continue;
		panic("returning from %s with lock \"%s\" held (locked at "
		    "%s:%d)", where, td->td_held[i].h_lock->lo_name,
		    td->td_held[i].h_file, td->td_held[i].h_line);
	}
}

/*
 * mutex(9).
 */
void
mtx_init(struct mtx *m, const char *name, const char *type, int opts)
{
	pthread_mutex_t *pm;
	struct kshim_lock_object *lo;

	lo = &m->lock_object;
	if (lo->lo_magic == LO_MAGIC)
		panic("mtx_init of initialized mutex \"%s\" (as \"%s\")",
		    lo->lo_name, name);
	if ((opts & MTX_SPIN) != 0)
		panic("mtx_init(\"%s\"): spin mutexes are not supported",
		    name);
	pm = malloc(sizeof(*pm));
	if (pm == NULL)
		panic("mtx_init: no memory");
	kshim_pthread_check(pthread_mutex_init(pm, NULL), "pthread_mutex_init");
	lo->lo_name = name;
	lo->lo_flags = 0;
	if ((opts & MTX_RECURSE) != 0)
		lo->lo_flags |= LO_RECURSABLE;
	if ((opts & MTX_DUPOK) != 0)
		lo->lo_flags |= LO_DUPOK;
	if ((opts & MTX_NOWITNESS) != 0)
		lo->lo_flags |= LO_NOWITNESS;
	lo->lo_class = witness_class(type != NULL ? type : name, 0);
	lo->lo_magic = LO_MAGIC;
	OWNER_SET(m->mtx_owner, NULL);
	m->mtx_recurse = 0;
	m->mtx_impl = pm;
}

void
mtx_destroy(struct mtx *m)
{
	struct kshim_lock_object *lo;

	lo = &m->lock_object;
	lock_check_valid(lo, "mtx_destroy", __FILE__, __LINE__);
	if (OWNER_GET(m->mtx_owner) != NULL) {
		if (OWNER_GET(m->mtx_owner) != curthread)
			panic("mtx_destroy of mutex \"%s\" held by another "
			    "thread", lo->lo_name);
		/* Destroying a mutex one holds is allowed: it is released. */
		witness_pop(lo, __FILE__, __LINE__);
		OWNER_SET(m->mtx_owner, NULL);
		m->mtx_recurse = 0;
		pthread_mutex_unlock(m->mtx_impl);
	}
	if (pthread_mutex_destroy(m->mtx_impl) != 0)
		panic("mtx_destroy of mutex \"%s\" still in use", lo->lo_name);
	free(m->mtx_impl);
	m->mtx_impl = NULL;
	lo->lo_magic = LO_DEAD;
}

void
_mtx_lock_flags(struct mtx *m, int opts, const char *file, int line)
{
	struct kshim_lock_object *lo;
	struct thread *td;

	(void)opts;
	lo = &m->lock_object;
	lock_check_valid(lo, "mtx_lock", file, line);
	td = curthread;
	if (OWNER_GET(m->mtx_owner) == td) {
		if ((lo->lo_flags & LO_RECURSABLE) == 0)
			panic("recursed on non-recursive mutex \"%s\" @ %s:%d",
			    lo->lo_name, file, line);
		m->mtx_recurse++;
		return;
	}
	witness_checkorder(lo, file, line);
	kshim_pthread_check(pthread_mutex_lock(m->mtx_impl),
	    "pthread_mutex_lock");
	OWNER_SET(m->mtx_owner, td);
	witness_push(lo, file, line);
}

void
_mtx_unlock_flags(struct mtx *m, int opts, const char *file, int line)
{
	struct kshim_lock_object *lo;

	(void)opts;
	lo = &m->lock_object;
	lock_check_valid(lo, "mtx_unlock", file, line);
	if (OWNER_GET(m->mtx_owner) != curthread)
		panic("mtx_unlock of mutex \"%s\" not owned @ %s:%d",
		    lo->lo_name, file, line);
	if (m->mtx_recurse > 0) {
		m->mtx_recurse--;
		return;
	}
	witness_pop(lo, file, line);
	OWNER_SET(m->mtx_owner, NULL);
	kshim_pthread_check(pthread_mutex_unlock(m->mtx_impl),
	    "pthread_mutex_unlock");
}

int
mtx_owned(struct mtx *m)
{

	lock_check_valid(&m->lock_object, "mtx_owned", __FILE__, __LINE__);
	return (OWNER_GET(m->mtx_owner) == curthread);
}

void
_mtx_assert(struct mtx *m, int what, const char *file, int line)
{
	int owned;

	lock_check_valid(&m->lock_object, "mtx_assert", file, line);
	owned = OWNER_GET(m->mtx_owner) == curthread;
	if ((what & MA_OWNED) != 0 && !owned)
		panic("mutex \"%s\" not owned at %s:%d",
		    m->lock_object.lo_name, file, line);
	if ((what & MA_NOTOWNED) != 0 && owned)
		panic("mutex \"%s\" owned at %s:%d", m->lock_object.lo_name,
		    file, line);
	if ((what & MA_RECURSED) != 0 && m->mtx_recurse == 0)
		panic("mutex \"%s\" not recursed at %s:%d",
		    m->lock_object.lo_name, file, line);
	if ((what & MA_NOTRECURSED) != 0 && owned && m->mtx_recurse != 0)
		panic("mutex \"%s\" recursed at %s:%d",
		    m->lock_object.lo_name, file, line);
}


static int
lock_is_sx(struct kshim_lock_object *lo)
{

	return ((lo->lo_flags & LO_SLEEPABLE) != 0);
}

void
kshim_lock_release_for_sleep(struct kshim_lock_object *lo, const char *file,
    int line)
{

	if (lock_is_sx(lo))
		_sx_xunlock((struct sx *)(void *)lo, file, line);
	else {
		struct mtx *m = (struct mtx *)(void *)lo;

		if (OWNER_GET(m->mtx_owner) != curthread)
			panic("msleep on mutex \"%s\" not owned @ %s:%d",
			    lo->lo_name, file, line);
		if (m->mtx_recurse != 0)
			panic("msleep on recursed mutex \"%s\" @ %s:%d",
			    lo->lo_name, file, line);
		_mtx_unlock_flags(m, 0, file, line);
	}
}

void
kshim_lock_reacquire_after_sleep(struct kshim_lock_object *lo,
    const char *file, int line)
{

	if (lock_is_sx(lo))
		_sx_xlock((struct sx *)(void *)lo, file, line);
	else
		_mtx_lock_flags((struct mtx *)(void *)lo, 0, file, line);
}

/*
 * sx(9), exclusive only: a sleepable lock.
 */
void
sx_init(struct sx *sx, const char *name)
{
	pthread_mutex_t *pm;
	struct kshim_lock_object *lo;

	lo = &sx->lock_object;
	pm = malloc(sizeof(*pm));
	if (pm == NULL)
		panic("sx_init: no memory");
	kshim_pthread_check(pthread_mutex_init(pm, NULL), "pthread_mutex_init");
	lo->lo_name = name;
	lo->lo_flags = LO_SLEEPABLE;
	lo->lo_class = witness_class(name, 1);
	lo->lo_magic = LO_MAGIC;
	OWNER_SET(sx->sx_owner, NULL);
	sx->sx_impl = pm;
}

void
sx_destroy(struct sx *sx)
{

	lock_check_valid(&sx->lock_object, "sx_destroy", __FILE__, __LINE__);
	if (OWNER_GET(sx->sx_owner) != NULL)
		panic("sx_destroy of held lock \"%s\"",
		    sx->lock_object.lo_name);
	pthread_mutex_destroy(sx->sx_impl);
	free(sx->sx_impl);
	sx->lock_object.lo_magic = LO_DEAD;
}

void
_sx_xlock(struct sx *sx, const char *file, int line)
{
	struct kshim_lock_object *lo;

	lo = &sx->lock_object;
	lock_check_valid(lo, "sx_xlock", file, line);
	if (OWNER_GET(sx->sx_owner) == curthread)
		panic("recursed on non-recursive sx \"%s\" @ %s:%d",
		    lo->lo_name, file, line);
	witness_checkorder(lo, file, line);
	kshim_pthread_check(pthread_mutex_lock(sx->sx_impl),
	    "pthread_mutex_lock");
	OWNER_SET(sx->sx_owner, curthread);
	witness_push(lo, file, line);
}

void
_sx_xunlock(struct sx *sx, const char *file, int line)
{
	struct kshim_lock_object *lo;

	lo = &sx->lock_object;
	lock_check_valid(lo, "sx_xunlock", file, line);
	if (OWNER_GET(sx->sx_owner) != curthread)
		panic("sx_xunlock of sx \"%s\" not owned @ %s:%d",
		    lo->lo_name, file, line);
	witness_pop(lo, file, line);
	OWNER_SET(sx->sx_owner, NULL);
	kshim_pthread_check(pthread_mutex_unlock(sx->sx_impl),
	    "pthread_mutex_unlock");
}

int
sx_xlocked(struct sx *sx)
{

	return (OWNER_GET(sx->sx_owner) == curthread);
}

void
_sx_assert(struct sx *sx, int what, const char *file, int line)
{

	lock_check_valid(&sx->lock_object, "sx_assert", file, line);
	if ((what & SA_XLOCKED) != 0 && OWNER_GET(sx->sx_owner) != curthread)
		panic("lock \"%s\" not exclusively locked @ %s:%d",
		    sx->lock_object.lo_name, file, line);
	if ((what & SA_UNLOCKED) != 0 && OWNER_GET(sx->sx_owner) == curthread)
		panic("lock \"%s\" locked @ %s:%d", sx->lock_object.lo_name,
		    file, line);
}
