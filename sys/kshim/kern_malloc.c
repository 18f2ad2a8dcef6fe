/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * kern_malloc.c: malloc(9) and free(9) with per-type accounting.
 *
 * Each allocation carries a header (type, size, where) and sits on a list
 * of live allocations, so that freeing with the wrong type, twice, or
 * something never allocated panics, and a type that still holds memory
 * when its module unloads is reported allocation by allocation.  M_WAITOK
 * may sleep (and is checked like a sleep); M_NOWAIT fails when the fault
 * injection says so (KSHIM_FAIL_MALLOC_NOWAIT).
 */

#include "kshim_impl.h"

#define	MH_LIVE		0x6d616c6cU	/* "mall" */
#define	MH_FREED	0x66726565U	/* "free" */

struct kshim_mhdr {
	uint32_t		 mh_magic;
	uint32_t		 mh_line;
	struct malloc_type	*mh_type;
	size_t			 mh_size;
	const char		*mh_file;
	struct kshim_mhdr	*mh_prev;
	struct kshim_mhdr	*mh_next;
};
_Static_assert(sizeof(struct kshim_mhdr) % 16 == 0, "malloc header size");

static pthread_mutex_t malloc_mtx = PTHREAD_MUTEX_INITIALIZER;
static struct kshim_mhdr malloc_live = { .mh_prev = &malloc_live,
    .mh_next = &malloc_live };
static struct malloc_type *malloc_types;

/* The shim's own types: not the module's, never leak-checked on unload. */
struct malloc_type M_GEOM[1] = { { .ks_shortdesc = "GEOM" } };
struct malloc_type M_KSHIM[1] = { { .ks_shortdesc = "kshim" } };

static int
malloc_internal(const struct malloc_type *type)
{

	return (type == M_GEOM || type == M_KSHIM);
}

/* (malloc_mtx held) */
static void
malloc_register_locked(struct malloc_type *type)
{

	if (type->ks_registered)
		return;
	type->ks_registered = 1;
	type->ks_next = malloc_types;
	malloc_types = type;
}

void
kshim_malloc_register(struct malloc_type *type)
{

	pthread_mutex_lock(&malloc_mtx);
	malloc_register_locked(type);
	pthread_mutex_unlock(&malloc_mtx);
}

void *
kshim_malloc(size_t size, struct malloc_type *type, int flags,
    const char *file, int line)
{
	struct kshim_mhdr *h;
	int how;

	how = flags & (M_NOWAIT | M_WAITOK);
	if (how != M_NOWAIT && how != M_WAITOK)
		panic("malloc(%zu, %s) at %s:%d: bad flags %#x (exactly one "
		    "of M_NOWAIT and M_WAITOK)", size, type->ks_shortdesc,
		    file, line, flags);
	if (how == M_WAITOK)
		kshim_witness_sleep("malloc(M_WAITOK)", NULL, file, line);
	pthread_mutex_lock(&malloc_mtx);
	malloc_register_locked(type);
	type->ks_calls++;
	pthread_mutex_unlock(&malloc_mtx);
	if (how == M_NOWAIT && kshim_fail_check(KSHIM_FAIL_MALLOC_NOWAIT)) {
		pthread_mutex_lock(&malloc_mtx);
		type->ks_failed++;
		pthread_mutex_unlock(&malloc_mtx);
		return (NULL);
	}
	h = malloc(sizeof(*h) + (size > 0 ? size : 1));
	if (h == NULL) {
		if (how == M_WAITOK)
			panic("malloc(%zu, M_WAITOK) failed at %s:%d", size,
			    file, line);
		return (NULL);
	}
	h->mh_magic = MH_LIVE;
	h->mh_line = (uint32_t)line;
	h->mh_type = type;
	h->mh_size = size;
	h->mh_file = file;
	if ((flags & M_ZERO) != 0)
		memset(h + 1, 0, size);
	else
		memset(h + 1, 0xde, size);	/* as INVARIANTS' trash */
	pthread_mutex_lock(&malloc_mtx);
	h->mh_next = &malloc_live;
	h->mh_prev = malloc_live.mh_prev;
	malloc_live.mh_prev->mh_next = h;
	malloc_live.mh_prev = h;
	type->ks_inuse++;
	type->ks_memuse += (int64_t)size;
	pthread_mutex_unlock(&malloc_mtx);
	return (h + 1);
}

void
kshim_free(void *addr, struct malloc_type *type, const char *file, int line)
{
	struct kshim_mhdr *h;

	if (addr == NULL)
		return;
	h = (struct kshim_mhdr *)addr - 1;
	pthread_mutex_lock(&malloc_mtx);
	if (h->mh_magic == MH_FREED)
		panic("free(%p, %s) at %s:%d: freed twice", addr,
		    type->ks_shortdesc, file, line);
	if (h->mh_magic != MH_LIVE || h->mh_next->mh_prev != h ||
	    h->mh_prev->mh_next != h)
		panic("free(%p, %s) at %s:%d: not allocated by malloc(9)",
		    addr, type->ks_shortdesc, file, line);
	if (h->mh_type != type)
		panic("free(%p, %s) at %s:%d: allocated as type %s at %s:%u",
		    addr, type->ks_shortdesc, file, line,
		    h->mh_type->ks_shortdesc, h->mh_file, h->mh_line);
	h->mh_prev->mh_next = h->mh_next;
	h->mh_next->mh_prev = h->mh_prev;
	h->mh_magic = MH_FREED;
	type->ks_inuse--;
	type->ks_memuse -= (int64_t)h->mh_size;
	pthread_mutex_unlock(&malloc_mtx);
	memset(h + 1, 0xdf, h->mh_size);
	free(h);
}

void
kshim_malloc_module_usage(int64_t *allocs, int64_t *bytes)
{
	struct malloc_type *t;

	*allocs = 0;
	*bytes = 0;
	pthread_mutex_lock(&malloc_mtx);
	for (t = malloc_types; t != NULL; t = t->ks_next) {
		if (malloc_internal(t))
			continue;
		*allocs += t->ks_inuse;
		*bytes += t->ks_memuse;
	}
	pthread_mutex_unlock(&malloc_mtx);
}

void
kshim_malloc_describe(char *buf, size_t len)
{
	struct kshim_mhdr *h;
	int n;

	n = 0;
	pthread_mutex_lock(&malloc_mtx);
	for (h = malloc_live.mh_next; h != &malloc_live; h = h->mh_next) {
		if (malloc_internal(h->mh_type))
			continue;
		if (n++ < 8)
			kshim_bufcat(buf, len, " [%s: %zu bytes from %s:%u]",
			    h->mh_type->ks_shortdesc, h->mh_size, h->mh_file,
			    h->mh_line);
	}
	pthread_mutex_unlock(&malloc_mtx);
	if (n > 8)
		kshim_bufcat(buf, len, " and %d more", n - 8);
}

/* What malloc_uninit(9) warns about when a module unloads: here fatal. */
void
kshim_malloc_check_module_types(void)
{
	char desc[1024];
	int64_t allocs, bytes;

	kshim_malloc_module_usage(&allocs, &bytes);
	if (allocs == 0)
		return;
	desc[0] = '\0';
	kshim_malloc_describe(desc, sizeof(desc));
	panic("module unloaded with %jd allocation(s) of %jd bytes leaked:%s",
	    (intmax_t)allocs, (intmax_t)bytes, desc);
}
