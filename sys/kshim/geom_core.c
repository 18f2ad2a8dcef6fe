/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * geom_core.c: GEOM's topology: the topology lock, classes (g_modevent),
 * geoms, providers, consumers, g_access(9), g_attach(9), orphaning and
 * withering, and the event thread (g_post_event(9)).
 *
 * The rules are those of the manual pages and of a kernel with
 * INVARIANTS: topology changes need the topology lock; a consumer is
 * detached only with zero access counts and no request in flight (nstart
 * == nend); a provider is destroyed only without consumers; exclusive
 * access excludes writers; a new provider answers ENXIO until
 * g_error_provider(pp, 0).  Orphans are delivered by the event thread
 * (g_doorstep), withered geoms are washed away by it once unused.
 */

#include "kshim_impl.h"

static struct sx topology_lock;
struct mtx g_eventlock;
int g_wither_work;

static LIST_HEAD(, g_class) g_classes = LIST_HEAD_INITIALIZER(g_classes);
static TAILQ_HEAD(, g_provider) g_doorstep =
    TAILQ_HEAD_INITIALIZER(g_doorstep);

#define	G_N_EVENTREFS	20
#define	EV_DONE		0x10000
#define	EV_WAKEUP	0x40000
#define	EV_CANCELED	0x80000
#define	EV_INPROGRESS	0x10000000

struct g_event {
	TAILQ_ENTRY(g_event)	 events;
	g_event_t		*func;
	void			*arg;
	int			 flag;
	void			*ref[G_N_EVENTREFS];
};

static TAILQ_HEAD(, g_event) g_events = TAILQ_HEAD_INITIALIZER(g_events);
static int64_t g_nevents;
/* Orphans taken off g_doorstep whose orphan methods are still running. */
static int g_norphaning;
static int64_t g_ngeoms;
static int g_wait_event, g_pending_events;


/*
 * The topology lock.
 */
void
g_topology_lock(void)
{

	_sx_xlock(&topology_lock, __FILE__, __LINE__);
}

void
g_topology_unlock(void)
{

	_sx_xunlock(&topology_lock, __FILE__, __LINE__);
}

void
g_topology_sleep(void *chan, int timo)
{

	(void)_sx_sleep(chan, &topology_lock, 0, "gtopol", timo, __FILE__,
	    __LINE__);
}

void
_g_topology_assert(int what, const char *file, int line)
{

	_sx_assert(&topology_lock, what, file, line);
}

/*
 * Events.
 */
static int
g_post_event_va(g_event_t *func, void *arg, int flag, int wuflag,
    struct g_event **epp, va_list ap)
{
	struct g_event *ep;
	void *p;
	u_int n;

	if (flag != M_WAITOK && flag != M_NOWAIT)
		panic("g_post_event: flag %#x is neither M_WAITOK nor "
		    "M_NOWAIT", flag);
	ep = g_malloc(sizeof(*ep), flag | M_ZERO);
	if (ep == NULL)
		return (KERR_ENOMEM);
	ep->flag = wuflag;
	for (n = 0; n < G_N_EVENTREFS; n++) {
		p = va_arg(ap, void *);
		if (p == NULL)
			break;
		ep->ref[n] = p;
	}
	if (n == G_N_EVENTREFS)
		panic("g_post_event: too many references");
	ep->func = func;
	ep->arg = arg;
	mtx_lock(&g_eventlock);
	TAILQ_INSERT_TAIL(&g_events, ep, events);
	g_nevents++;
	mtx_unlock(&g_eventlock);
	wakeup(&g_wait_event);
	curthread->td_pflags |= TDP_GEOM;
	if (epp != NULL)
		*epp = ep;
	return (0);
}

int
g_post_event(g_event_t *func, void *arg, int flag, ...)
{
	va_list ap;
	int error;

	va_start(ap, flag);
	error = g_post_event_va(func, arg, flag, 0, NULL, ap);
	va_end(ap);
	return (error);
}

int
g_waitfor_event(g_event_t *func, void *arg, int flag, ...)
{
	struct g_event *ep;
	va_list ap;
	int error;

	g_topology_assert_not();
	va_start(ap, flag);
	error = g_post_event_va(func, arg, flag, EV_WAKEUP, &ep, ap);
	va_end(ap);
	if (error != 0)
		return (error);
	mtx_lock(&g_eventlock);
	while ((ep->flag & EV_DONE) == 0)
		msleep(ep, &g_eventlock, PRIBIO, "g_waitfor_event", 0);
	error = (ep->flag & EV_CANCELED) != 0 ? KERR_EAGAIN : 0;
	mtx_unlock(&g_eventlock);
	g_free(ep);
	return (error);
}

void
g_cancel_event(void *ref)
{
	struct g_event *ep, *epn;
	struct g_provider *pp;
	u_int n;

	mtx_lock(&g_eventlock);
	TAILQ_FOREACH(pp, &g_doorstep, orphan) {
		if (pp != ref)
			continue;
		TAILQ_REMOVE(&g_doorstep, pp, orphan);
		break;
	}
	TAILQ_FOREACH_SAFE(ep, &g_events, events, epn) {
		if ((ep->flag & EV_INPROGRESS) != 0)
			continue;
		for (n = 0; n < G_N_EVENTREFS; n++) {
			if (ep->ref[n] == NULL)
				break;
			if (ep->ref[n] != ref)
				continue;
			TAILQ_REMOVE(&g_events, ep, events);
			g_nevents--;
			/* As the kernel: called with the event lock held. */
			ep->func(ep->arg, EV_CANCEL);
			mtx_assert(&g_eventlock, MA_OWNED);
			if ((ep->flag & EV_WAKEUP) != 0) {
				ep->flag |= EV_DONE | EV_CANCELED;
				wakeup(ep);
			} else
				g_free(ep);
			break;
		}
	}
	if (TAILQ_EMPTY(&g_events))
		wakeup(&g_pending_events);
	mtx_unlock(&g_eventlock);
}

void
g_waitidle(void)
{

	g_topology_assert_not();
	mtx_lock(&g_eventlock);
	while (!TAILQ_EMPTY(&g_events) || !TAILQ_EMPTY(&g_doorstep) ||
	    g_norphaning != 0)
		msleep(&g_pending_events, &g_eventlock, PPAUSE, "g_waitidle",
		    hz / 10);
	mtx_unlock(&g_eventlock);
	curthread->td_pflags &= ~TDP_GEOM;
}

void
kshim_geom_settle(void)
{

	kshim_init();
	g_waitidle();
}

static void g_orphan_register(struct g_provider *pp);

/* One event or orphan; 0 when there is none (g_eventlock then held). */
static int
one_event(void)
{
	struct g_provider *pp;
	struct g_event *ep;

	g_topology_assert();
	mtx_lock(&g_eventlock);
	pp = TAILQ_FIRST(&g_doorstep);
	if (pp != NULL) {
		TAILQ_REMOVE(&g_doorstep, pp, orphan);
		g_norphaning++;
		mtx_unlock(&g_eventlock);
		g_orphan_register(pp);
		mtx_lock(&g_eventlock);
		g_norphaning--;
		mtx_unlock(&g_eventlock);
		return (1);
	}
	ep = TAILQ_FIRST(&g_events);
	if (ep == NULL) {
		wakeup(&g_pending_events);
		return (0);
	}
	ep->flag |= EV_INPROGRESS;
	mtx_unlock(&g_eventlock);
	ep->func(ep->arg, 0);
	kshim_witness_assert_none_but_topology("a GEOM event");
	g_topology_assert();
	mtx_lock(&g_eventlock);
	TAILQ_REMOVE(&g_events, ep, events);
	g_nevents--;
	ep->flag &= ~EV_INPROGRESS;
	if ((ep->flag & EV_WAKEUP) != 0) {
		ep->flag |= EV_DONE;
		wakeup(ep);
		mtx_unlock(&g_eventlock);
	} else {
		mtx_unlock(&g_eventlock);
		g_free(ep);
	}
	return (1);
}

static void *
g_event_thread(void *arg)
{

	(void)arg;
	curthread->td_name = "g_event";
	for (;;) {
		g_topology_lock();
		while (one_event())
			;
		mtx_assert(&g_eventlock, MA_OWNED);
		if (g_wither_work) {
			g_wither_work = 0;
			mtx_unlock(&g_eventlock);
			(void)g_wither_washer();
			g_topology_unlock();
		} else {
			g_topology_unlock();
			msleep(&g_wait_event, &g_eventlock, PRIBIO | PDROP,
			    "-", 0);
		}
	}
	return (NULL);
}

void
g_do_wither(void)
{

	mtx_lock(&g_eventlock);
	g_wither_work = 1;
	mtx_unlock(&g_eventlock);
	wakeup(&g_wait_event);
}

void
kshim_geom_counts(int64_t *events, int64_t *geoms)
{

	mtx_lock(&g_eventlock);
	*events = g_nevents;
	mtx_unlock(&g_eventlock);
	g_topology_lock();
	*geoms = g_ngeoms;
	g_topology_unlock();
}

/* Geoms of any class but the shim's disks, described into buf. */
int64_t
kshim_geom_describe_nondisk(char *buf, size_t len)
{
	struct g_class *mp;
	struct g_geom *gp;
	int64_t n;

	n = 0;
	g_topology_lock();
	LIST_FOREACH(mp, &g_classes, class) {
		if (strcmp(mp->name, "FILEDISK") == 0)
			continue;
		LIST_FOREACH(gp, &mp->geom, geom) {
			n++;
			kshim_bufcat(buf, len, " [geom %s of class %s]",
			    gp->name, mp->name);
		}
	}
	g_topology_unlock();
	return (n);
}

void
kshim_geom_start_threads(void)
{
	pthread_t t;

	sx_init(&topology_lock, "GEOM topology");
	mtx_init(&g_eventlock, "GEOM orphanage", NULL, MTX_DEF);
	kshim_pthread_check(pthread_create(&t, NULL, g_event_thread, NULL),
	    "pthread_create(g_event)");
	pthread_detach(t);
	kshim_bio_start_threads();
	kshim_filedisk_init();
	kshim_client_init();
}

/*
 * Classes.
 */
void
kshim_class_register(struct g_class *mp)
{

	g_topology_assert();
	LIST_INIT(&mp->geom);
	LIST_INSERT_HEAD(&g_classes, mp, class);
	if (mp->init != NULL)
		mp->init(mp);
}

struct g_hh00 {
	struct g_class	*mp;
	int		 error;
};

static void
g_load_class(void *arg, int flag)
{
	struct g_hh00 *hh;
	struct g_class *mp2;

	g_topology_assert();
	if (flag == EV_CANCEL)
		return;
	hh = arg;
	LIST_FOREACH(mp2, &g_classes, class) {
		if (mp2 == hh->mp || strcmp(mp2->name, hh->mp->name) == 0) {
			kshim_printf("GEOM class %s already loaded\n",
			    hh->mp->name);
			hh->error = KERR_EEXIST;
			return;
		}
	}
	kshim_class_register(hh->mp);
	hh->error = 0;
}

/* A class goes: as FreeBSD 13, waiting for withering geoms. */
static int
g_unload_class(struct g_class *mp)
{
	struct g_geom *gp;
	struct g_provider *pp;
	struct g_consumer *cp;
	int error;

	g_topology_lock();
retry:
	LIST_FOREACH(gp, &mp->geom, geom) {
		LIST_FOREACH(pp, &gp->provider, provider)
			if (pp->acr || pp->acw || pp->ace) {
				g_topology_unlock();
				return (KERR_EBUSY);
			}
		LIST_FOREACH(cp, &gp->consumer, consumer)
			if (cp->acr || cp->acw || cp->ace) {
				g_topology_unlock();
				return (KERR_EBUSY);
			}
		if ((gp->flags & G_GEOM_WITHER) != 0) {
			g_topology_sleep(mp, 1);
			goto retry;
		}
	}
	if (!LIST_EMPTY(&mp->geom) && mp->destroy_geom == NULL) {
		g_topology_unlock();
		return (KERR_EOPNOTSUPP);
	}
	mp->taste = NULL;
	LIST_FOREACH(gp, &mp->geom, geom) {
		error = mp->destroy_geom(NULL, mp, gp);
		if (error != 0) {
			g_topology_unlock();
			return (error);
		}
	}
	for (;;) {
		gp = LIST_FIRST(&mp->geom);
		if (gp == NULL)
			break;
		KASSERT(gp->flags & G_GEOM_WITHER,
		    ("Non-withering geom in class %s", mp->name));
		g_topology_sleep(mp, 1);
	}
	if (mp->fini != NULL)
		mp->fini(mp);
	LIST_REMOVE(mp, class);
	g_topology_unlock();
	return (0);
}

int
g_modevent(module_t mod, int type, void *data)
{
	struct g_hh00 hh;
	struct g_class *mp;
	int error;

	(void)mod;
	mp = data;
	if (mp->version != G_VERSION) {
		kshim_printf("GEOM class %s has Wrong version %x\n", mp->name,
		    mp->version);
		return (KERR_EINVAL);
	}
	hh.mp = mp;
	hh.error = 0;
	switch (type) {
	case MOD_LOAD:
		error = g_waitfor_event(g_load_class, &hh, M_WAITOK, NULL);
		if (error == 0)
			error = hh.error;
		break;
	case MOD_UNLOAD:
		error = g_unload_class(mp);
		if (error == 0)
			KASSERT(LIST_EMPTY(&mp->geom),
			    ("Unloaded class (%s) still has geom", mp->name));
		break;
	case MOD_QUIESCE:
		error = 0;
		break;
	default:
		error = KERR_EOPNOTSUPP;
		break;
	}
	return (error);
}

/*
 * Geoms.
 */
struct g_geom *
g_new_geomf(struct g_class *mp, const char *fmt, ...)
{
	struct g_geom *gp;
	char name[256];
	va_list ap;

	g_topology_assert();
	va_start(ap, fmt);
	vsnprintf(name, sizeof(name), fmt, ap);
	va_end(ap);
	gp = g_malloc(sizeof(*gp) + strlen(name) + 1, M_WAITOK | M_ZERO);
	gp->name = (char *)(gp + 1);
	strcpy(gp->name, name);
	gp->class = mp;
	LIST_INIT(&gp->consumer);
	LIST_INIT(&gp->provider);
	LIST_INSERT_HEAD(&mp->geom, gp, geom);
	gp->start = mp->start;
	gp->spoiled = mp->spoiled;
	gp->dumpconf = mp->dumpconf;
	gp->access = mp->access;
	gp->orphan = mp->orphan;
	gp->providergone = mp->providergone;
	g_ngeoms++;
	return (gp);
}

void
g_destroy_geom(struct g_geom *gp)
{

	g_topology_assert();
	KASSERT(LIST_EMPTY(&gp->consumer),
	    ("g_destroy_geom(%s) with consumer", gp->name));
	KASSERT(LIST_EMPTY(&gp->provider),
	    ("g_destroy_geom(%s) with provider", gp->name));
	g_cancel_event(gp);
	LIST_REMOVE(gp, geom);
	g_ngeoms--;
	g_free(gp);
}

void
g_wither_geom(struct g_geom *gp, int error)
{
	struct g_provider *pp;

	g_topology_assert();
	gp->flags |= G_GEOM_WITHER;
	LIST_FOREACH(pp, &gp->provider, provider)
		if ((KLOAD(pp->flags) & G_PF_ORPHAN) == 0)
			g_orphan_provider(pp, error);
	g_do_wither();
}

/*
 * Destroy what withering left unused; 1 when nothing is left to wait for.
 */
int
g_wither_washer(void)
{
	struct g_class *mp;
	struct g_geom *gp, *gp2;
	struct g_provider *pp, *pp2;
	struct g_consumer *cp, *cp2;
	int result;

	result = 1;
	g_topology_assert();
	LIST_FOREACH(mp, &g_classes, class) {
		LIST_FOREACH_SAFE(gp, &mp->geom, geom, gp2) {
			LIST_FOREACH_SAFE(pp, &gp->provider, provider, pp2) {
				if ((KLOAD(pp->flags) & G_PF_WITHER) == 0)
					continue;
				if (LIST_EMPTY(&pp->consumers))
					g_destroy_provider(pp);
				else
					result = 0;
			}
			if ((gp->flags & G_GEOM_WITHER) == 0)
				continue;
			LIST_FOREACH_SAFE(pp, &gp->provider, provider, pp2) {
				if (LIST_EMPTY(&pp->consumers))
					g_destroy_provider(pp);
			}
			LIST_FOREACH_SAFE(cp, &gp->consumer, consumer, cp2) {
				if (cp->acr || cp->acw || cp->ace) {
					result = 0;
					continue;
				}
				if (cp->provider != NULL)
					g_detach(cp);
				g_destroy_consumer(cp);
			}
			if (LIST_EMPTY(&gp->provider) &&
			    LIST_EMPTY(&gp->consumer))
				g_destroy_geom(gp);
			else
				result = 0;
		}
	}
	return (result);
}

/*
 * Consumers.
 */
struct g_consumer *
g_new_consumer(struct g_geom *gp)
{
	struct g_consumer *cp;

	g_topology_assert();
	KASSERT(!(gp->flags & G_GEOM_WITHER),
	    ("g_new_consumer on WITHERing geom(%s) (class %s)", gp->name,
	    gp->class->name));
	KASSERT(gp->orphan != NULL,
	    ("g_new_consumer on geom(%s) (class %s) without orphan",
	    gp->name, gp->class->name));
	cp = g_malloc(sizeof(*cp), M_WAITOK | M_ZERO);
	cp->geom = gp;
	LIST_INSERT_HEAD(&gp->consumer, cp, consumer);
	return (cp);
}

void
g_destroy_consumer(struct g_consumer *cp)
{
	struct g_geom *gp;

	g_topology_assert();
	KASSERT(cp->provider == NULL, ("g_destroy_consumer but attached"));
	KASSERT(cp->acr == 0, ("g_destroy_consumer with acr"));
	KASSERT(cp->acw == 0, ("g_destroy_consumer with acw"));
	KASSERT(cp->ace == 0, ("g_destroy_consumer with ace"));
	g_cancel_event(cp);
	gp = cp->geom;
	LIST_REMOVE(cp, consumer);
	g_free(cp);
	if ((gp->flags & G_GEOM_WITHER) != 0)
		g_do_wither();
}


int
g_attach(struct g_consumer *cp, struct g_provider *pp)
{

	g_topology_assert();
	KASSERT(cp->provider == NULL, ("attach but attached"));
	if ((KLOAD(pp->flags) & (G_PF_ORPHAN | G_PF_WITHER)) != 0)
		return (KERR_ENXIO);
	if (cp->geom == pp->geom)
		return (KERR_EINVAL);	/* a loop */
	cp->provider = pp;
	KAND(cp->flags, ~G_CF_ORPHAN);
	LIST_INSERT_HEAD(&pp->consumers, cp, consumers);
	return (0);
}

void
g_detach(struct g_consumer *cp)
{
	struct g_provider *pp;

	g_topology_assert();
	KASSERT(cp->provider != NULL, ("detach but not attached"));
	KASSERT(cp->acr == 0, ("detach but nonzero acr"));
	KASSERT(cp->acw == 0, ("detach but nonzero acw"));
	KASSERT(cp->ace == 0, ("detach but nonzero ace"));
	KASSERT(kshim_consumer_idle(cp), ("detach with active requests"));
	pp = cp->provider;
	LIST_REMOVE(cp, consumers);
	cp->provider = NULL;
	if ((cp->geom->flags & G_GEOM_WITHER) != 0 ||
	    (pp->geom->flags & G_GEOM_WITHER) != 0 ||
	    (KLOAD(pp->flags) & G_PF_WITHER) != 0)
		g_do_wither();
}

int
g_access(struct g_consumer *cp, int dcr, int dcw, int dce)
{
	struct g_provider *pp;
	struct g_geom *gp;
	int pw, pe, sr, sw, se, error;

	g_topology_assert();
	pp = cp->provider;
	KASSERT(pp != NULL, ("access but not attached"));
	gp = pp->geom;
	KASSERT(cp->acr + dcr >= 0, ("access resulting in negative acr"));
	KASSERT(cp->acw + dcw >= 0, ("access resulting in negative acw"));
	KASSERT(cp->ace + dce >= 0, ("access resulting in negative ace"));
	KASSERT(dcr != 0 || dcw != 0 || dce != 0, ("NOP access request"));
	KASSERT(cp->acr + dcr != 0 || cp->acw + dcw != 0 ||
	    cp->ace + dce != 0 || kshim_consumer_idle(cp),
	    ("Last close with active requests"));
	KASSERT(gp->access != NULL, ("NULL geom->access"));
	KASSERT((gp->flags & G_GEOM_IN_ACCESS) == 0,
	    ("g_access recursed into geom %s", gp->name));

	pw = pp->acw - cp->acw;
	pe = pp->ace - cp->ace;
	if (dce > 0 && pw > 0)
		return (KERR_EPERM);
	if (dcw > 0 && pe > 0)
		return (KERR_EPERM);
	if ((dcr > 0 || dcw > 0 || dce > 0) && KLOAD(pp->error) != 0) {
		kshim_printf("g_access: provider %s has error %d set\n",
		    pp->name, pp->error);
		return (pp->error);
	}
	sr = cp->acr;
	sw = cp->acw;
	se = cp->ace;
	gp->flags |= G_GEOM_IN_ACCESS;
	error = gp->access(pp, dcr, dcw, dce);
	KASSERT(dcr > 0 || dcw > 0 || dce > 0 || error == 0,
	    ("Geom provider %s::%s dcr=%d dcw=%d dce=%d error=%d failed "
	    "closing ->access()", gp->class->name, pp->name, dcr, dcw, dce,
	    error));
	g_topology_assert();
	gp->flags &= ~G_GEOM_IN_ACCESS;
	KASSERT(cp->acr == sr && cp->acw == sw && cp->ace == se,
	    ("Access counts changed during geom->access"));
	if (error == 0) {
		KSTORE(pp->acr, pp->acr + dcr);
		KSTORE(pp->acw, pp->acw + dcw);
		KSTORE(pp->ace, pp->ace + dce);
		KSTORE(cp->acr, cp->acr + dcr);
		KSTORE(cp->acw, cp->acw + dcw);
		KSTORE(cp->ace, cp->ace + dce);
		KASSERT(pp->acr >= 0 && pp->acw >= 0 && pp->ace >= 0,
		    ("provider %s access counts negative", pp->name));
		if (pp->acr != 0 || pp->acw != 0 || pp->ace != 0)
			KASSERT(pp->sectorsize > 0,
			    ("Provider %s lacks sectorsize", pp->name));
		if ((cp->geom->flags & G_GEOM_WITHER) != 0 &&
		    cp->acr == 0 && cp->acw == 0 && cp->ace == 0)
			g_do_wither();
	}
	return (error);
}

/*
 * Providers.
 */
static void
g_new_provider_event(void *arg, int flag)
{
	struct g_class *mp;
	struct g_provider *pp;
	struct g_consumer *cp;

	g_topology_assert();
	if (flag == EV_CANCEL)
		return;
	pp = arg;
	if ((KLOAD(pp->flags) & G_PF_WITHER) != 0 ||
	    (pp->geom->flags & G_GEOM_WITHER) != 0)
		return;
	LIST_FOREACH(mp, &g_classes, class) {
		if (mp->taste == NULL || mp == pp->geom->class)
			continue;
		LIST_FOREACH(cp, &pp->consumers, consumers)
			if (cp->geom->class == mp)
				break;
		if (cp != NULL)
			continue;
		(void)mp->taste(mp, pp, 0);
		g_topology_assert();
	}
}

struct g_provider *
g_new_providerf(struct g_geom *gp, const char *fmt, ...)
{
	struct g_provider *pp;
	char name[256];
	va_list ap;

	g_topology_assert();
	KASSERT(gp->access != NULL,
	    ("new provider on geom(%s) without ->access (class %s)",
	    gp->name, gp->class->name));
	KASSERT(gp->start != NULL,
	    ("new provider on geom(%s) without ->start (class %s)",
	    gp->name, gp->class->name));
	KASSERT(!(gp->flags & G_GEOM_WITHER),
	    ("new provider on WITHERing geom(%s) (class %s)", gp->name,
	    gp->class->name));
	va_start(ap, fmt);
	vsnprintf(name, sizeof(name), fmt, ap);
	va_end(ap);
	pp = g_malloc(sizeof(*pp) + strlen(name) + 1, M_WAITOK | M_ZERO);
	pp->name = (char *)(pp + 1);
	strcpy(pp->name, name);
	LIST_INIT(&pp->consumers);
	pp->error = KERR_ENXIO;
	pp->geom = gp;
	LIST_INSERT_HEAD(&gp->provider, pp, provider);
	g_post_event(g_new_provider_event, pp, M_WAITOK, pp, gp, NULL);
	return (pp);
}

void
g_destroy_provider(struct g_provider *pp)
{
	struct g_geom *gp;

	g_topology_assert();
	KASSERT(LIST_EMPTY(&pp->consumers),
	    ("g_destroy_provider but attached"));
	KASSERT(pp->acr == 0, ("g_destroy_provider with acr"));
	KASSERT(pp->acw == 0, ("g_destroy_provider with acw"));
	KASSERT(pp->ace == 0, ("g_destroy_provider with ace"));
	g_cancel_event(pp);
	LIST_REMOVE(pp, provider);
	gp = pp->geom;
	if (gp->providergone != NULL)
		gp->providergone(pp);
	g_free(pp);
	if ((gp->flags & G_GEOM_WITHER) != 0)
		g_do_wither();
}

void
g_error_provider(struct g_provider *pp, int error)
{

	KSTORE(pp->error, error);
}

void
g_orphan_provider(struct g_provider *pp, int error)
{

	KASSERT(error != 0,
	    ("g_orphan_provider(%p(%s), 0) error must be non-zero", pp,
	    pp->name));
	KSTORE(pp->error, error);
	mtx_lock(&g_eventlock);
	KASSERT(!(KLOAD(pp->flags) & G_PF_ORPHAN),
	    ("g_orphan_provider(%p(%s)), already an orphan", pp, pp->name));
	KOR(pp->flags, G_PF_ORPHAN);
	TAILQ_INSERT_TAIL(&g_doorstep, pp, orphan);
	mtx_unlock(&g_eventlock);
	wakeup(&g_wait_event);
}

static void
g_orphan_register(struct g_provider *pp)
{
	struct g_consumer *cp, *cp2;
	int wf;

	g_topology_assert();
	g_cancel_event(pp);
	wf = KLOAD(pp->flags) & G_PF_WITHER;
	KAND(pp->flags, ~G_PF_WITHER);
	LIST_FOREACH_SAFE(cp, &pp->consumers, consumers, cp2) {
		KASSERT(cp->geom->orphan != NULL,
		    ("geom %s has no orphan, class %s", cp->geom->name,
		    cp->geom->class->name));
		if ((KLOAD(cp->flags) & G_CF_ORPHAN) != 0)
			continue;
		KOR(cp->flags, G_CF_ORPHAN);
		cp->geom->orphan(cp);
		kshim_witness_assert_none_but_topology("an orphan method");
	}
	if (LIST_EMPTY(&pp->consumers) && wf)
		g_destroy_provider(pp);
	else
		KOR(pp->flags, wf);
}

struct g_provider *
g_provider_by_name(const char *arg)
{
	struct g_class *mp;
	struct g_geom *gp;
	struct g_provider *pp, *wpp;

	g_topology_assert();
	if (strncmp(arg, "/dev/", 5) == 0)
		arg += 5;
	wpp = NULL;
	LIST_FOREACH(mp, &g_classes, class) {
		LIST_FOREACH(gp, &mp->geom, geom) {
			LIST_FOREACH(pp, &gp->provider, provider) {
				if (strcmp(arg, pp->name) != 0)
					continue;
				if ((gp->flags & G_GEOM_WITHER) == 0 &&
				    (KLOAD(pp->flags) & G_PF_WITHER) == 0)
					return (pp);
				wpp = pp;
			}
		}
	}
	return (wpp);
}

int
g_handleattr(struct bio *bp, const char *attribute, const void *val, int len)
{
	int error;

	if (strcmp(bp->bio_attribute, attribute) != 0)
		return (0);
	error = 0;
	if (bp->bio_length == len)
		memcpy(bp->bio_data, val, (size_t)len);
	else {
		kshim_printf("g_handleattr: %s %s bio_length %jd len %d -> "
		    "EFAULT\n", bp->bio_to->name, attribute,
		    (intmax_t)bp->bio_length, len);
		error = KERR_EFAULT;
	}
	if (error == 0)
		bp->bio_completed = bp->bio_length;
	g_io_deliver(bp, error);
	return (1);
}

int
g_handleattr_int(struct bio *bp, const char *attribute, int val)
{

	return (g_handleattr(bp, attribute, &val, sizeof(val)));
}

/*
 * kern.geom.confxml, with every geom's dumpconf.
 */
struct sbuf {
	char	*s_buf;
	size_t	 s_len;
	size_t	 s_used;
	int	 s_overflow;
};

int
sbuf_printf(struct sbuf *s, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (s->s_used >= s->s_len) {
		s->s_overflow = 1;
		return (-1);
	}
	va_start(ap, fmt);
	n = vsnprintf(s->s_buf + s->s_used, s->s_len - s->s_used, fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= s->s_len - s->s_used) {
		s->s_used = s->s_len;
		s->s_overflow = 1;
		return (-1);
	}
	s->s_used += (size_t)n;
	return (0);
}

int
sbuf_cat(struct sbuf *s, const char *str)
{

	return (sbuf_printf(s, "%s", str));
}

int
kshim_confxml(char *buf, size_t len)
{
	struct sbuf sb;
	struct g_class *mp;
	struct g_geom *gp;
	struct g_consumer *cp;
	struct g_provider *pp;

	if (len == 0)
		return (EINVAL);
	kshim_init();
	sb.s_buf = buf;
	sb.s_len = len;
	sb.s_used = 0;
	sb.s_overflow = 0;
	buf[0] = '\0';
	g_topology_lock();
	sbuf_printf(&sb, "<mesh>\n");
	LIST_FOREACH(mp, &g_classes, class) {
		sbuf_printf(&sb, "  <class><name>%s</name>\n", mp->name);
		LIST_FOREACH(gp, &mp->geom, geom) {
			sbuf_printf(&sb, "    <geom><name>%s</name>\n",
			    gp->name);
			if (gp->dumpconf != NULL) {
				sbuf_printf(&sb, "      <config>\n");
				gp->dumpconf(&sb, "        ", gp, NULL, NULL);
				kshim_witness_assert_none_but_topology(
				    "a dumpconf method");
				sbuf_printf(&sb, "      </config>\n");
			}
			LIST_FOREACH(cp, &gp->consumer, consumer)
				sbuf_printf(&sb, "      <consumer><provider>%s"
				    "</provider><mode>r%dw%de%d</mode>"
				    "</consumer>\n", cp->provider != NULL ?
				    cp->provider->name : "", cp->acr, cp->acw,
				    cp->ace);
			LIST_FOREACH(pp, &gp->provider, provider)
				sbuf_printf(&sb, "      <provider><name>%s"
				    "</name><mediasize>%jd</mediasize>"
				    "<mode>r%dw%de%d</mode></provider>\n",
				    pp->name, (intmax_t)pp->mediasize, pp->acr,
				    pp->acw, pp->ace);
			sbuf_printf(&sb, "    </geom>\n");
		}
		sbuf_printf(&sb, "  </class>\n");
	}
	sbuf_printf(&sb, "</mesh>\n");
	g_topology_unlock();
	return (sb.s_overflow ? ENOMEM : 0);
}
