/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * kmod_g_hast.c: the geom_hast module's GEOM glue, kmod/g_hast.c, compiled
 * unchanged as part of the shim (its #includes resolve to include/).  The
 * symbol below is what kshim_load() refers to, so that a program that
 * loads the module links the module's objects (and their DECLARE_MODULE
 * registrations) in.
 */

#include "g_hast.c"

extern const int kshim_kmod_linked;
const int kshim_kmod_linked = 1;
