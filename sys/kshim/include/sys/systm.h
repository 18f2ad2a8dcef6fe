/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * <sys/systm.h> of the kernel shim: the module's #include resolves here (this
 * directory comes first in its include path); see ../../kshim_kern.h.
 */

#ifndef _KSHIM_SYS_SYSTM_H
#define	_KSHIM_SYS_SYSTM_H

#include "../../kshim_kern.h"

/* The kernel console. */
#define	printf(...)	kshim_printf(__VA_ARGS__)

#endif	/* !_KSHIM_SYS_SYSTM_H */
