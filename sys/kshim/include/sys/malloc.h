/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * <sys/malloc.h> of the kernel shim: the module's #include resolves here (this
 * directory comes first in its include path); see ../../kshim_kern.h.
 */

#ifndef _KSHIM_SYS_MALLOC_H
#define	_KSHIM_SYS_MALLOC_H

#include "../../kshim_kern.h"

/* malloc(9) and free(9) take a type and flags: not the C library's. */
#define	malloc(size, type, flags)					\
	kshim_malloc((size), (type), (flags), __FILE__, __LINE__)
#define	free(addr, type)	kshim_free((addr), (type), __FILE__, __LINE__)

#endif	/* !_KSHIM_SYS_MALLOC_H */
