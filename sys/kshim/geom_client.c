/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * geom_client.c: clients of a GEOM provider, as an open /dev/NAME is for
 * g_dev(4): a geom of class KSHIM_CLIENT with one consumer attached to the
 * provider and opened (g_access) with the counts asked for.  Its bios go
 * down with g_io_request from the caller's thread and come back on g_up,
 * where the caller's done function is called; a client closes only when
 * none of its bios is in flight.
 */

#include "kshim_impl.h"

struct kshim_client {
	struct g_consumer	*c_cp;
	int			 c_r, c_w, c_e;
	int64_t			 c_mediasize;
	uint32_t		 c_sectorsize;
};

struct client_req {
	kshim_io_done_t		*r_done;
	void			*r_arg;
};

static g_orphan_t client_orphan;
static int nclients;
static pthread_mutex_t nclients_mtx = PTHREAD_MUTEX_INITIALIZER;

static struct g_class client_class = {
	.name =		"KSHIM_CLIENT",
	.version =	G_VERSION,
	.orphan =	client_orphan,
};


/* A bio the calling thread waits for (as bwait). */
struct client_wait {
	int	w_done;
	int	w_error;
};
static struct mtx client_wait_mtx;

void
kshim_client_init(void)
{

	mtx_init(&client_wait_mtx, "client wait", NULL, MTX_DEF);
	g_topology_lock();
	kshim_class_register(&client_class);
	g_topology_unlock();
}

int
kshim_client_count(void)
{
	int n;

	pthread_mutex_lock(&nclients_mtx);
	n = nclients;
	pthread_mutex_unlock(&nclients_mtx);
	return (n);
}

/* The provider went away: I/O now fails (G_CF_ORPHAN); close detaches. */
static void
client_orphan(struct g_consumer *cp)
{

	g_topology_assert();
	(void)cp;
}

int
kshim_client_open(const char *provider, int r, int w, int e,
    struct kshim_client **cpp)
{
	struct kshim_client *c;
	struct g_provider *pp;
	struct g_consumer *cp;
	struct g_geom *gp;
	int error;

	kshim_init();
	if (r < 0 || w < 0 || e < 0 || r + w + e == 0)
		return (EINVAL);
	c = kshim_malloc(sizeof(*c), M_KSHIM, M_WAITOK | M_ZERO, __FILE__,
	    __LINE__);
	g_topology_lock();
	pp = g_provider_by_name(provider);
	if (pp == NULL) {
		g_topology_unlock();
		kshim_free(c, M_KSHIM, __FILE__, __LINE__);
		return (ENOENT);
	}
	gp = g_new_geomf(&client_class, "client/%s", pp->name);
	cp = g_new_consumer(gp);
	error = g_attach(cp, pp);
	if (error == 0) {
		error = g_access(cp, r, w, e);
		if (error != 0)
			g_detach(cp);
	}
	if (error != 0) {
		g_destroy_consumer(cp);
		g_destroy_geom(gp);
		g_topology_unlock();
		kshim_free(c, M_KSHIM, __FILE__, __LINE__);
		return (kshim_errno_to_host(error));
	}
	c->c_cp = cp;
	c->c_r = r;
	c->c_w = w;
	c->c_e = e;
	c->c_mediasize = pp->mediasize;
	c->c_sectorsize = pp->sectorsize;
	g_topology_unlock();
	pthread_mutex_lock(&nclients_mtx);
	nclients++;
	pthread_mutex_unlock(&nclients_mtx);
	*cpp = c;
	return (0);
}

int
kshim_client_close(struct kshim_client *c)
{
	struct g_consumer *cp;
	struct g_geom *gp;

	g_topology_lock();
	cp = c->c_cp;
	if (!kshim_consumer_idle(cp)) {
		g_topology_unlock();
		return (EBUSY);
	}
	(void)g_access(cp, -c->c_r, -c->c_w, -c->c_e);
	gp = cp->geom;
	if (cp->provider != NULL)
		g_detach(cp);
	g_destroy_consumer(cp);
	g_destroy_geom(gp);
	g_topology_unlock();
	kshim_free(c, M_KSHIM, __FILE__, __LINE__);
	pthread_mutex_lock(&nclients_mtx);
	nclients--;
	pthread_mutex_unlock(&nclients_mtx);
	return (0);
}

int64_t
kshim_client_mediasize(const struct kshim_client *c)
{

	return (c->c_mediasize);
}

uint32_t
kshim_client_sectorsize(const struct kshim_client *c)
{

	return (c->c_sectorsize);
}

/* On g_up: report and forget the bio. */
static void
client_done(struct bio *bp)
{
	struct client_req *r;
	int64_t completed;
	int error;

	r = bp->bio_caller1;
	error = bp->bio_error;
	completed = bp->bio_completed;
	g_destroy_bio(bp);
	r->r_done(r->r_arg, kshim_errno_to_host(error), completed);
	kshim_free(r, M_KSHIM, __FILE__, __LINE__);
}

int
kshim_client_io(struct kshim_client *c, int cmd, int64_t offset,
    int64_t length, void *data, kshim_io_done_t *done, void *arg)
{
	struct client_req *r;
	struct bio *bp;

	switch (cmd) {
	case KSHIM_BIO_READ:
	case KSHIM_BIO_WRITE:
		if (data == NULL || length <= 0)
			return (EINVAL);
		break;
	case KSHIM_BIO_DELETE:
		if (data != NULL || length <= 0)
			return (EINVAL);
		break;
	case KSHIM_BIO_FLUSH:
		if (data != NULL || length != 0)
			return (EINVAL);
		break;
	default:
		return (EINVAL);
	}
	if (done == NULL || offset < 0 ||
	    offset % c->c_sectorsize != 0 || length % c->c_sectorsize != 0)
		return (EINVAL);
	r = kshim_malloc(sizeof(*r), M_KSHIM, M_WAITOK, __FILE__, __LINE__);
	r->r_done = done;
	r->r_arg = arg;
	bp = g_alloc_bio();
	bp->bio_cmd = (uint16_t)cmd;
	bp->bio_offset = offset;
	bp->bio_length = length;
	bp->bio_data = data;
	bp->bio_done = client_done;
	bp->bio_caller1 = r;
	g_io_request(bp, c->c_cp);
	return (0);
}

static void
client_wait_done(struct bio *bp)
{
	struct client_wait *w;

	w = bp->bio_caller1;
	mtx_lock(&client_wait_mtx);
	w->w_error = bp->bio_error;
	w->w_done = 1;
	wakeup(w);
	mtx_unlock(&client_wait_mtx);
}

int
kshim_client_getattr_int(struct kshim_client *c, const char *attr, int *valp)
{
	struct client_wait w;
	struct bio *bp;
	int val;

	val = 0;
	w.w_done = 0;
	w.w_error = 0;
	bp = g_alloc_bio();
	bp->bio_cmd = BIO_GETATTR;
	bp->bio_attribute = attr;
	bp->bio_length = sizeof(val);
	bp->bio_data = (caddr_t)&val;
	bp->bio_done = client_wait_done;
	bp->bio_caller1 = &w;
	g_io_request(bp, c->c_cp);
	mtx_lock(&client_wait_mtx);
	while (!w.w_done)
		msleep(&w, &client_wait_mtx, PRIBIO, "kgetattr", 0);
	mtx_unlock(&client_wait_mtx);
	g_destroy_bio(bp);
	if (w.w_error == 0)
		*valp = val;
	return (kshim_errno_to_host(w.w_error));
}
