/*
 * worker.c: a database's sync worker. One process serves every source and
 * collection of its database: it picks the collection that is due and whose
 * source has budget, runs one provider step with no transaction open, and
 * commits the page with its cursor. An error in one collection is recorded
 * and backed off; it never stops the others.
 */
#include "sync.h"

#include <math.h>

#include "access/xact.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lmgr.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

/* What the worker remembers of a collection between steps. */
typedef struct ScheduleEntry
{
	int32		collection_id;	/* hash key */
	int32		source_id;
	TimestampTz next_due;
	TimestampTz last_run;
	TimestampTz walk_started_at;	/* first step since the collection was last caught up */
	bool		retrying;		/* the last step failed or was rate limited */
	bool		column_turn;	/* the next step is the column backfill's */
	int			walk_steps;		/* steps of the unfinished walk */
	int			lock_waits;		/* consecutive steps a user's lock put back */
	TimestampTz poll_seen;		/* the last webhook's request to poll now that was acted on */
	bool		seen;			/* still configured in this round */
} ScheduleEntry;

typedef struct DueCollection
{
	int32		collection_id;
	int32		source_id;
	bool		run_requested;
	int			failures;
	double		poll_interval_s;
	TimestampTz poll_requested_at;	/* a webhook asked for a poll now (webhook.c), or 0 */
} DueCollection;

static Oid	extension_oid = InvalidOid;
static bool version_mismatch_logged = false;
static HTAB *schedule = NULL;
/* a prefetch is wanted when no other collection is due for this long */
#define PREFETCH_QUIET_MS 2000

static MemoryContext loop_ctx = NULL;
static MemoryContext step_ctx = NULL;
static TimestampTz next_delivery_check = 0;	/* notifications are looked for once a second */

static void
worker_detach(int code, Datum arg)
{
	SyncDatabaseSlot *slot;

	sync_http_cleanup();
	LWLockAcquire(sync_shared_lock, LW_EXCLUSIVE);
	slot = sync_slot_find(MyDatabaseId);
	if (slot && slot->worker_pid == MyProcPid)
	{
		slot->worker_pid = 0;
		slot->worker_latch = NULL;
	}
	LWLockRelease(sync_shared_lock);
}

/*
 * Start a transaction with SPI connected; what the caller builds from query
 * results in result_ctx outlives the commit.
 */
static void
worker_begin(const char *activity, MemoryContext result_ctx)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	sync_lock_extension();
	MemoryContextSwitchTo(result_ctx);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);
}

static void
worker_commit(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * Exit quietly when the extension is gone (DROP EXTENSION, or a probe of a
 * database without it). When it was dropped and created again, exit too and
 * have the launcher start a fresh worker: ids in our schedule and plans refer
 * to the old catalog.
 */
static char *
worker_installed_version(Oid extension)
{
	char	   *version = NULL;
	Oid			types[1] = {OIDOID};
	Datum		args[1] = {ObjectIdGetDatum(extension)};

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
	if (SPI_execute_with_args("SELECT extversion FROM pg_catalog.pg_extension WHERE oid = $1",
							  1, types, args, NULL, true, 1) == SPI_OK_SELECT && SPI_processed == 1)
		version = MemoryContextStrdup(TopMemoryContext,
									  SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1));
	PopActiveSnapshot();
	SPI_finish();
	return version;
}

/*
 * Exit quietly when the extension is gone (DROP EXTENSION, or a probe of a
 * database without it). When it was dropped and created again, exit too and
 * have the launcher start a fresh worker: ids in our schedule and plans refer
 * to the old catalog. Returns false while the installed catalog is of another
 * version than this library (ALTER EXTENSION sync UPDATE not run yet): the
 * worker then waits and touches nothing, rather than misread the catalog.
 */
static bool
worker_exit_if_extension_gone(void)
{
	Oid			current;
	bool		reinstalled;
	char	   *version = NULL;
	bool		matches;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	current = creating_extension ? InvalidOid : get_extension_oid(SYNC_EXTENSION_NAME, true);
	if (OidIsValid(current))
		version = worker_installed_version(current);
	matches = version != NULL && strcmp(version, SYNC_VERSION) == 0;
	if (OidIsValid(current) && !matches && !version_mismatch_logged)
		ereport(LOG,
				(errmsg("sync: extension version %s is installed in database \"%s\", but the library is version %s; "
						"syncing waits", version ? version : "?", get_database_name(MyDatabaseId), SYNC_VERSION),
				 errhint("Run ALTER EXTENSION sync UPDATE in that database.")));
	CommitTransactionCommand();
	if (OidIsValid(current) && (!OidIsValid(extension_oid) || current == extension_oid))
	{
		extension_oid = current;
		version_mismatch_logged = !matches;
		if (version)
			pfree(version);
		return matches;
	}
	reinstalled = OidIsValid(current);

	LWLockAcquire(sync_shared_lock, LW_EXCLUSIVE);
	{
		SyncDatabaseSlot *slot = sync_slot_find(MyDatabaseId);

		if (slot)
		{
			slot->state = (slot->requested || reinstalled) ? SYNC_SLOT_WANTED : SYNC_SLOT_NO_EXTENSION;
			slot->not_before = 0;
		}
	}
	LWLockRelease(sync_shared_lock);
	sync_wake_launcher();
	proc_exit(0);
}

/* A user's lock on a synced table must delay that collection only. */
static void
worker_apply_settings(void)
{
	char		value[32];

	snprintf(value, sizeof(value), "%d", sync_lock_timeout_ms);
	SetConfigOption("lock_timeout", value, PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("TimeZone", "UTC", PGC_SUSET, PGC_S_OVERRIDE);
}

static double
option_number(const char *text, double dflt)
{
	return text ? strtod(text, NULL) : dflt;
}

/*
 * Read which collections are active. Cheap enough to do every round, which
 * spares us invalidation logic: a committed change is seen at the next wake.
 */
static List *
worker_load_active(void)
{
	List	   *result = NIL;
	int			ret;

	worker_begin("sync: reading configuration", loop_ctx);
	ret = SPI_execute("SELECT c.id, c.source_id, st.run_requested, st.consecutive_failures, "
					  "       coalesce(c.options->>'poll_interval', s.options->>'poll_interval'), "
					  "       st.poll_requested_at "
					  "FROM sync.collections c "
					  "JOIN sync.sources s ON s.id = c.source_id "
					  "JOIN sync.collection_state st ON st.collection_id = c.id "
					  "WHERE NOT c.paused AND NOT s.paused ORDER BY c.id", true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read sync.collections: %s", SPI_result_code_string(ret));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		DueCollection *d = MemoryContextAllocZero(loop_ctx, sizeof(DueCollection));
		bool		isnull;

		d->collection_id = DatumGetInt32(SPI_getbinval(tup, desc, 1, &isnull));
		d->source_id = DatumGetInt32(SPI_getbinval(tup, desc, 2, &isnull));
		d->run_requested = DatumGetBool(SPI_getbinval(tup, desc, 3, &isnull));
		d->failures = DatumGetInt32(SPI_getbinval(tup, desc, 4, &isnull));
		d->poll_interval_s = option_number(SPI_getvalue(tup, desc, 5), 0.0);
		d->poll_requested_at = DatumGetTimestampTz(SPI_getbinval(tup, desc, 6, &isnull));
		if (isnull)
			d->poll_requested_at = 0;
		result = lappend(result, d);
	}
	worker_commit();
	return result;
}

static long
backoff_ms(int failures)
{
	double		base = 1000.0 * pow(2.0, Min(failures - 1, 20));
	double		cap = sync_max_backoff_s * 1000.0;
	double		jitter = 0.9 + 0.2 * ((double) random() / (double) PG_INT32_MAX);

	return (long) (Min(base, cap) * jitter);
}

/*
 * Record a failed step with what its requests cost. A rate-limit answer is
 * no failure of the collection: the source waits out its penalty and the
 * step is tried again, so it does not count toward the error backoff.
 */
static void
worker_record_failure(int32 collection_id, ErrorData *edata, SyncPage *page, bool rate_limited)
{
	Datum		args[9];
	Oid			types[9] = {INT4OID, TEXTOID, BOOLOID, INT8OID, INT8OID, INT4OID, INT4OID, BOOLOID, INT4OID};
	StringInfoData msg;
	int			ret;

	initStringInfo(&msg);
	appendStringInfoString(&msg, edata->message ? edata->message : "unknown error");
	if (edata->detail)
		appendStringInfo(&msg, " (%s)", edata->detail);

	worker_begin("sync: recording an error", step_ctx);
	args[0] = Int32GetDatum(collection_id);
	args[1] = CStringGetTextDatum(msg.data);
	args[2] = BoolGetDatum(rate_limited);
	args[3] = Int64GetDatum((int64) page->requests);
	args[4] = Int64GetDatum(page->bytes);
	args[5] = Int32GetDatum(page->errors);
	args[6] = Int32GetDatum(page->rate_limited);
	args[7] = BoolGetDatum(page->retry);
	args[8] = Int32GetDatum(sync_notify_after_failures);
	ret = SPI_execute_with_args("WITH failed AS (UPDATE sync.collection_state SET "
								"consecutive_failures = consecutive_failures + CASE WHEN $3 THEN 0 ELSE 1 END, "
								"last_error = $2, last_error_at = now(), run_requested = false, "
								"lock_wait = NULL, "
								"activity = CASE WHEN $3 THEN 'waiting out the API''s rate limit' "
								"                ELSE 'waiting to retry after an error' END, "
								"requests = requests + $4, bytes_received = bytes_received + $5, "
								"errors = errors + $6 + CASE WHEN $3 OR $6 > 0 THEN 0 ELSE 1 END, "
								"rate_limited = rate_limited + $7, retries = retries + $8::int, "
								"cycle_requests = CASE WHEN phase = 'incremental' THEN cycle_requests + $4 "
								"                      ELSE cycle_requests END "
								"WHERE collection_id = $1 RETURNING consecutive_failures, activity) "
								/* persistent failure: tell the user once, when it crosses the threshold */
								"SELECT sync._emit('collection_failing', jsonb_build_object("
								"   'source', s.name, 'collection', c.name, 'table', c.relid::regclass::text, "
								"   'consecutive_failures', f.consecutive_failures, 'error', $2, 'at', now())) "
								"FROM failed f, sync.collections c JOIN sync.sources s ON s.id = c.source_id "
								"WHERE c.id = $1 AND NOT $3 AND f.consecutive_failures = $9",
								9, types, args, NULL, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not record a sync error: %s", SPI_result_code_string(ret));
	worker_commit();
}

/*
 * The collection as its column backfill sees it: the key, the modification
 * stamp and the columns being filled, with the column backfill's own cursor.
 */
static SyncCollection *
worker_column_backfill_view(SyncCollection *c)
{
	SyncCollection *view = palloc(sizeof(SyncCollection));
	json_t	   *wanted = json_object_get(c->column_backfill, "fields");
	json_t	   *cursor = json_object_get(c->column_backfill, "cursor");
	ListCell   *lc;

	*view = *c;
	view->fields = NIL;
	foreach(lc, c->fields)
	{
		SyncField  *f = lfirst(lc);
		bool		keep = f->is_key || f->is_version;
		size_t		i;
		json_t	   *name;

		json_array_foreach(wanted, i, name)
			if (json_is_string(name) && strcmp(json_string_value(name), f->api_field) == 0)
			keep = true;
		if (keep)
			view->fields = lappend(view->fields, f);
	}
	view->cursor = json_is_object(cursor) ? cursor : json_object();
	view->phase = "backfill";
	view->reconcile_requested = false;
	view->column_backfill = NULL;
	return view;
}

/*
 * A user's lock on the synced table conflicts with our writes: check before
 * spending a request on a page that could not be applied.
 */
static void
worker_check_table_lock(SyncCollection *c)
{
	if (!ConditionalLockRelationOid(c->relid, RowExclusiveLock))
		ereport(ERROR,
				(errcode(ERRCODE_LOCK_NOT_AVAILABLE),
				 errmsg("the table of collection \"%s\" is locked by another session", c->name)));
	UnlockRelationOid(c->relid, RowExclusiveLock);
}

/*
 * Take the table's lock before reading which columns to write, with a fresh
 * snapshot: a column dropped while we waited is then no longer among them.
 */
static void
worker_lock_table(SyncCollection *c)
{
	LockRelationOid(c->relid, RowExclusiveLock);
	PopActiveSnapshot();
	PushActiveSnapshot(GetTransactionSnapshot());
}

/*
 * The step was put back because a user holds a lock on its table (or on rows
 * of it) for longer than sync.lock_timeout: nothing was applied. It is no
 * failure of the collection; the status names the lock and who holds it.
 */
static void
worker_record_lock_wait(int32 collection_id, Oid relid, SyncPage *page)
{
	Oid			types[4] = {INT4OID, OIDOID, INT8OID, INT8OID};
	Datum		args[4];
	int			ret;

	worker_begin("sync: recording a lock wait", step_ctx);
	args[0] = Int32GetDatum(collection_id);
	args[1] = ObjectIdGetDatum(relid);
	args[2] = Int64GetDatum((int64) page->requests);
	args[3] = Int64GetDatum(page->bytes);
	ret = SPI_execute_with_args("UPDATE sync.collection_state SET "
								"lock_wait = format('lock on %s held by %s', $2::regclass, "
								"   coalesce((SELECT 'pid ' || string_agg(DISTINCT l.pid::text, ', pid ') "
								"             FROM pg_catalog.pg_locks l "
								"             WHERE l.locktype = 'relation' AND l.relation = $2 AND l.granted "
								"               AND l.database = (SELECT oid FROM pg_catalog.pg_database "
								"                                 WHERE datname = current_database()) "
								"               AND l.mode <> 'AccessShareLock' AND l.pid <> pg_backend_pid()), "
								"            'another session')), "
								"activity = 'waiting for a lock on the table', run_requested = false, "
								"requests = requests + $3, bytes_received = bytes_received + $4, "
								"cycle_requests = CASE WHEN phase = 'incremental' THEN cycle_requests + $3 "
								"                      ELSE cycle_requests END "
								"WHERE collection_id = $1",
								4, types, args, NULL, false, 0);
	if (ret != SPI_OK_UPDATE)
		elog(ERROR, "could not record a lock wait: %s", SPI_result_code_string(ret));
	worker_commit();
}

static double
worker_schema_interval(SyncSource *source, SyncCollection *c)
{
	return sync_json_number(c->options, "schema_interval",
							sync_json_number(source->options, "schema_interval", 3600));
}

/* Ask the API for the collection's fields again: new ones are listed, ready to add. */
static void
worker_check_schema(SyncSource *source, SyncCollection *collection)
{
	char	   *canonical = NULL;
	List	   *fields;

	pgstat_report_activity(STATE_RUNNING, "sync: describing a collection");
	fields = source->provider->describe(source, collection->name, &canonical);
	worker_begin("sync: saving the API's fields", step_ctx);
	sync_save_api_fields(collection, fields);
	worker_commit();
	MemoryContextSwitchTo(step_ctx);
}

/*
 * Run one step of one collection: read its state, let the provider make its
 * requests with no transaction open, then commit the page and cursor.
 */
static void
worker_run_step(DueCollection *due, ScheduleEntry *entry, bool *more, bool *failed, bool *rate_limited,
				int *lock_wait)
{
	MemoryContext oldctx = MemoryContextSwitchTo(step_ctx);
	SyncSource *volatile source = NULL;
	SyncCollection *volatile collection = NULL;
	SyncPage	page;
	volatile bool writing = false;	/* a lock timeout now is a user's lock on the table */

	memset(&page, 0, sizeof(page));
	page.total = -1;
	page.retry = entry->retrying;
	if (entry->walk_started_at == 0)
	{
		entry->walk_started_at = GetCurrentTimestamp();
		entry->walk_steps = 0;
	}
	entry->walk_steps++;
	page.caught_up_as_of = entry->walk_started_at;
	*more = false;
	*failed = false;
	*rate_limited = false;
	*lock_wait = 0;

	PG_TRY();
	{
		worker_begin("sync: reading collection state", step_ctx);
		source = sync_load_source(due->source_id);
		collection = sync_load_collection(due->collection_id);
		writing = true;
		worker_check_table_lock(collection);
		writing = false;
		worker_commit();
		MemoryContextSwitchTo(step_ctx);

		if (source->provider == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("source \"%s\" has unknown kind \"%s\"", source->name, source->kind)));

		pgstat_report_activity(STATE_RUNNING, "sync: waiting for the API");
		if (collection->column_backfill && entry->column_turn)
		{
			/* a backfill of new columns takes every other turn: polling goes on */
			SyncCollection *columns = worker_column_backfill_view(collection);

			source->provider->step(source, columns, &page);
			worker_begin("sync: applying a page of a column backfill", step_ctx);
			writing = true;
			worker_lock_table(collection);
			sync_refresh_fields(columns, columns->fields);
			sync_apply_column_page(collection, columns, &page);
			writing = false;
			worker_commit();
			MemoryContextSwitchTo(step_ctx);
			*more = true;
		}
		else
		{
			source->provider->step(source, collection, &page);

			worker_begin("sync: applying a page", step_ctx);
			writing = true;
			worker_lock_table(collection);
			sync_refresh_fields(collection, collection->fields);
			sync_apply_page(collection, &page);
			writing = false;
			worker_commit();
			MemoryContextSwitchTo(step_ctx);
			*more = page.more || collection->column_backfill != NULL;
			if (strcmp(page.phase ? page.phase : collection->phase, "incremental") == 0 &&
				(page.caught_up || !page.more))
				entry->walk_started_at = 0;
			else if (page.phase && strcmp(page.phase, "backfill") == 0)
				entry->walk_started_at = 0;
			if (strcmp(page.phase ? page.phase : collection->phase, "incremental") == 0 &&
				collection->schema_checked_ago_s >= worker_schema_interval(source, collection))
				worker_check_schema(source, collection);
		}
		entry->column_turn = !entry->column_turn;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(step_ctx);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		if (writing && edata->sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE)
		{
			/* 1: seen before any request; 2: a fetched page was put back */
			*lock_wait = page.requests > 0 ? 2 : 1;
			worker_record_lock_wait(due->collection_id, collection->relid, &page);
		}
		else
		{
			/* only an answer the provider recognised as a rate limit set a penalty */
			*rate_limited = page.rate_limited > 0 || page.penalized;
			ereport(LOG,
					(errcode(edata->sqlerrcode),
					 errmsg("sync of collection %d %s: %s", due->collection_id,
							*rate_limited ? "was rate limited" : "failed", edata->message),
					 edata->detail ? errdetail_internal("%s", edata->detail) : 0));
			worker_record_failure(due->collection_id, edata, &page, *rate_limited);
			*failed = true;
		}
	}
	PG_END_TRY();

	json_decref(page.records);
	json_decref(page.deletions);
	json_decref(page.cursor);
	json_decref(page.sweep_ids);
	if (collection)
		sync_free_collection(collection);
	if (source)
		sync_free_source(source);
	MemoryContextSwitchTo(oldctx);
	MemoryContextReset(step_ctx);
}

/*
 * Whether entry should run before other: the collection that ran least
 * recently goes first, except that an incremental walk a few steps long (a
 * delete check and the poll after it, a second page of changes) finishes
 * first: making it wait another round would double its lag.
 */
#define WALK_STEPS_FIRST 4

static bool
worker_runs_before(ScheduleEntry *entry, ScheduleEntry *other)
{
	bool		entry_walking = entry->walk_started_at != 0 && entry->walk_steps < WALK_STEPS_FIRST;
	bool		other_walking = other->walk_started_at != 0 && other->walk_steps < WALK_STEPS_FIRST;

	if (entry_walking != other_walking)
		return entry_walking;
	return entry->last_run < other->last_run;
}

/*
 * One round: of the due collections whose source has budget, run the one
 * that ran least recently, so the collections of a source take turns and a
 * long backfill never starves the polls of the others. Returns how long to
 * sleep before the next round.
 */
static long
worker_round(void)
{
	List	   *active = worker_load_active();
	TimestampTz now = GetCurrentTimestamp();
	DueCollection *best = NULL;
	ScheduleEntry *best_entry = NULL;
	long		sleep_ms = 10000;
	HASH_SEQ_STATUS seq;
	ScheduleEntry *e;
	ListCell   *lc;
	int			due_now = 0;
	long		next_other_ms = LONG_MAX;

	hash_seq_init(&seq, schedule);
	while ((e = hash_seq_search(&seq)) != NULL)
		e->seen = false;

	foreach(lc, active)
	{
		DueCollection *d = lfirst(lc);
		bool		found;
		ScheduleEntry *entry = hash_search(schedule, &d->collection_id, HASH_ENTER, &found);
		long		wait_ms;

		if (!found)
		{
			entry->next_due = now;
			entry->last_run = 0;
			entry->walk_started_at = 0;
			entry->retrying = false;
			entry->column_turn = false;
			entry->poll_seen = d->poll_requested_at;
		}
		entry->seen = true;
		entry->source_id = d->source_id;
		if (d->run_requested)
			entry->next_due = Min(entry->next_due, now);
		/*
		 * A webhook's request to poll is acted on once, and never lost: one
		 * made while a step runs (whose commit clears run_requested) is newer
		 * than the one seen when that step was chosen.
		 */
		if (d->poll_requested_at > entry->poll_seen)
		{
			entry->poll_seen = d->poll_requested_at;
			entry->next_due = Min(entry->next_due, now);
		}

		wait_ms = Max(sync_budget_wait_ms(d->source_id),
					  entry->next_due > now ? (long) ((entry->next_due - now) / 1000) + 1 : 0);
		if (wait_ms > 0)
		{
			sleep_ms = Min(sleep_ms, wait_ms);
			next_other_ms = Min(next_other_ms, wait_ms);
			continue;
		}
		due_now++;
		if (best == NULL || worker_runs_before(entry, best_entry))
		{
			best = d;
			best_entry = entry;
		}
	}

	/* Forget collections that were removed or paused. */
	hash_seq_init(&seq, schedule);
	while ((e = hash_seq_search(&seq)) != NULL)
		if (!e->seen)
			hash_search(schedule, &e->collection_id, HASH_REMOVE, NULL);

	if (best != NULL && sync_enabled)
	{
		bool		more;
		bool		failed;
		bool		rate_limited;
		int			lock_wait;

		/*
		 * The next page may be asked for while this one is written when no
		 * other collection wants a turn soon: its request would throw the
		 * prefetched answer away.
		 */
		sync_prefetch_allowed = due_now == 1 && next_other_ms > PREFETCH_QUIET_MS;
		worker_run_step(best, best_entry, &more, &failed, &rate_limited, &lock_wait);
		sync_prefetch_allowed = false;
		now = GetCurrentTimestamp();
		best_entry->last_run = now;
		best_entry->retrying = failed;
		best_entry->lock_waits = lock_wait == 2 ? best_entry->lock_waits + 1 : 0;
		if (lock_wait == 1)
			best_entry->next_due = TimestampTzPlusMilliseconds(now, 1000);
		else if (lock_wait == 2)
		{
			/*
			 * Checking a table lock costs nothing; a page put back after
			 * waiting for locked rows cost requests: wait longer each time.
			 */
			best_entry->next_due = TimestampTzPlusMilliseconds(now,
															   Min(1000L << Min(best_entry->lock_waits - 1, 5),
																   10000L));
		}
		else if (rate_limited)
			best_entry->next_due = now;	/* the source's penalty holds it back */
		else if (failed)
			best_entry->next_due = TimestampTzPlusMilliseconds(now, backoff_ms(best->failures + 1));
		else if (more)
			best_entry->next_due = now;
		else
			best_entry->next_due = TimestampTzPlusMilliseconds(now, (long) (best->poll_interval_s * 1000));
		sleep_ms = 0;
	}
	else if (!sync_enabled)
		sleep_ms = 10000;

	MemoryContextReset(loop_ctx);
	return sleep_ms;
}

void
sync_worker_main(Datum arg)
{
	Oid			dboid = DatumGetObjectId(arg);
	HASHCTL		ctl;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnectionByOid(dboid, InvalidOid, 0);
	pgstat_report_appname("sync worker");

	LWLockAcquire(sync_shared_lock, LW_EXCLUSIVE);
	{
		SyncDatabaseSlot *slot = sync_slot_find_or_add(MyDatabaseId);

		if (slot)
		{
			slot->worker_pid = MyProcPid;
			slot->worker_latch = MyLatch;
			slot->extension_dropped = false;
		}
	}
	LWLockRelease(sync_shared_lock);
	before_shmem_exit(worker_detach, 0);

	sync_is_worker = true;
	worker_apply_settings();
	(void) worker_exit_if_extension_gone();
	StartTransactionCommand();
	ereport(LOG, (errmsg("sync worker started for database \"%s\"", get_database_name(MyDatabaseId))));
	CommitTransactionCommand();

	sync_http_init();
	loop_ctx = AllocSetContextCreate(TopMemoryContext, "sync worker round", ALLOCSET_DEFAULT_SIZES);
	step_ctx = AllocSetContextCreate(TopMemoryContext, "sync worker step", ALLOCSET_DEFAULT_SIZES);

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(int32);
	ctl.entrysize = sizeof(ScheduleEntry);
	schedule = hash_create("sync schedule", 64, &ctl, HASH_ELEM | HASH_BLOBS);

	for (;;)
	{
		long		sleep_ms;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			worker_apply_settings();
		}
		if (!worker_exit_if_extension_gone())
		{
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 1000L, PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
			continue;
		}
		PG_TRY();
		{
			sync_worker_serve_token_refresh();
			sleep_ms = worker_round();
			if (GetCurrentTimestamp() >= next_delivery_check)
			{
				sync_deliver_notifications();
				next_delivery_check = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), 1000);
				sleep_ms = Min(sleep_ms, 1000);
			}
		}
		PG_CATCH();
		{
			/* Reading the configuration failed, e.g. while DROP EXTENSION runs. */
			MemoryContextSwitchTo(TopMemoryContext);
			if (geterrcode() != ERRCODE_LOCK_NOT_AVAILABLE)
				EmitErrorReport();
			FlushErrorState();
			AbortCurrentTransaction();
			MemoryContextReset(loop_ctx);
			sleep_ms = 1000;
		}
		PG_END_TRY();
		if (sleep_ms > 0)
		{
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 sleep_ms, PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
		}
	}
}
