/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * kshim_rename.h: forced ahead of kmod/g_hast.c and kmod/hast_core.c when
 * the shim builds them (-include), so that this copy of the core and of
 * its kernel shim functions links next to the userland copy of the same
 * core (hast-sys, with sys/csrc/hast_shim_user.c) in one program.  A
 * function added to hast_core.h or hast_shim.h must be added here, or the
 * link fails with a duplicate symbol.
 */

#ifndef _KSHIM_RENAME_H_
#define	_KSHIM_RENAME_H_

#define	hast_core_create		kmod_hast_core_create
#define	hast_core_destroy		kmod_hast_core_destroy
#define	hast_core_submit		kmod_hast_core_submit
#define	hast_core_flush			kmod_hast_core_flush
#define	hast_core_local_done		kmod_hast_core_local_done
#define	hast_core_remote_received	kmod_hast_core_remote_received
#define	hast_core_remote_done		kmod_hast_core_remote_done
#define	hast_core_map_done		kmod_hast_core_map_done
#define	hast_core_bump_done		kmod_hast_core_bump_done
#define	hast_core_link			kmod_hast_core_link
#define	hast_core_set_syncdir		kmod_hast_core_set_syncdir
#define	hast_core_set_mode		kmod_hast_core_set_mode
#define	hast_core_upcall_next		kmod_hast_core_upcall_next
#define	hast_core_map_size		kmod_hast_core_map_size
#define	hast_core_nextents		kmod_hast_core_nextents
#define	hast_core_map_get		kmod_hast_core_map_get
#define	hast_core_map_load		kmod_hast_core_map_load
#define	hast_core_map_merge		kmod_hast_core_map_merge
#define	hast_core_sync_lock		kmod_hast_core_sync_lock
#define	hast_core_sync_io		kmod_hast_core_sync_io
#define	hast_core_sync_release		kmod_hast_core_sync_release
#define	hast_core_stats			kmod_hast_core_stats

#define	hast_shim_lock_alloc		kmod_hast_shim_lock_alloc
#define	hast_shim_lock_free		kmod_hast_shim_lock_free
#define	hast_shim_lock			kmod_hast_shim_lock
#define	hast_shim_unlock		kmod_hast_shim_unlock
#define	hast_shim_alloc			kmod_hast_shim_alloc
#define	hast_shim_free			kmod_hast_shim_free
#define	hast_shim_wakeup		kmod_hast_shim_wakeup
#define	hast_shim_time_ns		kmod_hast_shim_time_ns
#define	hast_shim_assert_fail		kmod_hast_shim_assert_fail

#endif	/* !_KSHIM_RENAME_H_ */
