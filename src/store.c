/*
 * store.c: applies a page of API records to its synced table. A page is one
 * multi-row upsert and one multi-row delete, both prepared once per
 * collection, plus the update of the collection's cursor, all in the
 * caller's transaction. Rows never go backwards: a record older than the
 * row (by the API's modification stamp) is skipped.
 */
#include "sync.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"

typedef struct CollectionPlans
{
	int32		collection_id;	/* hash key */
	char	   *upsert_sql;
	SPIPlanPtr	upsert;
	char	   *delete_sql;
	SPIPlanPtr	delete;
	char	   *existing_sql;	/* keys the table holds, for copyload.c; NULL: no COPY path */
	SPIPlanPtr	existing;
	bool		copy_optimistic;	/* the last pages held only new keys (copyload.c) */
} CollectionPlans;

static HTAB *plans_by_collection = NULL;

static const SyncField *
find_field(List *fields, bool key)
{
	ListCell   *lc;

	foreach(lc, fields)
	{
		SyncField  *f = lfirst(lc);

		if (key ? f->is_key : f->is_version)
			return f;
	}
	return NULL;
}

/* The expression that turns a wire value (ref) into the column's value. */
static void
append_converted(StringInfo buf, const SyncField *f, const char *ref)
{
	if (f->convert_sql && f->convert_sql[0])
	{
		/* convert_sql holds one %s: the wire value */
		const char *p = strstr(f->convert_sql, "%s");

		if (p == NULL)
			elog(ERROR, "conversion of field \"%s\" has no placeholder", f->api_field);
		appendBinaryStringInfo(buf, f->convert_sql, p - f->convert_sql);
		appendStringInfoString(buf, ref);
		appendStringInfoString(buf, p + 2);
	}
	else
		appendStringInfoString(buf, ref);
}

/* The key of field f in rows of sync_records_from(fields). */
static char *
field_key(List *fields, const SyncField *f)
{
	ListCell   *lc;

	foreach(lc, fields)
		if (lfirst(lc) == f)
			return pstrdup(sync_record_key(foreach_current_index(lc)));
	elog(ERROR, "field \"%s\" is not among the collection's fields", f->api_field);
	return NULL;
}

/* The column value of field f in a row of sync_records_from(fields). */
static void
append_value_expr(StringInfo buf, List *fields, const SyncField *f)
{
	append_converted(buf, f, sync_record_value(fields, f));
}

static char *
qualified_table(SyncCollection *c)
{
	char	   *relname = get_rel_name(c->relid);

	if (relname == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("the table of collection \"%s\" no longer exists", c->name),
				 errhint("Remove the collection with sync.remove_collection() and add it again.")));
	return quote_qualified_identifier(get_namespace_name(get_rel_namespace(c->relid)), relname);
}

static char *
build_upsert_sql(SyncCollection *c, const char *table)
{
	StringInfoData sql;
	const SyncField *key = find_field(c->fields, true);
	const SyncField *version = find_field(c->fields, false);
	ListCell   *lc;
	bool		first;

	initStringInfo(&sql);
	appendStringInfo(&sql, "INSERT INTO %s AS t (", table);
	foreach(lc, c->fields)
		appendStringInfo(&sql, "%s, ", quote_identifier(((SyncField *) lfirst(lc))->column_name));
	appendStringInfoString(&sql, "_synced_at) SELECT DISTINCT ON (");
	append_value_expr(&sql, c->fields, key);
	appendStringInfoString(&sql, ") ");
	foreach(lc, c->fields)
	{
		append_value_expr(&sql, c->fields, lfirst(lc));
		appendStringInfoString(&sql, ", ");
	}
	/*
	 * Rows keep their page order (ordinality): among records of one key with
	 * the same version, the later one in the page wins, as it would have had
	 * the page been applied one record at a time.
	 */
	appendStringInfo(&sql, "now() FROM %s ORDER BY ", sync_records_from(c->fields, 1));
	append_value_expr(&sql, c->fields, key);
	if (version)
	{
		appendStringInfoString(&sql, ", ");
		append_value_expr(&sql, c->fields, version);
		appendStringInfoString(&sql, " DESC NULLS LAST");
	}
	appendStringInfoString(&sql, ", r._sync_position DESC");
	appendStringInfo(&sql, " ON CONFLICT (%s) DO UPDATE SET ", quote_identifier(key->column_name));
	foreach(lc, c->fields)
	{
		SyncField  *f = lfirst(lc);

		if (!f->is_key)
			appendStringInfo(&sql, "%s = EXCLUDED.%s, ", quote_identifier(f->column_name),
							 quote_identifier(f->column_name));
	}
	appendStringInfoString(&sql, "_synced_at = EXCLUDED._synced_at WHERE ");
	if (version)
	{
		const char *v = quote_identifier(version->column_name);

		appendStringInfo(&sql, "t.%s IS NULL OR t.%s < EXCLUDED.%s OR (t.%s = EXCLUDED.%s AND ", v, v, v, v, v);
	}
	/* Re-reading an unchanged record must not rewrite the row. */
	appendStringInfoString(&sql, "(");
	first = true;
	foreach(lc, c->fields)
	{
		SyncField  *f = lfirst(lc);

		appendStringInfo(&sql, "%st.%s", first ? "" : ", ", quote_identifier(f->column_name));
		first = false;
	}
	appendStringInfoString(&sql, ", NULL) IS DISTINCT FROM (");
	first = true;
	foreach(lc, c->fields)
	{
		SyncField  *f = lfirst(lc);

		appendStringInfo(&sql, "%sEXCLUDED.%s", first ? "" : ", ", quote_identifier(f->column_name));
		first = false;
	}
	appendStringInfoString(&sql, ", NULL)");
	if (version)
		appendStringInfoString(&sql, ")");
	return sql.data;
}

static char *
build_delete_sql(SyncCollection *c, const char *table)
{
	StringInfoData sql;
	const SyncField *key = find_field(c->fields, true);
	const SyncField *version = find_field(c->fields, false);

	initStringInfo(&sql);
	appendStringInfo(&sql, "DELETE FROM %s AS t USING json_to_recordset($1::json) AS d(id %s, at %s) "
					 "WHERE t.%s = d.id",
					 table, key->column_type, version ? version->wire_type : "text",
					 quote_identifier(key->column_name));
	if (version)
	{
		const char *v = quote_identifier(version->column_name);

		/* a deletion older than the row (a record re-created since) leaves it */
		appendStringInfo(&sql, " AND (d.at IS NULL OR t.%s IS NULL OR t.%s <= ", v, v);
		append_converted(&sql, version, "d.at");
		appendStringInfoChar(&sql, ')');
	}
	return sql.data;
}

/* The statement sql (nargs arguments of type argtype) prepared and kept, or cached if its text is unchanged. */
static SPIPlanPtr
prepare_kept(const char *sql, int nargs, Oid *argtypes, char **cached_sql, SPIPlanPtr cached)
{
	SPIPlanPtr	plan;

	if (cached && *cached_sql && strcmp(*cached_sql, sql) == 0)
		return cached;
	if (cached)
		SPI_freeplan(cached);
	if (*cached_sql)
		pfree(*cached_sql);
	*cached_sql = NULL;
	plan = SPI_prepare(sql, nargs, argtypes);
	if (plan == NULL)
		elog(ERROR, "could not prepare a sync statement: %s", SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "could not keep a sync statement");
	*cached_sql = MemoryContextStrdup(TopMemoryContext, sql);
	return plan;
}

static CollectionPlans *
plans_for(SyncCollection *c)
{
	bool		found;
	CollectionPlans *p;
	char	   *table = qualified_table(c);
	char	   *existing_sql;

	if (plans_by_collection == NULL)
	{
		HASHCTL		ctl;

		memset(&ctl, 0, sizeof(ctl));
		ctl.keysize = sizeof(int32);
		ctl.entrysize = sizeof(CollectionPlans);
		plans_by_collection = hash_create("sync plans", 64, &ctl, HASH_ELEM | HASH_BLOBS);
	}
	p = hash_search(plans_by_collection, &c->id, HASH_ENTER, &found);
	if (!found)
	{
		p->upsert_sql = p->delete_sql = p->existing_sql = NULL;
		p->upsert = p->delete = p->existing = NULL;
		p->copy_optimistic = false;
	}
	if (find_field(c->fields, true) == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("collection \"%s\" has no key column", c->name)));
	p->upsert = prepare_kept(build_upsert_sql(c, table), list_length(c->fields),
							 sync_records_argtypes(list_length(c->fields)), &p->upsert_sql, p->upsert);
	p->delete = prepare_kept(build_delete_sql(c, table), 1, (Oid[]) {TEXTOID}, &p->delete_sql, p->delete);
	existing_sql = sync_existing_keys_sql(c, table);
	if (existing_sql)
		p->existing = prepare_kept(existing_sql, 1, (Oid[]) {TEXTARRAYOID}, &p->existing_sql, p->existing);
	else if (p->existing)
	{
		SPI_freeplan(p->existing);
		pfree(p->existing_sql);
		p->existing = NULL;
		p->existing_sql = NULL;
	}
	return p;
}

/* Run plan with $1 = array as JSON text (a page's deletions). */
static uint64
run_with_json(SPIPlanPtr plan, json_t *array, int expected)
{
	char	   *text = sync_json_dump(array);
	Datum		arg = CStringGetTextDatum(text);
	int			ret;

	pfree(text);
	ret = SPI_execute_plan(plan, &arg, NULL, false, 0);
	if (ret != expected)
		elog(ERROR, "could not apply a page: %s", SPI_result_code_string(ret));
	pfree(DatumGetPointer(arg));
	return SPI_processed;
}

/*
 * Run a statement over records ($1..$n: one text array per field, see
 * records.c) in a subtransaction of its own: an error comes back instead of
 * being raised, and nothing of it is left. plan, or sql when plan is NULL.
 */
ErrorData *
sync_try_with_records(SPIPlanPtr plan, const char *sql, SyncBatch *batch, int expected, int64 *processed)
{
	MemoryContext oldcontext = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	ErrorData  *volatile failure = NULL;
	MemoryContext args_context = AllocSetContextCreate(CurrentMemoryContext, "sync page arguments",
													   ALLOCSET_DEFAULT_SIZES);
	Datum	   *args;

	/* the arrays live only as long as the statement: memory stays flat however many pages */
	MemoryContextSwitchTo(args_context);
	args = palloc(sizeof(Datum) * Max(batch->nfields, 1));
	sync_batch_arrays(batch, args);
	MemoryContextSwitchTo(oldcontext);

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcontext);
	PG_TRY();
	{
		int			ret;

		if (plan)
			ret = SPI_execute_plan(plan, args, NULL, false, 0);
		else
			ret = SPI_execute_with_args(sql, batch->nfields, sync_records_argtypes(batch->nfields), args,
										NULL, false, 0);
		if (ret != expected)
			elog(ERROR, "could not apply a page: %s", SPI_result_code_string(ret));
		*processed = (int64) SPI_processed;
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(oldcontext);
		failure = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
	}
	PG_END_TRY();
	MemoryContextDelete(args_context);
	return failure;
}

/*
 * Store a batch of records with plan (or sql). When a value does not fit its
 * column, the values that do not are set aside (see reject.c) and the batch
 * is stored without them.
 */
static int64
store_records(SyncCollection *c, SyncBatch *batch, SPIPlanPtr plan, const char *sql, int expected)
{
	int64		processed = 0;
	ErrorData  *failure = sync_try_with_records(plan, sql, batch, expected, &processed);

	if (failure == NULL)
		return processed;
	if (ERRCODE_TO_CATEGORY(failure->sqlerrcode) != ERRCODE_DATA_EXCEPTION ||
		sync_reject_unfit_values(c, batch) == 0)
		ReThrowError(failure);
	if (batch->nrecords == 0)
		return 0;
	failure = sync_try_with_records(plan, sql, batch, expected, &processed);
	if (failure)
		ReThrowError(failure);
	return processed;
}

/* The page's upserts in column form for fields. */
static SyncBatch *
page_batch(SyncPage *page, List *fields)
{
	if (page->batch)
		return sync_batch_for_fields(page->batch, fields);
	if (page->records && json_array_size(page->records) > 0)
		return sync_batch_from_json(page->records, fields);
	return NULL;
}

/*
 * Advance the collection's state; false when its cursor changed since the
 * step began (a resync), in which case the page is dropped.
 */
static SPIPlanPtr update_state_plan = NULL;

/* A page's effect on its collection's state; $11: the cursor the page started from. */
static const char update_state_sql[] =
	"UPDATE sync.collection_state SET cursor = $2::jsonb, phase = $3, "
	/* a provider that starts a backfill again (lost change feed) restarts its figures */
	"  backfill_records = CASE WHEN $12 OR (phase = 'incremental' AND ($3 = 'backfill' OR $6)) THEN $4 "
	"                          WHEN phase = 'backfill' THEN backfill_records + $4 "
	"                          ELSE backfill_records END, "
	"  backfill_started_at = CASE WHEN phase = 'incremental' AND ($3 = 'backfill' OR $6) THEN now() "
	"                             ELSE backfill_started_at END, "
	"  backfill_total = coalesce($5, backfill_total), "
	/*
	 * records per second of the backfill lately, over a window of 2 to 10 s
	 * (one page's interval is noise): ETA = what is left at this rate
	 */
	"  backfill_rate = CASE WHEN phase = 'backfill' AND $3 = 'backfill' AND NOT $12 "
	"                            AND now() - rate_mark_at >= interval '2 s' "
	"                       THEN (backfill_records + $4 - rate_mark_records) "
	"                            / extract(epoch FROM now() - rate_mark_at) "
	"                       WHEN phase = 'backfill' AND NOT $12 THEN backfill_rate ELSE NULL END, "
	"  rate_mark_records = CASE WHEN phase = 'backfill' AND $3 = 'backfill' AND NOT $12 "
	"                                AND (rate_mark_at IS NULL OR now() - rate_mark_at >= interval '10 s') "
	"                           THEN backfill_records + $4 "
	"                           WHEN phase = 'backfill' AND $3 = 'backfill' AND NOT $12 THEN rate_mark_records "
	"                           ELSE NULL END, "
	"  rate_mark_at = CASE WHEN phase = 'backfill' AND $3 = 'backfill' AND NOT $12 "
	"                           AND (rate_mark_at IS NULL OR now() - rate_mark_at >= interval '10 s') THEN now() "
	"                      WHEN phase = 'backfill' AND $3 = 'backfill' AND NOT $12 THEN rate_mark_at "
	"                      ELSE NULL END, "
	"  backfill_completed_at = CASE WHEN $6 THEN now() "
	"                               WHEN phase = 'incremental' AND $3 = 'backfill' THEN NULL "
	"                               ELSE backfill_completed_at END, "
	"  last_poll_at = now(), "
	/* a walk that reached the feed's end proves the table current as of the walk's start */
	"  last_caught_up_at = CASE WHEN $13 THEN greatest(least(coalesce(walk_started_at, $14), $14), last_caught_up_at) "
	"                           ELSE last_caught_up_at END, "
	/*
	 * when the unfinished walk began, kept with its pages: a worker that
	 * resumes it after a crash or restart must not claim a later start
	 */
	"  walk_started_at = CASE WHEN $13 OR $3 <> 'incremental' THEN NULL "
	"                         ELSE least(coalesce(walk_started_at, $14), $14) END, "
	/* requests of one polling cycle: from one caught-up walk to the next */
	"  avg_cycle_requests = CASE WHEN $13 AND phase = 'incremental' "
	"                            THEN CASE WHEN avg_cycle_requests IS NULL THEN cycle_requests + $9 "
	"                                      ELSE 0.8 * avg_cycle_requests + 0.2 * (cycle_requests + $9) END "
	"                            ELSE avg_cycle_requests END, "
	"  cycle_requests = CASE WHEN $13 OR phase = 'backfill' OR $3 = 'backfill' THEN 0 "
	"                        ELSE cycle_requests + $9 END, "
	"  records_upserted = records_upserted + $8, "
	"  requests = requests + $9, bytes_received = bytes_received + $15, errors = errors + $16, "
	"  rate_limited = rate_limited + $17, retries = retries + $18::int, "
	"  consecutive_failures = 0, activity = nullif($10, ''), lock_wait = NULL, "
	"  run_requested = false "
	"WHERE collection_id = $1 AND cursor = $11::jsonb";

static bool
update_state(SyncCollection *c, SyncPage *page, int64 upserted, int64 deleted)
{
	Oid			types[18] = {INT4OID, TEXTOID, TEXTOID, INT8OID, INT8OID, BOOLOID, BOOLOID,
		INT8OID, INT8OID, TEXTOID, TEXTOID, BOOLOID, BOOLOID, TIMESTAMPTZOID, INT8OID, INT4OID, INT4OID,
	BOOLOID};
	Datum		args[18];
	char		nulls[18];
	char	   *cursor_text = sync_json_dump(page->cursor ? page->cursor : c->cursor);
	char	   *old_cursor_text = sync_json_dump(c->cursor);
	size_t		nrecords = page->batch ? (size_t) page->batch->nrecords :
		page->records ? json_array_size(page->records) : 0;
	const char *phase = page->phase ? page->phase : c->phase;
	bool		caught_up = strcmp(phase, "incremental") == 0 && (page->caught_up || !page->more);
	int			ret;

	memset(nulls, ' ', sizeof(nulls));
	args[0] = Int32GetDatum(c->id);
	args[1] = CStringGetTextDatum(cursor_text);
	args[2] = CStringGetTextDatum(phase);
	args[3] = Int64GetDatum((int64) nrecords);
	args[4] = Int64GetDatum(page->total);
	if (page->total < 0)
		nulls[4] = 'n';
	args[5] = BoolGetDatum(page->backfill_done);
	args[6] = BoolGetDatum(page->more);
	args[7] = Int64GetDatum(upserted);
	args[8] = Int64GetDatum((int64) page->requests);
	args[9] = CStringGetTextDatum(page->activity ? page->activity : "");
	args[10] = CStringGetTextDatum(old_cursor_text);
	args[11] = BoolGetDatum(page->backfill_restart);
	args[12] = BoolGetDatum(caught_up);
	args[13] = TimestampTzGetDatum(page->caught_up_as_of ? page->caught_up_as_of : GetCurrentTimestamp());
	args[14] = Int64GetDatum(page->bytes);
	args[15] = Int32GetDatum(page->errors);
	args[16] = Int32GetDatum(page->rate_limited);
	args[17] = BoolGetDatum(page->retry);
	pfree(cursor_text);
	pfree(old_cursor_text);

	/* parsed and planned once per worker: every page runs it */
	if (update_state_plan == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare(update_state_sql, 18, types);

		if (plan == NULL || SPI_keepplan(plan) != 0)
			elog(ERROR, "could not prepare the update of sync.collection_state: %s",
				 SPI_result_code_string(SPI_result));
		update_state_plan = plan;
	}
	ret = SPI_execute_plan(update_state_plan, args, nulls, false, 0);
	if (ret != SPI_OK_UPDATE)
		elog(ERROR, "could not update sync.collection_state: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		return false;

	if (deleted > 0)
	{
		Oid			dtypes[2] = {INT4OID, INT8OID};
		Datum		dargs[2] = {Int32GetDatum(c->id), Int64GetDatum(deleted)};

		ret = SPI_execute_with_args("UPDATE sync.collection_state SET records_deleted = records_deleted + $2 "
									"WHERE collection_id = $1", 2, dtypes, dargs, NULL, false, 0);
		if (ret != SPI_OK_UPDATE)
			elog(ERROR, "could not update sync.collection_state: %s", SPI_result_code_string(ret));
	}
	return true;
}

static void
run_sweep_sql(const char *sql, int32 collection_id, const char *ids_json, int expected)
{
	Oid			types[2] = {INT4OID, TEXTOID};
	Datum		args[2];
	int			ret;

	args[0] = Int32GetDatum(collection_id);
	if (ids_json)
		args[1] = CStringGetTextDatum(ids_json);
	ret = SPI_execute_with_args(sql, ids_json ? 2 : 1, types, args, NULL, false, 0);
	if (ret != expected)
		elog(ERROR, "could not run a delete sweep: %s", SPI_result_code_string(ret));
}

/*
 * A delete sweep: remember every id the API listed; at the end delete the rows
 * that were not listed and not written since the sweep began (a record created
 * meanwhile may be missing from the listing but is not deleted).
 */
static int64
apply_sweep(SyncCollection *c, SyncPage *page)
{
	int64		deleted = 0;

	if (page->sweep_begin)
	{
		run_sweep_sql("DELETE FROM sync.sweep_ids WHERE collection_id = $1", c->id, NULL, SPI_OK_DELETE);
		run_sweep_sql("UPDATE sync.collection_state SET sweep_started_at = now(), reconcile_requested = false "
					  "WHERE collection_id = $1", c->id, NULL, SPI_OK_UPDATE);
	}
	if (page->sweep_ids && json_array_size(page->sweep_ids) > 0)
	{
		char	   *ids = sync_json_dump(page->sweep_ids);

		run_sweep_sql("INSERT INTO sync.sweep_ids (collection_id, id) "
					  "SELECT $1, i FROM json_array_elements_text($2::json) AS i ON CONFLICT DO NOTHING",
					  c->id, ids, SPI_OK_INSERT);
		pfree(ids);
	}
	if (page->sweep_end)
	{
		const SyncField *key = find_field(c->fields, true);
		char	   *sql = psprintf("DELETE FROM %s AS t USING sync.collection_state st "
								   "WHERE st.collection_id = $1 AND t._synced_at < st.sweep_started_at "
								   "AND NOT EXISTS (SELECT 1 FROM sync.sweep_ids s "
								   "                WHERE s.collection_id = $1 AND s.id = t.%s::text)",
								   qualified_table(c), quote_identifier(key->column_name));

		run_sweep_sql(sql, c->id, NULL, SPI_OK_DELETE);
		deleted = (int64) SPI_processed;
		run_sweep_sql("DELETE FROM sync.sweep_ids WHERE collection_id = $1", c->id, NULL, SPI_OK_DELETE);
		run_sweep_sql("UPDATE sync.collection_state SET last_sweep_started_at = sweep_started_at, "
					  "sweep_started_at = NULL, last_sweep_at = now() "
					  "WHERE collection_id = $1", c->id, NULL, SPI_OK_UPDATE);
		if (deleted > 0)
			ereport(LOG,
					(errmsg("delete sweep of collection \"%s\" removed %lld rows whose records are gone",
							c->name, (long long) deleted)));
	}
	return deleted;
}

/*
 * Tell listeners (NOTIFY, at commit and so exactly once) and queue the e-mail
 * and webhook deliveries, in the transaction of the page that completed it.
 */
static void
notify_backfill_done(SyncCollection *c)
{
	Oid			argtype = INT4OID;
	Datum		arg = Int32GetDatum(c->id);
	int			ret;

	ret = SPI_execute_with_args(
		"SELECT sync._emit('backfill_completed', jsonb_build_object("
		"  'source', s.name, 'collection', c.name, 'table', c.relid::regclass::text, "
		"  'records', st.backfill_records, 'started_at', st.backfill_started_at, "
		"  'completed_at', st.backfill_completed_at)) "
		"FROM sync.collections c JOIN sync.sources s ON s.id = c.source_id "
		"JOIN sync.collection_state st ON st.collection_id = c.id WHERE c.id = $1",
		1, &argtype, &arg, NULL, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not notify: %s", SPI_result_code_string(ret));
}

void
sync_apply_page(SyncCollection *c, SyncPage *page)
{
	CollectionPlans *plans;
	int64		upserted = 0;
	int64		deleted = 0;
	int64		pending_deletes = page->deletions ? (int64) json_array_size(page->deletions) : 0;
	SyncBatch  *batch;

	/* Counted after the state update succeeds; the counts are known from the page. */
	plans = plans_for(c);
	batch = page_batch(page, c->fields);
	if (batch && batch->nrecords > 0 && plans->existing)
		upserted = sync_copy_new_records(c, batch, plans->existing, &plans->copy_optimistic, &batch);
	if (batch && batch->nrecords > 0)
		upserted += store_records(c, batch, plans->upsert, NULL, SPI_OK_INSERT);
	/* the next page, if asked for already, keeps arriving while this one is written */
	sync_http_pump();
	if (pending_deletes > 0)
		deleted = (int64) run_with_json(plans->delete, page->deletions, SPI_OK_DELETE);
	if (page->sweep_begin || page->sweep_ids || page->sweep_end)
		deleted += apply_sweep(c, page);

	if (!update_state(c, page, upserted, deleted))
	{
		/* A resync reset the cursor meanwhile: drop this page. */
		ereport(ERROR,
				(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
				 errmsg("collection \"%s\" was reset while a page was in flight", c->name),
				 errdetail("The page was discarded; the collection starts again from its new cursor.")));
	}
	if (page->backfill_done)
		notify_backfill_done(c);
}

/*
 * A page of a column backfill (columns->fields: the key, the modification
 * stamp and the columns being filled): update those columns of rows that
 * exist and are not newer than the page, then advance the column backfill's
 * own cursor. The collection's cursor is not touched. Returns false when the
 * column backfill was started again meanwhile (the page is dropped).
 */
bool
sync_apply_column_page(SyncCollection *c, SyncCollection *columns, SyncPage *page)
{
	const SyncField *key = find_field(columns->fields, true);
	const SyncField *version = find_field(columns->fields, false);
	char	   *table = qualified_table(c);
	StringInfoData sql;
	ListCell   *lc;
	int64		updated = 0;
	SyncBatch  *batch;
	Oid			types[10] = {INT4OID, TEXTOID, INT8OID, BOOLOID, TEXTOID, INT8OID, INT8OID, INT4OID, INT4OID,
	BOOLOID};
	Datum		args[10];
	char	   *cursor_text;
	int			ret;

	initStringInfo(&sql);
	appendStringInfo(&sql, "UPDATE %s AS t SET ", table);
	foreach(lc, columns->fields)
	{
		SyncField  *f = lfirst(lc);

		if (!f->is_key && !f->is_version)
			appendStringInfo(&sql, "%s = s.%s, ", quote_identifier(f->column_name), field_key(columns->fields, f));
	}
	appendStringInfoString(&sql, "_synced_at = now() FROM (SELECT DISTINCT ON (");
	append_value_expr(&sql, columns->fields, key);
	appendStringInfoString(&sql, ") ");
	foreach(lc, columns->fields)
	{
		SyncField  *f = lfirst(lc);

		append_value_expr(&sql, columns->fields, f);
		appendStringInfo(&sql, " AS %s, ", field_key(columns->fields, f));
	}
	appendStringInfo(&sql, "r._sync_position FROM %s ORDER BY 1", sync_records_from(columns->fields, 1));
	if (version)
	{
		appendStringInfoString(&sql, ", ");
		append_value_expr(&sql, columns->fields, version);
		appendStringInfoString(&sql, " DESC NULLS LAST");
	}
	appendStringInfoString(&sql, ", r._sync_position DESC) AS s ");
	appendStringInfo(&sql, "WHERE t.%s = s.%s", quote_identifier(key->column_name), field_key(columns->fields, key));
	/* a row changed since the page was read is newer: polling wrote these columns too */
	if (version)
		appendStringInfo(&sql, " AND (s.%s IS NULL OR t.%s IS NULL OR t.%s <= s.%s)",
						 field_key(columns->fields, version), quote_identifier(version->column_name),
						 quote_identifier(version->column_name), field_key(columns->fields, version));

	batch = page_batch(page, columns->fields);
	if (batch && batch->nrecords > 0)
		updated = store_records(columns, batch, NULL, sql.data, SPI_OK_UPDATE);

	cursor_text = sync_json_dump(page->cursor ? page->cursor : json_object());
	args[0] = Int32GetDatum(c->id);
	args[1] = CStringGetTextDatum(cursor_text);
	args[2] = Int64GetDatum(updated);
	args[3] = BoolGetDatum(page->backfill_done);
	args[4] = CStringGetTextDatum(sync_json_string(c->column_backfill, "started_at"));
	args[5] = Int64GetDatum((int64) page->requests);
	args[6] = Int64GetDatum(page->bytes);
	args[7] = Int32GetDatum(page->errors);
	args[8] = Int32GetDatum(page->rate_limited);
	args[9] = BoolGetDatum(page->retry);
	ret = SPI_execute_with_args(
		"UPDATE sync.collection_state SET "
		"  column_backfill = CASE WHEN $4 THEN NULL "
		"       ELSE column_backfill || jsonb_build_object('cursor', $2::jsonb, "
		"                 'records', (column_backfill->>'records')::bigint + $3) END, "
		"  last_column_backfill = CASE WHEN $4 THEN column_backfill || jsonb_build_object("
		"       'records', (column_backfill->>'records')::bigint + $3, 'completed_at', now()) "
		"       ELSE last_column_backfill END, "
		"  requests = requests + $6, bytes_received = bytes_received + $7, errors = errors + $8, "
		"  rate_limited = rate_limited + $9, retries = retries + $10::int, "
		"  cycle_requests = CASE WHEN phase = 'incremental' THEN cycle_requests + $6 ELSE cycle_requests END, "
		"  records_upserted = records_upserted + $3, consecutive_failures = 0, run_requested = false "
		"WHERE collection_id = $1 AND column_backfill->>'started_at' = $5",
		10, types, args, NULL, false, 0);
	if (ret != SPI_OK_UPDATE)
		elog(ERROR, "could not update sync.collection_state: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		return false;
	if (page->backfill_done)
	{
		Oid			argtype = INT4OID;
		Datum		arg = Int32GetDatum(c->id);

		ret = SPI_execute_with_args(
			"SELECT sync._emit('backfill_completed', jsonb_build_object("
			"  'source', s.name, 'collection', c.name, 'table', c.relid::regclass::text, "
			"  'columns', st.last_column_backfill->'fields', "
			"  'records', (st.last_column_backfill->>'records')::bigint, "
			"  'started_at', st.last_column_backfill->'started_at', "
			"  'completed_at', st.last_column_backfill->'completed_at')) "
			"FROM sync.collections c JOIN sync.sources s ON s.id = c.source_id "
			"JOIN sync.collection_state st ON st.collection_id = c.id WHERE c.id = $1",
			1, &argtype, &arg, NULL, false, 0);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "could not notify: %s", SPI_result_code_string(ret));
	}
	return true;
}

/* What the API describes now: new fields are listed in sync.available_fields. */
void
sync_save_api_fields(SyncCollection *c, List *fields)
{
	ListCell   *lc;
	int			position = 0;

	foreach(lc, fields)
	{
		SyncField  *f = lfirst(lc);
		Oid			types[10] = {INT4OID, INT4OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID,
		BOOLOID, BOOLOID};
		Datum		args[10];
		char		nulls[10] = "          ";
		int			ret;

		args[0] = Int32GetDatum(c->id);
		args[1] = Int32GetDatum(++position);
		args[2] = CStringGetTextDatum(f->api_field);
		args[3] = CStringGetTextDatum(f->api_type ? f->api_type : "");
		args[4] = CStringGetTextDatum(f->column_name);
		args[5] = CStringGetTextDatum(f->column_type);
		args[6] = CStringGetTextDatum(f->wire_type);
		args[7] = CStringGetTextDatum(f->convert_sql ? f->convert_sql : "");
		nulls[7] = f->convert_sql ? ' ' : 'n';
		args[8] = BoolGetDatum(f->is_key);
		args[9] = BoolGetDatum(f->is_version);
		ret = SPI_execute_with_args(
			"INSERT INTO sync.api_fields AS af (collection_id, position, api_field, api_type, column_name, "
			"  column_type, wire_type, convert_sql, is_key, is_version) "
			"VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
			"ON CONFLICT (collection_id, api_field) DO UPDATE SET position = $2, api_type = $4, "
			"  column_name = $5, column_type = $6, wire_type = $7, convert_sql = $8, last_seen_at = now()",
			10, types, args, nulls, false, 0);
		if (ret != SPI_OK_INSERT)
			elog(ERROR, "could not save the API's fields: %s", SPI_result_code_string(ret));
	}
	if (SPI_execute_with_args("UPDATE sync.collection_state SET schema_checked_at = now() WHERE collection_id = $1",
							  1, (Oid[]) {INT4OID}, (Datum[]) {Int32GetDatum(c->id)}, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "could not update sync.collection_state");
}

/* ---------- webhooks ---------- */

/*
 * Apply the upserts and deletions a webhook delivery carries (page->records,
 * page->deletions) through the collection's own statements, so the version
 * guard holds as for polled pages: an event older than the row changes
 * nothing. Unlike sync_apply_page, the collection's cursor, phase and
 * counters stay as they are: polling remains the source of truth and reads
 * the same changes again. Returns the rows written or deleted.
 */
int64
sync_apply_webhook_changes(SyncCollection *c, SyncPage *page)
{
	CollectionPlans *plans = plans_for(c);
	SyncBatch  *batch = page_batch(page, c->fields);
	int64		changed = 0;

	if (batch && batch->nrecords > 0)
		changed += store_records(c, batch, plans->upsert, NULL, SPI_OK_INSERT);
	if (page->deletions && json_array_size(page->deletions) > 0)
		changed += (int64) run_with_json(plans->delete, page->deletions, SPI_OK_DELETE);
	return changed;
}

/*
 * Set one field of one row (an event naming a changed property, not the
 * whole record), unless the row is newer than the event (at: the event's
 * time as the version field's wire value). The version column is left
 * alone: the next poll brings the record's own stamp and every other field.
 * Returns rows updated; *known_field is false when the collection does not
 * sync that field (nothing is done).
 */
int64
sync_apply_webhook_field(SyncCollection *c, const char *record_id, const char *api_field, json_t *value,
						 json_t *at, bool *known_field)
{
	const SyncField *key = find_field(c->fields, true);
	const SyncField *version = find_field(c->fields, false);
	const SyncField *field = NULL;
	StringInfoData sql;
	ListCell   *lc;
	Oid			types[3] = {TEXTOID, TEXTOID, TEXTOID};
	Datum		args[3];
	char		nulls[3] = "   ";
	int			ret;

	foreach(lc, c->fields)
	{
		SyncField  *f = lfirst(lc);

		if (strcmp(f->api_field, api_field) == 0 && !f->is_key)
			field = f;
	}
	*known_field = field != NULL;
	if (field == NULL || key == NULL)
		return 0;

	initStringInfo(&sql);
	appendStringInfo(&sql, "UPDATE %s AS t SET %s = ", qualified_table(c), quote_identifier(field->column_name));
	append_converted(&sql, field, psprintf("$2::%s", field->wire_type));
	appendStringInfo(&sql, ", _synced_at = now() WHERE t.%s = ", quote_identifier(key->column_name));
	append_converted(&sql, key, psprintf("$1::%s", key->wire_type));
	if (version)
	{
		const char *v = quote_identifier(version->column_name);

		appendStringInfo(&sql, " AND (t.%s IS NULL OR $3 IS NULL OR t.%s <= ", v, v);
		append_converted(&sql, version, psprintf("$3::%s", version->wire_type));
		appendStringInfoChar(&sql, ')');
	}

	args[0] = CStringGetTextDatum(record_id);
	if (value == NULL || json_is_null(value))
		nulls[1] = 'n';
	else if (json_is_string(value))
		args[1] = CStringGetTextDatum(json_string_value(value));
	else
		args[1] = CStringGetTextDatum(sync_json_dump(value));
	if (at == NULL || json_is_null(at))
		nulls[2] = 'n';
	else if (json_is_string(at))
		args[2] = CStringGetTextDatum(json_string_value(at));
	else
		args[2] = CStringGetTextDatum(sync_json_dump(at));
	ret = SPI_execute_with_args(sql.data, 3, types, args, nulls, false, 0);
	if (ret != SPI_OK_UPDATE)
		elog(ERROR, "could not apply a webhook event: %s", SPI_result_code_string(ret));
	return (int64) SPI_processed;
}
