/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * hast_abi.h: the one ABI between the fast-path core's host (the geom_hast
 * kernel module on FreeBSD, uhost in userland) and the replication engine.
 * Fixed-width types only; no kernel or libc headers beyond <stdint.h>.
 */

#ifndef _HAST_ABI_H_
#define	_HAST_ABI_H_

/* Bumped on every incompatible change of a struct or command below. */
#define	HAST_ABI_VERSION	1

/* Roles, as on the control socket (HAST_ROLE_* of hastd). */
#define	HAST_ABI_ROLE_INIT	1
#define	HAST_ABI_ROLE_PRIMARY	2
#define	HAST_ABI_ROLE_SECONDARY	3

#endif	/* !_HAST_ABI_H_ */
