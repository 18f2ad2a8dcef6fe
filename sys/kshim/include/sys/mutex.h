/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * <sys/mutex.h> of the kernel shim: the module's #include resolves here (this
 * directory comes first in its include path); see ../../kshim_kern.h.
 */

#ifndef _KSHIM_SYS_MUTEX_H
#define	_KSHIM_SYS_MUTEX_H

#include "../../kshim_kern.h"

#endif	/* !_KSHIM_SYS_MUTEX_H */
