/*
 * token.c: where access tokens are refreshed.
 *
 * A refresh can spend a single-use refresh token (Airtable always, Salesforce
 * and others when rotation is on): the new one must be committed, whatever
 * happens next. The worker commits it in a transaction of its own. A user's
 * backend (sync.add_collection describing a collection) cannot: its
 * transaction may still roll back and bring the spent token back. So a
 * backend asks its database's worker to refresh, waits, and reads the token
 * the worker committed -- unless the source (or its credentials) is new in
 * the backend's own transaction: the worker cannot see it, and a rollback
 * discards the source together with the token.
 */
#include "sync.h"

#include "access/transam.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "storage/latch.h"
#include "utils/timestamp.h"
#include "utils/snapmgr.h"
#include "access/xact.h"

#define SYNC_REFRESH_WAIT_MS 90000

bool		sync_is_worker = false;

/* Read the token the worker committed (a new statement sees its commit). */
static void
reload_token(SyncSource *source)
{
	Oid			argtype = INT4OID;
	Datum		arg = Int32GetDatum(source->id);
	char	   *text = NULL;
	int			ret;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ret = SPI_execute_with_args("SELECT token, credentials FROM sync.source_secrets WHERE source_id = $1",
								1, &argtype, &arg, NULL, false, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read sync.source_secrets: %s", SPI_result_code_string(ret));
	if (SPI_processed == 1)
	{
		char	   *credentials = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);

		text = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
		json_decref(source->token);
		source->token = text ? sync_json_parse(text, strlen(text), "source token") : NULL;
		if (credentials)
		{
			json_decref(source->credentials);
			source->credentials = sync_json_parse(credentials, strlen(credentials), "source credentials");
		}
	}
	SPI_finish();
}

static void
refresh_through_worker(SyncSource *source)
{
	SyncDatabaseSlot *slot;
	Latch	   *latch = NULL;
	uint64		ticket = 0;
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), SYNC_REFRESH_WAIT_MS);
	char		error[256] = "";
	int			sqlstate = 0;

	for (;;)
	{
		bool		posted = false;
		bool		done = false;

		LWLockAcquire(sync_shared_lock, LW_EXCLUSIVE);
		slot = sync_slot_find(MyDatabaseId);
		if (slot && slot->worker_pid == 0 &&
			(slot->state == SYNC_SLOT_WANTED || slot->state == SYNC_SLOT_RUNNING) &&
			GetCurrentTimestamp() < deadline)
		{
			/* the worker is being started (CREATE EXTENSION just committed): wait for it */
			LWLockRelease(sync_shared_lock);
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 50, PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
			CHECK_FOR_INTERRUPTS();
			continue;
		}
		if (slot == NULL || slot->worker_pid == 0)
		{
			LWLockRelease(sync_shared_lock);
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("cannot refresh the token of source \"%s\": this database's sync worker is not running",
							source->name),
					 errdetail("Tokens are refreshed by the worker, so that a new refresh token is saved even if this transaction rolls back."),
					 errhint("Check that sync is in shared_preload_libraries and see sync.worker_pid().")));
		}
		if (ticket == 0 && slot->refresh_requested == slot->refresh_done)
		{
			slot->refresh_source_id = source->id;
			ticket = ++slot->refresh_requested;
			posted = true;
		}
		else if (ticket != 0 && slot->refresh_done >= ticket)
		{
			done = true;
			strlcpy(error, slot->refresh_error, sizeof(error));
			sqlstate = slot->refresh_sqlstate;
		}
		latch = slot->worker_latch;
		LWLockRelease(sync_shared_lock);
		if (posted && latch)
			SetLatch(latch);
		if (done)
			break;
		if (GetCurrentTimestamp() >= deadline)
			ereport(ERROR,
					(errcode(ERRCODE_QUERY_CANCELED),
					 errmsg("timed out waiting for the sync worker to refresh the token of source \"%s\"", source->name)));
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 50, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
	if (error[0])
		ereport(ERROR,
				(errcode(sqlstate ? sqlstate : ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
				 errmsg("could not refresh the token of source \"%s\": %s", source->name, error)));
	reload_token(source);
}

/*
 * Whether this transaction wrote the source's secrets (created the source,
 * or gave it new credentials): the worker cannot see them yet, and a
 * rollback discards them together with any token refreshed with them.
 */
static bool
secrets_written_by_this_transaction(SyncSource *source)
{
	Oid			argtype = INT4OID;
	Datum		arg = Int32GetDatum(source->id);
	bool		mine = false;
	int			ret;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ret = SPI_execute_with_args("SELECT xmin FROM sync.source_secrets WHERE source_id = $1",
								1, &argtype, &arg, NULL, true, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read sync.source_secrets: %s", SPI_result_code_string(ret));
	if (SPI_processed == 1)
	{
		bool		isnull;
		Datum		xmin = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

		mine = !isnull && TransactionIdIsCurrentTransactionId(DatumGetTransactionId(xmin));
	}
	SPI_finish();
	return mine;
}

/*
 * Refresh a source's access token. In a worker the provider refreshes and
 * commits at once; in a user's backend the worker does it, unless the source
 * is this transaction's own.
 */
void
sync_refresh_token(SyncSource *source, SyncPage *page)
{
	if (source->provider->refresh_token == NULL)
		return;
	if (sync_is_worker || secrets_written_by_this_transaction(source))
		source->provider->refresh_token(source, page);
	else
		refresh_through_worker(source);
}

/* Load a source in a short transaction and refresh its token (the provider commits it). */
static void
refresh_source_now(int32 source_id)
{
	MemoryContext ctx = CurrentMemoryContext;
	SyncSource *source;

	StartTransactionCommand();
	sync_lock_extension();
	MemoryContextSwitchTo(ctx);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
	source = sync_load_source(source_id);
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(ctx);
	PG_TRY();
	{
		if (source->provider && source->provider->refresh_token)
			source->provider->refresh_token(source, NULL);
	}
	PG_FINALLY();
	{
		sync_free_source(source);
	}
	PG_END_TRY();
}

/* In the worker, between steps: serve a backend's refresh request, if any. */
void
sync_worker_serve_token_refresh(void)
{
	SyncDatabaseSlot *slot;
	volatile int32 source_id = 0;
	volatile uint64 ticket = 0;
	char		error[256] = "";
	volatile int sqlstate = 0;
	MemoryContext ctx = CurrentMemoryContext;

	LWLockAcquire(sync_shared_lock, LW_SHARED);
	slot = sync_slot_find(MyDatabaseId);
	if (slot && slot->refresh_requested > slot->refresh_done)
	{
		source_id = slot->refresh_source_id;
		ticket = slot->refresh_requested;
	}
	LWLockRelease(sync_shared_lock);
	if (ticket == 0)
		return;

	PG_TRY();
	{
		refresh_source_now(source_id);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(ctx);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		strlcpy(error, edata->message ? edata->message : "unknown error", sizeof(error));
		sqlstate = edata->sqlerrcode;
	}
	PG_END_TRY();

	LWLockAcquire(sync_shared_lock, LW_EXCLUSIVE);
	slot = sync_slot_find(MyDatabaseId);
	if (slot)
	{
		strlcpy(slot->refresh_error, error, sizeof(slot->refresh_error));
		slot->refresh_sqlstate = sqlstate;
		slot->refresh_done = ticket;
	}
	LWLockRelease(sync_shared_lock);
}
