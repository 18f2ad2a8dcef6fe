/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * hast_abi.h: the one ABI between the fast-path core's host (the geom_hast
 * kernel module on FreeBSD, uhost in userland) and the replication engine.
 *
 * The same structures travel two ways: as ioctl arguments on /dev/hastctl
 * (FreeBSD kernel host) and as plain in-process values (uhost, tests).
 * Fixed-width types only, explicit padding, every struct a multiple of
 * 8 bytes and well under IOCPARM_MAX (8 KiB).  Bulk data (map bitmaps,
 * request payloads) never lives inside a struct: it sits behind a user
 * address (uint64_t) that the kernel moves with copyin/copyout.
 *
 * Defining HAST_ABI_NO_IOCTL before including this file leaves out the
 * ioctl numbers and with them every OS header (the portable core does so).
 */

#ifndef _HAST_ABI_H_
#define	_HAST_ABI_H_

#if defined(_KERNEL) && defined(__FreeBSD__)
#include <sys/types.h>
#else
#include <stdint.h>
#endif

/* Bumped on every incompatible change of a struct or command below. */
#define	HAST_ABI_VERSION	3

/* Roles, as on the control socket (HAST_ROLE_* of hastd). */
#define	HAST_ABI_ROLE_INIT	1
#define	HAST_ABI_ROLE_PRIMARY	2
#define	HAST_ABI_ROLE_SECONDARY	3

/* Request commands; the numbers are those of the wire protocol (cmd). */
#define	HAST_CMD_READ		1
#define	HAST_CMD_WRITE		2
#define	HAST_CMD_DELETE		3
#define	HAST_CMD_FLUSH		4

/* Replication modes; the numbers are hastd's HAST_REPLICATION_*. */
#define	HAST_REPL_FULLSYNC	0
#define	HAST_REPL_MEMSYNC	1
#define	HAST_REPL_ASYNC		2

/* Link state between this node and its peer. */
#define	HAST_LINK_DOWN		0
#define	HAST_LINK_UP		1

/*
 * Synchronization direction.  FROM_PEER means the local copy of every extent
 * in the sync map is stale: reads of those extents are served by the peer.
 */
#define	HAST_SYNC_NONE		0
#define	HAST_SYNC_TO_PEER	1
#define	HAST_SYNC_FROM_PEER	2

/* Which bitmap a map fetch returns. */
#define	HAST_MAP_SYNC		1	/* extents to resynchronize */
#define	HAST_MAP_DISK		2	/* the bytes last written to disk */
#define	HAST_MAP_DIRTY		3	/* what the next map write would write */

/*
 * Upcalls: core -> engine.  READ/WRITE/DELETE/FLUSH carry the command
 * numbers above and ask the engine to send that request to the peer.
 */
#define	HAST_UP_READ		HAST_CMD_READ	/* serve this read from the peer */
#define	HAST_UP_WRITE		HAST_CMD_WRITE	/* replicate this write */
#define	HAST_UP_DELETE		HAST_CMD_DELETE	/* replicate this delete */
#define	HAST_UP_FLUSH		HAST_CMD_FLUSH	/* flush the peer's disk */
#define	HAST_UP_BUMP		16	/* persist localcnt + 1 (outage begins) */
#define	HAST_UP_SYNC_LOCKED	17	/* sync range lock hu_seq granted */
#define	HAST_UP_SYNC_IO_DONE	18	/* sync local I/O hu_seq finished */

/* hu_flags */
#define	HAST_UPF_MEMSYNC	0x00000001	/* ask the peer for "received" */

struct hast_abi_upcall {
	uint32_t	hu_version;	/* HAST_ABI_VERSION */
	uint32_t	hu_kind;	/* HAST_UP_* */
	uint64_t	hu_unit;	/* ioctl: instance (hc_unit) */
	uint64_t	hu_seq;		/* request, lock or sync I/O id */
	uint64_t	hu_offset;	/* byte offset in the data area */
	uint64_t	hu_length;	/* bytes */
	uint64_t	hu_cookie;	/* host cookie (in-process hosts only) */
	int32_t		hu_error;	/* SYNC_IO_DONE: errno, 0 on success */
	uint32_t	hu_flags;	/* HAST_UPF_* */
	uint64_t	hu_data;	/* ioctl: user buffer for WRITE payload */
	uint64_t	hu_datalen;	/* ioctl: in size of hu_data, out bytes */
};

/* Downcalls: engine -> core, by hd_kind. */
#define	HAST_DOWN_REMOTE_DONE	1	/* hd_seq finished on the peer */
#define	HAST_DOWN_REMOTE_RECV	2	/* hd_seq received by the peer */
#define	HAST_DOWN_BUMP_DONE	3	/* localcnt bump persisted (hd_error) */
#define	HAST_DOWN_LINK		4	/* hd_arg: HAST_LINK_* */
#define	HAST_DOWN_SYNCDIR	5	/* hd_arg: HAST_SYNC_* */
#define	HAST_DOWN_MODE		6	/* hd_arg: HAST_REPL_* */
#define	HAST_DOWN_FLUSH		7	/* start the core's own flush of both
					   sides; out hd_seq: its number */

struct hast_abi_downcall {
	uint32_t	hd_version;	/* HAST_ABI_VERSION */
	uint32_t	hd_kind;	/* HAST_DOWN_* */
	uint64_t	hd_unit;	/* ioctl: instance (hc_unit) */
	uint64_t	hd_seq;
	int32_t		hd_error;	/* errno, 0 on success */
	uint32_t	hd_arg;
	uint64_t	hd_data;	/* ioctl: READ data from the peer */
	uint64_t	hd_datalen;
};

/* Sync range operations, by hr_op. */
#define	HAST_RANGE_LOCK		1	/* out hr_seq; granted by SYNC_LOCKED */
#define	HAST_RANGE_IO		2	/* hr_seq lock; out hr_ioseq */
#define	HAST_RANGE_RELEASE	3	/* hr_flags: HAST_RANGEF_CLEAR */

#define	HAST_RANGEF_CLEAR	0x00000001	/* mark covered extents clean */

struct hast_abi_range {
	uint32_t	hr_version;	/* HAST_ABI_VERSION */
	uint32_t	hr_op;		/* HAST_RANGE_* */
	uint64_t	hr_unit;	/* ioctl: instance (hc_unit) */
	uint64_t	hr_seq;		/* lock id */
	uint64_t	hr_ioseq;	/* out: sync I/O id (HAST_RANGE_IO) */
	uint64_t	hr_offset;
	uint64_t	hr_length;
	uint32_t	hr_cmd;		/* HAST_CMD_READ or HAST_CMD_WRITE */
	uint32_t	hr_flags;	/* HAST_RANGEF_* */
	uint64_t	hr_data;	/* ioctl: user buffer of hr_length bytes */
};

/*
 * Bitmap transfer: fetch (HAST_MAP_*), load at start, merge the peer's.
 * METADATA writes hm_size bytes (whole sectors, ending at or before the
 * activemap) at offset 0 of the local provider and flushes: the engine
 * cannot write the disk the module holds open exclusively.
 */
#define	HAST_MAPOP_GET		1
#define	HAST_MAPOP_LOAD		2
#define	HAST_MAPOP_MERGE	3
#define	HAST_MAPOP_METADATA	4	/* write the metadata block, flush */

struct hast_abi_map {
	uint32_t	hm_version;	/* HAST_ABI_VERSION */
	uint32_t	hm_op;		/* HAST_MAPOP_* */
	uint32_t	hm_which;	/* HAST_MAP_* for GET */
	uint32_t	hm_size;	/* bytes at hm_data */
	uint64_t	hm_unit;	/* ioctl: instance (hc_unit) */
	uint64_t	hm_data;	/* user buffer */
};

#define	HAST_ABI_NAMELEN	64

/* Create a provider (kernel host) around one core instance. */
struct hast_abi_create {
	uint32_t	hc_version;	/* HAST_ABI_VERSION */
	uint32_t	hc_mode;	/* HAST_REPL_* */
	char		hc_name[HAST_ABI_NAMELEN];	/* provider name */
	char		hc_local[HAST_ABI_NAMELEN];	/* local provider */
	uint64_t	hc_mediasize;	/* datasize */
	uint64_t	hc_localoff;	/* data offset on the local provider */
	uint64_t	hc_mapoff;	/* activemap offset (4096) */
	uint32_t	hc_extentsize;
	uint32_t	hc_keepdirty;
	uint32_t	hc_sectorsize;
	uint32_t	hc_flags;	/* HAST_CREATEF_* */
	uint64_t	hc_unit;	/* out (CREATE), in (DESTROY): instance */
	uint64_t	hc_map;		/* CREATE: the on-disk activemap, loaded */
	uint32_t	hc_mapsize;	/* before hast/NAME appears (0: none) */
	uint32_t	hc_pad0;
};

#define	HAST_CREATEF_METAFLUSH	0x00000001	/* flush after map writes */

struct hast_abi_stats {
	uint32_t	hs_version;	/* HAST_ABI_VERSION */
	uint32_t	hs_pad0;
	uint64_t	hs_unit;	/* ioctl: instance (hc_unit) */
	uint64_t	hs_reads;
	uint64_t	hs_writes;
	uint64_t	hs_deletes;
	uint64_t	hs_flushes;
	uint64_t	hs_activemap_updates;	/* map writes issued */
	uint64_t	hs_read_errors;		/* local */
	uint64_t	hs_write_errors;
	uint64_t	hs_delete_errors;
	uint64_t	hs_flush_errors;
	uint64_t	hs_q_local;	/* local I/O issued, not done */
	uint64_t	hs_q_send;	/* upcalls waiting for the engine */
	uint64_t	hs_q_recv;	/* remote requests taken, not done */
	uint64_t	hs_q_done;	/* acknowledged, not yet released */
	uint64_t	hs_q_held;	/* waiting: range lock, bump or map */
	uint64_t	hs_q_mapwait;	/* of which waiting for a map write */
	uint64_t	hs_dirty;	/* extents dirty (pending or to sync) */
	uint64_t	hs_syncdirty;	/* extents in the sync map */
	uint64_t	hs_keepdirty;	/* extents in the keepdirty list */
	uint64_t	hs_sync_locks;	/* sync range locks held or waiting */
	uint64_t	hs_oldest_ns;	/* age of the oldest open request */
	uint32_t	hs_link;	/* HAST_LINK_* */
	uint32_t	hs_syncdir;	/* HAST_SYNC_* */
	uint32_t	hs_mode;	/* HAST_REPL_* */
	uint32_t	hs_flush_busy;	/* the core's own flush in flight */
	uint64_t	hs_unsynced;	/* live updates whose remote copy
					   failed or never left: their
					   extents join the sync map */
	uint64_t	hs_unflushed;	/* extents that wait for flushes of
					   both sides to leave the map:
					   not yet covered by one, or hot
					   (written during the last few) */
	uint32_t	hs_flush_gen;	/* flushes of both sides started */
	uint32_t	hs_flush_done;	/* the latest one that finished on
					   both sides (covers writes
					   finished before it started) */
};

#ifndef HAST_ABI_NO_IOCTL
#if defined(__FreeBSD__)
#include <sys/ioccom.h>
#elif defined(__linux__) && defined(__KERNEL__)
#include <linux/ioctl.h>
#elif defined(__linux__)
#include <sys/ioctl.h>
#endif

#ifdef _IOWR
#define	HAST_IOC_GROUP		'H'
#define	HAST_IOC_CREATE		_IOWR(HAST_IOC_GROUP, 1, struct hast_abi_create)
#define	HAST_IOC_DESTROY	_IOWR(HAST_IOC_GROUP, 2, struct hast_abi_create)
#define	HAST_IOC_UPCALL		_IOWR(HAST_IOC_GROUP, 3, struct hast_abi_upcall)
#define	HAST_IOC_DOWNCALL	_IOWR(HAST_IOC_GROUP, 4, struct hast_abi_downcall)
#define	HAST_IOC_RANGE		_IOWR(HAST_IOC_GROUP, 5, struct hast_abi_range)
#define	HAST_IOC_MAP		_IOWR(HAST_IOC_GROUP, 6, struct hast_abi_map)
#define	HAST_IOC_STATS		_IOWR(HAST_IOC_GROUP, 7, struct hast_abi_stats)
#endif	/* _IOWR */
#endif	/* !HAST_ABI_NO_IOCTL */

#endif	/* !_HAST_ABI_H_ */
