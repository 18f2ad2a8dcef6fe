/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * <sys/param.h> of the kernel shim: the module's #include resolves here (this
 * directory comes first in its include path); see ../../kshim_kern.h.
 */

#ifndef _KSHIM_SYS_PARAM_H
#define	_KSHIM_SYS_PARAM_H

#include "../../kshim_kern.h"

/* FreeBSD 13.2, whose interfaces the shim follows. */
#define	__FreeBSD_version	1302000

#endif	/* !_KSHIM_SYS_PARAM_H */
