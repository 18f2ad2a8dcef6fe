/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * kern_module.c: DECLARE_MODULE(9) registration and kldload/kldunload.
 *
 * DECLARE_MODULE registers its moduledata when the program starts (as the
 * linker finds a file's SYSINITs).  kshim_load() runs MOD_LOAD in SYSINIT
 * order (subsystem, then order); kshim_unload() asks every loaded module
 * MOD_QUIESCE (any refusal stops the unload), then runs MOD_UNLOAD in the
 * reverse order, and finally requires the module's malloc types to be
 * empty (malloc_uninit's leak warning, fatal here).  As in the kernel, a
 * module whose MOD_UNLOAD succeeded stays unloaded even if a later one
 * refuses.
 *
 * A real kldload maps the file afresh; here the module's static data
 * stays as the last unload left it, so the module is loaded once per
 * process: kshim_load() after a complete unload fails (ESTALE).
 */

#include "kshim_impl.h"

#define	KSHIM_MAXMOD	8

struct module {
	moduledata_t	*m_data;
	int		 m_sub;
	int		 m_order;
	int		 m_loaded;
};

static pthread_mutex_t module_mtx = PTHREAD_MUTEX_INITIALIZER;
static struct module modules[KSHIM_MAXMOD];
static int nmodules;
static int loaded;
static int unloaded;

/* The module's objects (kmod_g_hast.c) define it: it pulls them in. */
extern const int kshim_kmod_linked;

void
kshim_module_register(moduledata_t *data, int sub, int order)
{
	struct module tmp;
	int i;

	pthread_mutex_lock(&module_mtx);
	if (nmodules == KSHIM_MAXMOD)
		panic("kshim: more than %d modules", KSHIM_MAXMOD);
	modules[nmodules].m_data = data;
	modules[nmodules].m_sub = sub;
	modules[nmodules].m_order = order;
	nmodules++;
	/* Keep them in SYSINIT order. */
	for (i = nmodules - 1; i > 0; i--) {
		if (modules[i - 1].m_sub < modules[i].m_sub ||
		    (modules[i - 1].m_sub == modules[i].m_sub &&
		    modules[i - 1].m_order <= modules[i].m_order))
			break;
		tmp = modules[i - 1];
		modules[i - 1] = modules[i];
		modules[i] = tmp;
	}
	pthread_mutex_unlock(&module_mtx);
}

int
kshim_loaded(void)
{
	int l;

	pthread_mutex_lock(&module_mtx);
	l = loaded;
	pthread_mutex_unlock(&module_mtx);
	return (l);
}

int
kshim_load(void)
{
	struct module *m;
	int error, i, j;

	kshim_init();
	kshim_witness_assert_none("kldload");
	if (!kshim_kmod_linked)
		return (ENOEXEC);
	pthread_mutex_lock(&module_mtx);
	if (loaded) {
		pthread_mutex_unlock(&module_mtx);
		return (EEXIST);
	}
	if (unloaded) {
		pthread_mutex_unlock(&module_mtx);
		kshim_printf("kldload: the module's image was unloaded in this "
		    "process and cannot be mapped afresh\n");
		return (ESTALE);
	}
	if (nmodules == 0) {
		pthread_mutex_unlock(&module_mtx);
		return (ENOEXEC);
	}
	error = 0;
	for (i = 0; i < nmodules; i++) {
		m = &modules[i];
		error = m->m_data->evhand(m, MOD_LOAD, m->m_data->priv);
		if (error != 0) {
			kshim_printf("module_register_init: MOD_LOAD (%s) "
			    "error %d\n", m->m_data->name, error);
			for (j = i - 1; j >= 0; j--) {
				(void)modules[j].m_data->evhand(&modules[j],
				    MOD_UNLOAD, modules[j].m_data->priv);
				modules[j].m_loaded = 0;
			}
			break;
		}
		m->m_loaded = 1;
	}
	if (error == 0)
		loaded = 1;
	pthread_mutex_unlock(&module_mtx);
	kshim_witness_assert_none("kldload");
	return (kshim_errno_to_host(error));
}

int
kshim_unload(void)
{
	struct module *m;
	int error, i;

	kshim_init();
	kshim_witness_assert_none("kldunload");
	pthread_mutex_lock(&module_mtx);
	if (!loaded) {
		pthread_mutex_unlock(&module_mtx);
		return (ENOENT);
	}
	error = 0;
	for (i = nmodules - 1; i >= 0 && error == 0; i--) {
		m = &modules[i];
		if (m->m_loaded)
			error = m->m_data->evhand(m, MOD_QUIESCE,
			    m->m_data->priv);
	}
	for (i = nmodules - 1; i >= 0 && error == 0; i--) {
		m = &modules[i];
		if (!m->m_loaded)
			continue;
		error = m->m_data->evhand(m, MOD_UNLOAD, m->m_data->priv);
		if (error == 0)
			m->m_loaded = 0;
	}
	if (error == 0) {
		loaded = 0;
		unloaded = 1;
		kshim_malloc_check_module_types();
	}
	pthread_mutex_unlock(&module_mtx);
	kshim_witness_assert_none("kldunload");
	return (kshim_errno_to_host(error));
}
