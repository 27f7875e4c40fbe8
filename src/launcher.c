/*
 * launcher.c: the launcher background worker. It keeps one sync worker running
 * in every database where the extension is installed. It cannot read a
 * database's catalogs, so it starts a worker in each database once; a worker
 * that finds no extension says so in its slot and exits, and CREATE EXTENSION
 * asks for a worker again at commit.
 */
#include "sync.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

/* Pause before restarting a worker that exited with an error. */
#define SYNC_RESTART_DELAY_MS 5000

static BackgroundWorkerHandle **launcher_handles;

void
sync_register_launcher(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 10;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "sync");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "sync_launcher_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "sync launcher");
	snprintf(worker.bgw_type, BGW_MAXLEN, "sync launcher");
	RegisterBackgroundWorker(&worker);
}

static void
launcher_detach(int code, Datum arg)
{
	LWLockAcquire(sync_shared_lock, LW_EXCLUSIVE);
	sync_shared->launcher_latch = NULL;
	sync_shared->launcher_pid = 0;
	LWLockRelease(sync_shared_lock);
}

/*
 * Give every connectable database a slot (new ones are probed) and free the
 * slots of databases that no longer exist.
 */
static void
launcher_scan_databases(bool probe_all)
{
	Relation	rel;
	SysScanDesc scan;
	HeapTuple	tup;
	Oid		   *live;
	int			nlive = 0;
	int			cap = 16;
	bool		out_of_slots = false;

	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	live = palloc(sizeof(Oid) * cap);
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = systable_beginscan(rel, InvalidOid, false, NULL, 0, NULL);
	while (HeapTupleIsValid(tup = systable_getnext(scan)))
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tup);

		if (!db->datallowconn || db->datistemplate)
			continue;
		if (nlive == cap)
		{
			cap *= 2;
			live = repalloc(live, sizeof(Oid) * cap);
		}
		live[nlive++] = db->oid;
	}
	systable_endscan(scan);
	table_close(rel, AccessShareLock);

	LWLockAcquire(sync_shared_lock, LW_EXCLUSIVE);
	for (int i = 0; i < nlive; i++)
	{
		SyncDatabaseSlot *slot = sync_slot_find(live[i]);

		if (slot == NULL)
		{
			slot = sync_slot_find_or_add(live[i]);
			if (slot == NULL)
			{
				out_of_slots = true;
				continue;
			}
			slot->state = SYNC_SLOT_WANTED;
		}
		else if (probe_all && slot->state == SYNC_SLOT_NO_EXTENSION)
			slot->state = SYNC_SLOT_WANTED;
	}
	for (int i = 0; i < sync_shared->nslots; i++)
	{
		SyncDatabaseSlot *slot = &sync_shared->slots[i];
		bool		exists = false;

		if (slot->state == SYNC_SLOT_FREE || slot->state == SYNC_SLOT_RUNNING)
			continue;
		for (int j = 0; j < nlive && !exists; j++)
			exists = (live[j] == slot->dboid);
		if (!exists)
			slot->state = SYNC_SLOT_FREE;
	}
	LWLockRelease(sync_shared_lock);
	CommitTransactionCommand();

	if (out_of_slots)
		ereport(LOG,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("sync launcher has no free database slot"),
				 errhint("Increase sync.max_databases and restart the server.")));
}

static bool
launcher_start_worker(int slotno, Oid dboid)
{
	BackgroundWorker worker;
	BackgroundWorkerHandle *handle;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "sync");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "sync_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "sync worker for database %u", dboid);
	snprintf(worker.bgw_type, BGW_MAXLEN, "sync worker");
	worker.bgw_main_arg = ObjectIdGetDatum(dboid);
	worker.bgw_notify_pid = MyProcPid;

	if (!RegisterDynamicBackgroundWorker(&worker, &handle))
		return false;
	launcher_handles[slotno] = handle;
	return true;
}

/* Notice workers that exited, and start the ones that are wanted. */
static long
launcher_manage_workers(void)
{
	TimestampTz now = GetCurrentTimestamp();
	long		next_ms = sync_launcher_naptime_s * 1000L;
	bool		no_bgworker_slots = false;

	for (int i = 0; i < sync_shared->nslots; i++)
	{
		SyncDatabaseSlot *slot = &sync_shared->slots[i];
		BackgroundWorkerHandle *handle = launcher_handles[i];

		if (handle != NULL)
		{
			pid_t		pid;

			if (GetBackgroundWorkerPid(handle, &pid) != BGWH_STOPPED)
				continue;
			pfree(handle);
			launcher_handles[i] = NULL;
			LWLockAcquire(sync_shared_lock, LW_EXCLUSIVE);
			slot->worker_pid = 0;
			slot->worker_latch = NULL;
			if (slot->state == SYNC_SLOT_RUNNING)
			{
				/* It exited without saying why: an error. Restart after a pause. */
				slot->state = SYNC_SLOT_WANTED;
				if (slot->not_before < TimestampTzPlusMilliseconds(now, SYNC_RESTART_DELAY_MS))
					slot->not_before = TimestampTzPlusMilliseconds(now, SYNC_RESTART_DELAY_MS);
			}
			LWLockRelease(sync_shared_lock);
		}

		/* A worker started by an earlier launcher, which we hold no handle for, exited. */
		if (handle == NULL && slot->state == SYNC_SLOT_RUNNING && slot->worker_pid == 0)
		{
			LWLockAcquire(sync_shared_lock, LW_EXCLUSIVE);
			slot->state = SYNC_SLOT_WANTED;
			LWLockRelease(sync_shared_lock);
		}

		if (slot->state == SYNC_SLOT_WANTED && launcher_handles[i] == NULL)
		{
			if (slot->not_before > now)
			{
				long		wait = (slot->not_before - now) / 1000 + 1;

				next_ms = Min(next_ms, wait);
				continue;
			}
			if (no_bgworker_slots)
				continue;
			LWLockAcquire(sync_shared_lock, LW_EXCLUSIVE);
			slot->state = SYNC_SLOT_RUNNING;
			slot->requested = false;
			LWLockRelease(sync_shared_lock);
			if (!launcher_start_worker(i, slot->dboid))
			{
				LWLockAcquire(sync_shared_lock, LW_EXCLUSIVE);
				slot->state = SYNC_SLOT_WANTED;
				slot->not_before = TimestampTzPlusMilliseconds(now, SYNC_RESTART_DELAY_MS);
				LWLockRelease(sync_shared_lock);
				no_bgworker_slots = true;
				next_ms = Min(next_ms, SYNC_RESTART_DELAY_MS);
			}
		}
	}
	if (no_bgworker_slots)
		ereport(LOG,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("could not start a sync worker: no background worker slot is free"),
				 errhint("Increase max_worker_processes; sync needs one per database that uses it, plus the launcher.")));
	return next_ms;
}

void
sync_launcher_main(Datum arg)
{
	TimestampTz last_scan = 0;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	pgstat_report_appname("sync launcher");

	launcher_handles = MemoryContextAllocZero(TopMemoryContext,
											  sizeof(BackgroundWorkerHandle *) * sync_shared->nslots);

	LWLockAcquire(sync_shared_lock, LW_EXCLUSIVE);
	sync_shared->launcher_pid = MyProcPid;
	sync_shared->launcher_latch = MyLatch;
	/* Workers of a previous launcher are ours now: we have no handles for them. */
	for (int i = 0; i < sync_shared->nslots; i++)
		if (sync_shared->slots[i].state == SYNC_SLOT_RUNNING && sync_shared->slots[i].worker_pid == 0)
			sync_shared->slots[i].state = SYNC_SLOT_WANTED;
	LWLockRelease(sync_shared_lock);
	before_shmem_exit(launcher_detach, 0);

	ereport(LOG, (errmsg("sync launcher started")));
	launcher_scan_databases(true);

	for (;;)
	{
		long		timeout_ms;
		TimestampTz now;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		now = GetCurrentTimestamp();
		if (TimestampDifferenceExceeds(last_scan, now, sync_launcher_naptime_s * 1000))
		{
			launcher_scan_databases(false);
			last_scan = now;
		}
		timeout_ms = launcher_manage_workers();

		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 timeout_ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}
