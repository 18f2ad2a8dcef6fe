/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * kern_conf.c: character devices (make_dev(9), destroy_dev(9)), the files
 * that open them with their cdevpriv (devfs_set_cdevpriv(9)), the ioctl(2)
 * path into d_ioctl, and copy(9).
 *
 * The ioctl path does what the kernel's does: the argument struct (its
 * size from the command's IOCPARM_LEN) is copied into kernel memory for
 * IOC_IN, d_ioctl runs with the file as curthread's td_fpop, and the
 * struct is copied back for IOC_OUT only when d_ioctl returned 0.  On the
 * way out the thread must hold no lock, and a thread that posted GEOM
 * events waits for them (TDP_GEOM) unless the driver cleared the flag.
 */

#include "kshim_impl.h"

struct cdev {
	struct cdevsw		*si_devsw;
	char			 si_name[64];
	int			 si_threadcount;	/* in d_* methods */
	int			 si_destroyed;
	int			 si_refs;		/* list + files */
	LIST_ENTRY(cdev)	 si_list;
};

struct file {
	struct cdev		*f_dev;
	int			 f_flag;
	void			*f_cdevpriv;
	d_priv_dtor_t		*f_cdevpriv_dtr;
	LIST_ENTRY(file)	 f_list;
};

struct kshim_file {
	struct file		 kf_file;
};

/* d_open/d_close's devtype: a character device (S_IFCHR). */
#define	KSHIM_DEVTYPE	0020000

static struct mtx devmtx;
static pthread_once_t devmtx_once = PTHREAD_ONCE_INIT;
static LIST_HEAD(, cdev) cdevs = LIST_HEAD_INITIALIZER(cdevs);
static LIST_HEAD(, file) files = LIST_HEAD_INITIALIZER(files);
static int64_t nfiles;

static void
devmtx_init(void)
{

	mtx_init(&devmtx, "cdev", NULL, MTX_DEF);
}

static void
dev_lock(void)
{

	pthread_once(&devmtx_once, devmtx_init);
	mtx_lock(&devmtx);
}

static void
dev_rele_locked(struct cdev *dev)
{

	mtx_assert(&devmtx, MA_OWNED);
	if (--dev->si_refs == 0)
		kshim_free(dev, M_KSHIM, __FILE__, __LINE__);
}

int64_t
kshim_dev_files(void)
{
	int64_t n;

	dev_lock();
	n = nfiles;
	mtx_unlock(&devmtx);
	return (n);
}

struct cdev *
make_dev(struct cdevsw *devsw, int unit, uid_t uid, gid_t gid, int perms,
    const char *fmt, ...)
{
	struct cdev *dev, *odev;
	va_list ap;

	(void)unit;
	(void)uid;
	(void)gid;
	(void)perms;
	if (devsw->d_version != D_VERSION)
		panic("make_dev: cdevsw \"%s\" has version %#x, not %#x",
		    devsw->d_name, devsw->d_version, D_VERSION);
	dev = kshim_malloc(sizeof(*dev), M_KSHIM, M_WAITOK | M_ZERO, __FILE__,
	    __LINE__);
	va_start(ap, fmt);
	vsnprintf(dev->si_name, sizeof(dev->si_name), fmt, ap);
	va_end(ap);
	dev->si_devsw = devsw;
	dev->si_refs = 1;
	dev_lock();
	LIST_FOREACH(odev, &cdevs, si_list) {
		if (strcmp(odev->si_name, dev->si_name) == 0)
			panic("make_dev: dev %s already exists", dev->si_name);
	}
	LIST_INSERT_HEAD(&cdevs, dev, si_list);
	mtx_unlock(&devmtx);
	return (dev);
}

/*
 * Wait for the threads inside the device's methods, run the cdevpriv
 * destructors of every file still open on it, and take it away; those
 * files get ENXIO from then on.
 */
void
destroy_dev(struct cdev *dev)
{
	struct file *fp;
	d_priv_dtor_t *dtr;
	void *priv;

	WITNESS_SLEEP("destroy_dev", NULL);
	dev_lock();
	if (dev->si_destroyed)
		panic("destroy_dev: %s destroyed twice", dev->si_name);
	dev->si_destroyed = 1;
	while (dev->si_threadcount > 0)
		msleep(&dev->si_threadcount, &devmtx, PRIBIO, "devdrn", hz / 10);
	for (;;) {
		LIST_FOREACH(fp, &files, f_list) {
			if (fp->f_dev == dev && fp->f_cdevpriv != NULL)
				break;
		}
		if (fp == NULL)
			break;
		priv = fp->f_cdevpriv;
		dtr = fp->f_cdevpriv_dtr;
		fp->f_cdevpriv = NULL;
		fp->f_cdevpriv_dtr = NULL;
		mtx_unlock(&devmtx);
		dtr(priv);
		dev_lock();
	}
	LIST_REMOVE(dev, si_list);
	dev_rele_locked(dev);
	mtx_unlock(&devmtx);
}

int
devfs_set_cdevpriv(void *priv, d_priv_dtor_t *dtr)
{
	struct file *fp;
	int error;

	fp = curthread->td_fpop;
	if (fp == NULL)
		return (KERR_ENOENT);
	dev_lock();
	if (fp->f_cdevpriv != NULL)
		error = KERR_EBUSY;
	else {
		fp->f_cdevpriv = priv;
		fp->f_cdevpriv_dtr = dtr;
		error = 0;
	}
	mtx_unlock(&devmtx);
	return (error);
}

int
devfs_get_cdevpriv(void **datap)
{
	struct file *fp;
	int error;

	fp = curthread->td_fpop;
	if (fp == NULL)
		return (KERR_EBADF);
	dev_lock();
	if (fp->f_cdevpriv != NULL) {
		*datap = fp->f_cdevpriv;
		error = 0;
	} else
		error = KERR_ENOENT;
	mtx_unlock(&devmtx);
	return (error);
}

void
devfs_clear_cdevpriv(void)
{
	struct file *fp;
	d_priv_dtor_t *dtr;
	void *priv;

	fp = curthread->td_fpop;
	if (fp == NULL)
		return;
	dev_lock();
	priv = fp->f_cdevpriv;
	dtr = fp->f_cdevpriv_dtr;
	fp->f_cdevpriv = NULL;
	fp->f_cdevpriv_dtr = NULL;
	mtx_unlock(&devmtx);
	if (priv != NULL)
		dtr(priv);
}

/* Enter a method of fp's device; ENXIO once it is destroyed. */
static int
dev_enter(struct file *fp)
{
	int error;

	dev_lock();
	if (fp->f_dev->si_destroyed)
		error = KERR_ENXIO;
	else {
		fp->f_dev->si_threadcount++;
		error = 0;
	}
	mtx_unlock(&devmtx);
	return (error);
}

static void
dev_exit(struct file *fp)
{

	dev_lock();
	if (--fp->f_dev->si_threadcount == 0 && fp->f_dev->si_destroyed)
		wakeup(&fp->f_dev->si_threadcount);
	mtx_unlock(&devmtx);
}

/* What every system call does on its way back to user mode. */
static int
syscall_return(struct thread *td, int error)
{

	kshim_witness_assert_none("returning to user mode");
	if (td->td_no_sleeping != 0)
		panic("returning to user mode in a no-sleep section");
	if ((td->td_pflags & TDP_GEOM) != 0)
		g_waitidle();
	td->td_fpop = NULL;
	td->td_sigpending = 0;	/* delivered */
	return (kshim_errno_to_host(error));
}

int
kshim_dev_open(const char *name, int fflags, struct kshim_file **fpp)
{
	struct kshim_file *kf;
	struct thread *td;
	struct cdev *dev;
	struct file *fp;
	int error;

	kshim_init();
	td = curthread;
	dev_lock();
	LIST_FOREACH(dev, &cdevs, si_list) {
		if (strcmp(dev->si_name, name) == 0 && !dev->si_destroyed)
			break;
	}
	if (dev == NULL) {
		mtx_unlock(&devmtx);
		return (ENOENT);
	}
	dev->si_refs++;
	dev->si_threadcount++;
	mtx_unlock(&devmtx);

	kf = kshim_malloc(sizeof(*kf), M_KSHIM, M_WAITOK | M_ZERO, __FILE__,
	    __LINE__);
	fp = &kf->kf_file;
	fp->f_dev = dev;
	fp->f_flag = fflags & (FREAD | FWRITE);
	dev_lock();
	LIST_INSERT_HEAD(&files, fp, f_list);
	nfiles++;
	mtx_unlock(&devmtx);
	td->td_fpop = fp;
	error = 0;
	if (dev->si_devsw->d_open != NULL)
		error = dev->si_devsw->d_open(dev, fp->f_flag, KSHIM_DEVTYPE,
		    td);
	dev_exit(fp);
	if (error != 0) {
		kshim_dev_close(kf);
		return (syscall_return(td, error));
	}
	*fpp = kf;
	return (syscall_return(td, 0));
}

int
kshim_dev_ioctl(struct kshim_file *kf, unsigned long cmd, void *data)
{
	struct thread *td;
	struct file *fp;
	size_t size;
	void *kdata;
	int error;

	td = curthread;
	fp = &kf->kf_file;
	size = IOCPARM_LEN(cmd);
	if ((cmd & (IOC_IN | IOC_OUT)) == 0 || size == 0)
		return (syscall_return(td, KERR_ENOTTY));
	if (data == NULL)
		return (syscall_return(td, KERR_EFAULT));
	error = dev_enter(fp);
	if (error != 0)
		return (syscall_return(td, error));
	kdata = kshim_malloc(size, M_KSHIM, M_WAITOK | M_ZERO, __FILE__,
	    __LINE__);
	/* The system call's own copies: never injected faults. */
	if ((cmd & IOC_IN) != 0)
		memcpy(kdata, data, size);
	td->td_fpop = fp;
	if (fp->f_dev->si_devsw->d_ioctl != NULL)
		error = fp->f_dev->si_devsw->d_ioctl(fp->f_dev, cmd, kdata,
		    fp->f_flag, td);
	else
		error = KERR_ENOTTY;
	td->td_fpop = NULL;
	if (error == 0 && (cmd & IOC_OUT) != 0)
		memcpy(data, kdata, size);
	kshim_free(kdata, M_KSHIM, __FILE__, __LINE__);
	dev_exit(fp);
	return (syscall_return(td, error));
}

/* The last close of the file: its cdevpriv destructor runs. */
void
kshim_dev_close(struct kshim_file *kf)
{
	struct thread *td;
	struct cdev *dev;
	struct file *fp;
	d_priv_dtor_t *dtr;
	void *priv;
	int destroyed;

	td = curthread;
	fp = &kf->kf_file;
	dev = fp->f_dev;
	dev_lock();
	priv = fp->f_cdevpriv;
	dtr = fp->f_cdevpriv_dtr;
	fp->f_cdevpriv = NULL;
	fp->f_cdevpriv_dtr = NULL;
	destroyed = dev->si_destroyed;
	mtx_unlock(&devmtx);
	td->td_fpop = fp;
	if (priv != NULL)
		dtr(priv);
	if (!destroyed && dev->si_devsw->d_close != NULL &&
	    dev_enter(fp) == 0) {
		(void)dev->si_devsw->d_close(dev, fp->f_flag,
		    KSHIM_DEVTYPE, td);
		dev_exit(fp);
	}
	dev_lock();
	LIST_REMOVE(fp, f_list);
	nfiles--;
	dev_rele_locked(dev);
	mtx_unlock(&devmtx);
	kshim_free(kf, M_KSHIM, __FILE__, __LINE__);
	(void)syscall_return(td, 0);
}

/*
 * copy(9).
 */
int
_copyin(const void *uaddr, void *kaddr, size_t len, const char *file,
    int line)
{

	kshim_witness_sleep("copyin", NULL, file, line);
	if (len == 0)
		return (0);
	if (uaddr == NULL || kshim_fail_check(KSHIM_FAIL_COPYIN))
		return (KERR_EFAULT);
	if (kaddr == NULL)
		panic("copyin to a NULL kernel address at %s:%d", file, line);
	memcpy(kaddr, uaddr, len);
	return (0);
}

int
_copyout(const void *kaddr, void *uaddr, size_t len, const char *file,
    int line)
{

	kshim_witness_sleep("copyout", NULL, file, line);
	if (len == 0)
		return (0);
	if (uaddr == NULL || kshim_fail_check(KSHIM_FAIL_COPYOUT))
		return (KERR_EFAULT);
	if (kaddr == NULL)
		panic("copyout from a NULL kernel address at %s:%d", file,
		    line);
	memcpy(uaddr, kaddr, len);
	return (0);
}
