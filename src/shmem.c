/*
 * shmem.c: the little state the launcher, the workers and user backends share:
 * one slot per database (its worker's pid and latch) and the launcher's latch.
 * Wakes asked for inside a transaction are sent at commit, so a worker woken
 * by a configuration change always reads the committed change.
 */
#include "sync.h"

#include <signal.h>

#include "access/xact.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "utils/timestamp.h"

SyncShared *sync_shared = NULL;
LWLock	   *sync_shared_lock = NULL;

static bool wake_worker_pending = false;
static bool request_worker_pending = false;
static bool xact_callback_registered = false;
static bool extension_dropped_pending = false;

Size
sync_shmem_size(void)
{
	return add_size(offsetof(SyncShared, slots),
					mul_size(sizeof(SyncDatabaseSlot), sync_max_databases));
}

void
sync_shmem_request(void)
{
	RequestAddinShmemSpace(sync_shmem_size());
	RequestAddinShmemSpace(sync_budget_shmem_size());
	RequestNamedLWLockTranche("sync", 2);
}

void
sync_shmem_startup(void)
{
	bool		found;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	sync_shared = ShmemInitStruct("sync", sync_shmem_size(), &found);
	if (!found)
	{
		memset(sync_shared, 0, sync_shmem_size());
		sync_shared->nslots = sync_max_databases;
	}
	sync_shared_lock = &(GetNamedLWLockTranche("sync"))[0].lock;
	sync_budget_shmem_startup(&(GetNamedLWLockTranche("sync"))[1].lock);
	LWLockRelease(AddinShmemInitLock);
}

/* Caller holds sync_shared_lock. */
SyncDatabaseSlot *
sync_slot_find(Oid dboid)
{
	for (int i = 0; i < sync_shared->nslots; i++)
		if (sync_shared->slots[i].state != SYNC_SLOT_FREE && sync_shared->slots[i].dboid == dboid)
			return &sync_shared->slots[i];
	return NULL;
}

/* Caller holds sync_shared_lock exclusively. Returns NULL when every slot is taken. */
SyncDatabaseSlot *
sync_slot_find_or_add(Oid dboid)
{
	SyncDatabaseSlot *slot = sync_slot_find(dboid);

	if (slot)
		return slot;
	for (int i = 0; i < sync_shared->nslots; i++)
	{
		slot = &sync_shared->slots[i];
		if (slot->state == SYNC_SLOT_FREE)
		{
			memset(slot, 0, sizeof(*slot));
			slot->dboid = dboid;
			slot->state = SYNC_SLOT_NO_EXTENSION;
			return slot;
		}
	}
	return NULL;
}

void
sync_wake_launcher(void)
{
	Latch	   *latch;

	LWLockAcquire(sync_shared_lock, LW_SHARED);
	latch = sync_shared->launcher_latch;
	LWLockRelease(sync_shared_lock);
	if (latch)
		SetLatch(latch);
}

void
sync_wake_database_worker(Oid dboid)
{
	SyncDatabaseSlot *slot;
	Latch	   *latch = NULL;

	LWLockAcquire(sync_shared_lock, LW_SHARED);
	slot = sync_slot_find(dboid);
	if (slot)
		latch = slot->worker_latch;
	LWLockRelease(sync_shared_lock);
	if (latch)
		SetLatch(latch);
}

static void
sync_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (request_worker_pending && sync_shared)
			{
				SyncDatabaseSlot *slot;

				LWLockAcquire(sync_shared_lock, LW_EXCLUSIVE);
				slot = sync_slot_find_or_add(MyDatabaseId);
				if (slot)
					slot->requested = true;
				if (slot && slot->state != SYNC_SLOT_RUNNING)
				{
					slot->state = SYNC_SLOT_WANTED;
					slot->not_before = 0;
				}
				LWLockRelease(sync_shared_lock);
				sync_wake_launcher();
			}
			if (extension_dropped_pending && sync_shared)
			{
				SyncDatabaseSlot *slot;

				LWLockAcquire(sync_shared_lock, LW_EXCLUSIVE);
				slot = sync_slot_find(MyDatabaseId);
				if (slot)
					slot->extension_dropped = true;
				LWLockRelease(sync_shared_lock);
			}
			if ((wake_worker_pending || extension_dropped_pending) && sync_shared)
				sync_wake_database_worker(MyDatabaseId);
			request_worker_pending = false;
			wake_worker_pending = false;
			extension_dropped_pending = false;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			request_worker_pending = false;
			wake_worker_pending = false;
			extension_dropped_pending = false;
			break;
		default:
			break;
	}
}

static void
sync_ensure_xact_callback(void)
{
	if (!xact_callback_registered)
	{
		RegisterXactCallback(sync_xact_callback, NULL);
		xact_callback_registered = true;
	}
}

void
sync_request_worker_at_commit(void)
{
	sync_ensure_xact_callback();
	request_worker_pending = true;
	wake_worker_pending = true;
}

void
sync_wake_worker_at_commit(void)
{
	sync_ensure_xact_callback();
	wake_worker_pending = true;
}

/* The worker must not finish a request for a catalog that is gone. */
void
sync_extension_dropped_at_commit(void)
{
	sync_ensure_xact_callback();
	extension_dropped_pending = true;
}

/* Checked by a worker between curl calls. */
bool
sync_worker_extension_dropped(void)
{
	SyncDatabaseSlot *slot;
	bool		dropped = false;

	if (!sync_shared)
		return false;
	LWLockAcquire(sync_shared_lock, LW_SHARED);
	slot = sync_slot_find(MyDatabaseId);
	if (slot && slot->worker_pid == MyProcPid)
		dropped = slot->extension_dropped;
	LWLockRelease(sync_shared_lock);
	return dropped;
}

/*
 * Stop a database's worker and keep the launcher from restarting it for a
 * while; waits up to wait_ms for it to exit. Returns whether none runs.
 */
bool
sync_stop_database_worker(Oid dboid, int wait_ms)
{
	SyncDatabaseSlot *slot;
	pid_t		pid = 0;
	int			waited = 0;

	if (!sync_shared)
		return true;

	LWLockAcquire(sync_shared_lock, LW_EXCLUSIVE);
	slot = sync_slot_find(dboid);
	if (slot)
	{
		slot->not_before = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), 30000);
		pid = slot->worker_pid;
	}
	LWLockRelease(sync_shared_lock);

	if (pid == 0)
		return true;
	kill(pid, SIGTERM);

	while (waited < wait_ms)
	{
		bool		gone;

		LWLockAcquire(sync_shared_lock, LW_SHARED);
		slot = sync_slot_find(dboid);
		gone = (slot == NULL || slot->worker_pid != pid);
		LWLockRelease(sync_shared_lock);
		if (gone)
			return true;
		CHECK_FOR_INTERRUPTS();
		pg_usleep(20 * 1000L);
		waited += 20;
	}
	ereport(WARNING,
			(errmsg("sync worker with PID %d did not exit within %d ms", (int) pid, wait_ms)));
	return false;
}
