/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * kshim_api.h: how a userland host (the Rust engine in tests, the C
 * sanitizer driver) runs the geom_hast kernel module inside its process.
 * The module (kmod/g_hast.c and kmod/hast_core.c, compiled unchanged) sits
 * on the kernel shim (kshim_kern.h); this is the hardware and the system
 * call layer around it:
 *
 *  - kshim_load / kshim_unload: kldload / kldunload (MOD_LOAD, MOD_QUIESCE
 *    and MOD_UNLOAD of every DECLARE_MODULE, leak check of the module's
 *    malloc types on unload);
 *  - kshim_dev_*: open(2), ioctl(2) (IOC_IN/IOC_OUT copies as the kernel's
 *    ioctl does) and close(2) on a make_dev(9) device such as "hastctl";
 *  - kshim_disk_*: a disk: a GEOM provider backed by a file, served by a
 *    pool of I/O threads that complete bios through g_up, which can be
 *    slowed down, held, made to fail, or pulled out (orphaned);
 *  - kshim_client_*: an open of a GEOM provider by a client (what g_dev
 *    does for /dev/NAME): bios sent with g_io_request, their completion
 *    reported from the g_up thread;
 *  - kshim_fail_*: fault injection (M_NOWAIT allocations, g_clone_bio,
 *    copyin, copyout);
 *  - kshim_stats / kshim_check_idle: what is outstanding (bios, module
 *    memory, events), for leak checks at teardown.
 *
 * Every function returns a host errno (0 on success): the shim translates
 * the kernel's error numbers.  Nothing here may be called with a shim lock
 * held (none is held outside the shim), nor from a done callback except
 * kshim_client_io.
 */

#ifndef _KSHIM_API_H_
#define	_KSHIM_API_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Modules. */
int	kshim_load(void);
int	kshim_unload(void);
int	kshim_loaded(void);

/* Character devices: fflags is KSHIM_FREAD | KSHIM_FWRITE. */
#define	KSHIM_FREAD	0x0001
#define	KSHIM_FWRITE	0x0002

struct kshim_file;
int	kshim_dev_open(const char *name, int fflags, struct kshim_file **fpp);
int	kshim_dev_ioctl(struct kshim_file *fp, unsigned long cmd, void *data);
void	kshim_dev_close(struct kshim_file *fp);

/* Disks. */
int	kshim_disk_create(const char *name, const char *path,
	    uint32_t sectorsize, uint32_t nthreads);
/* Orphan the disk (if not yet) and wait up to wait_ms for it to go. */
int	kshim_disk_destroy(const char *name, uint32_t wait_ms);
/*
 * The disk is gone: its provider is orphaned; new and queued I/O fails
 * with ENXIO (held I/O when released).
 */
int	kshim_disk_orphan(const char *name);
/* Each I/O waits a random time of up to usec before it runs. */
int	kshim_disk_delay(const char *name, uint32_t usec);
/* hold != 0: I/O waits until released (hold 0). */
int	kshim_disk_hold(const char *name, int hold);
/* Bios of the commands in cmdmask (1 << BIO_*) fail with error (0: stop). */
int	kshim_disk_fail(const char *name, uint32_t cmdmask, int error);
/* Bios waiting or running on the disk. */
int	kshim_disk_queued(const char *name, uint32_t *countp);

/* Clients of a provider. */
#define	KSHIM_BIO_READ		0x01
#define	KSHIM_BIO_WRITE		0x02
#define	KSHIM_BIO_DELETE	0x03
#define	KSHIM_BIO_GETATTR	0x04
#define	KSHIM_BIO_FLUSH		0x05

struct kshim_client;
typedef void kshim_io_done_t(void *arg, int error, int64_t completed);

int	kshim_client_open(const char *provider, int r, int w, int e,
	    struct kshim_client **cp);
/* EBUSY while bios of this client are in flight. */
int	kshim_client_close(struct kshim_client *c);
int64_t	kshim_client_mediasize(const struct kshim_client *c);
uint32_t kshim_client_sectorsize(const struct kshim_client *c);
/*
 * Send one bio; done(arg, error, completed) is called exactly once, from
 * the g_up thread (it must not block), unless this returns an error.
 * data stays in use until then (length bytes; NULL for DELETE/FLUSH).
 */
int	kshim_client_io(struct kshim_client *c, int cmd, int64_t offset,
	    int64_t length, void *data, kshim_io_done_t *done, void *arg);
/* BIO_GETATTR of an int attribute, waiting for the answer. */
int	kshim_client_getattr_int(struct kshim_client *c, const char *attr,
	    int *valp);

/* Fault injection. */
#define	KSHIM_FAIL_MALLOC_NOWAIT	0
#define	KSHIM_FAIL_CLONE_BIO		1
#define	KSHIM_FAIL_COPYIN		2
#define	KSHIM_FAIL_COPYOUT		3
#define	KSHIM_FAIL_NR			4

/* After skip more calls, fail the next count (UINT32_MAX: all). */
void	kshim_fail_set(int which, uint32_t skip, uint32_t count);
/* Fail each call with probability per_million / 10^6 (0: off). */
void	kshim_fail_rate(int which, uint32_t per_million, uint64_t seed);
/* Failures injected so far. */
uint64_t kshim_fail_hits(int which);
void	kshim_fail_clear(void);

/* Wait until GEOM's event queue is empty (orphans delivered, events run). */
void	kshim_geom_settle(void);

/* Interrupt the PCATCH sleeps waiting on wmesg (NULL: all), as a signal. */
int	kshim_interrupt(const char *wmesg);

/* What is outstanding. */
struct kshim_stats {
	int64_t	ks_bios;		/* allocated, not destroyed */
	int64_t	ks_bios_inflight;	/* requested, not yet done */
	int64_t	ks_module_allocs;	/* the module's malloc types */
	int64_t	ks_module_bytes;
	int64_t	ks_events;		/* GEOM events queued */
	int64_t	ks_geoms;		/* of every class */
	int64_t	ks_files;		/* open device files */
	int64_t	ks_nowait_failed;	/* M_NOWAIT failures injected */
	int64_t	ks_lock_orders;		/* lock order pairs seen */
};
void	kshim_stats(struct kshim_stats *st);
/*
 * 0 when no bio, event, client, module memory or instance geom is left
 * (disks excepted); otherwise EBUSY and a description in buf.
 */
int	kshim_check_idle(char *buf, size_t len);

/* GEOM's configuration as kern.geom.confxml shows it (dumpconf). */
int	kshim_confxml(char *buf, size_t len);

#ifdef __cplusplus
}
#endif

#endif	/* !_KSHIM_API_H_ */
