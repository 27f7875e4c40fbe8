/*
 * catalog.c: reads sources and collections from the sync.* tables into the
 * structs providers work on. Callers hold a transaction with SPI connected;
 * the results live in the caller's memory context (jansson values on malloc).
 */
#include "sync.h"

#include "catalog/pg_extension.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "storage/lmgr.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "access/xact.h"

/*
 * The context that was current at SPI_connect: results built there outlive
 * SPI_finish.
 */
static MemoryContext
spi_result_context(void)
{
	return GetMemoryChunkContext(SPI_palloc(1));
}

static char *
spi_text(HeapTuple tup, TupleDesc desc, int col)
{
	return SPI_getvalue(tup, desc, col);
}

static json_t *
spi_json(HeapTuple tup, TupleDesc desc, int col, const char *what)
{
	char	   *text = SPI_getvalue(tup, desc, col);

	if (text == NULL)
		return NULL;
	return sync_json_parse(text, strlen(text), what);
}

static SyncSource *
load_source_where(const char *where, Oid argtype, Datum arg, bool missing_ok)
{
	StringInfoData sql;
	SyncSource *source;
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	int			ret;
	char	   *verify;
	MemoryContext oldctx;

	initStringInfo(&sql);
	appendStringInfo(&sql,
					 "SELECT s.id, s.name, s.kind, s.base_url, s.options, ss.credentials, ss.token "
					 "FROM sync.sources s JOIN sync.source_secrets ss ON ss.source_id = s.id WHERE %s",
					 where);
	ret = SPI_execute_with_args(sql.data, 1, &argtype, &arg, NULL, true, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read sync.sources: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
	{
		if (missing_ok)
			return NULL;
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("sync source does not exist"),
				 errhint("Existing sources are listed in sync.sources.")));
	}
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;

	oldctx = MemoryContextSwitchTo(spi_result_context());
	source = palloc0(sizeof(SyncSource));
	source->id = DatumGetInt32(SPI_getbinval(tup, desc, 1, &isnull));
	source->name = spi_text(tup, desc, 2);
	source->kind = spi_text(tup, desc, 3);
	source->base_url = spi_text(tup, desc, 4);
	source->options = spi_json(tup, desc, 5, "source options");
	source->credentials = spi_json(tup, desc, 6, "source credentials");
	source->token = spi_json(tup, desc, 7, "source token");
	source->provider = sync_find_provider(source->kind);
	verify = (char *) sync_json_string(source->options, "verify_tls");
	source->verify_tls = !(sync_json_bool(source->options, "verify_tls", true) == false ||
						   (verify && strcmp(verify, "false") == 0));
	MemoryContextSwitchTo(oldctx);
	return source;
}

SyncSource *
sync_load_source(int32 id)
{
	return load_source_where("s.id = $1", INT4OID, Int32GetDatum(id), false);
}

SyncSource *
sync_load_source_by_name(const char *name, bool missing_ok)
{
	SyncSource *source = load_source_where("s.name = $1", TEXTOID, CStringGetTextDatum(name), true);

	if (source == NULL && !missing_ok)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("source \"%s\" does not exist", name),
				 errhint("Existing sources are listed in sync.sources; create one with sync.create_source().")));
	return source;
}

void
sync_free_source(SyncSource *source)
{
	json_decref(source->credentials);
	json_decref(source->options);
	json_decref(source->token);
	source->credentials = source->options = source->token = NULL;
}

/*
 * Run sql, prepared and kept on first use: the worker reads a collection and
 * its fields before every page, and parsing them each time showed.
 */
static int
execute_kept(SPIPlanPtr *plan, const char *sql, int nargs, Oid *types, Datum *args, long count)
{
	if (*plan == NULL)
	{
		SPIPlanPtr	prepared = SPI_prepare(sql, nargs, types);

		if (prepared == NULL || SPI_keepplan(prepared) != 0)
			elog(ERROR, "could not prepare a query of the sync catalog: %s", SPI_result_code_string(SPI_result));
		*plan = prepared;
	}
	return SPI_execute_plan(*plan, args, NULL, true, count);
}

static List *
load_fields(int32 collection_id)
{
	Oid			argtype = INT4OID;
	Datum		arg = Int32GetDatum(collection_id);
	List	   *fields = NIL;
	int			ret;
	MemoryContext oldctx;

	static SPIPlanPtr plan = NULL;

	ret = execute_kept(&plan, "SELECT api_field, api_type, column_name, column_type, wire_type, convert_sql, "
					   "is_key, is_version FROM sync.collection_columns "
					   "WHERE collection_id = $1 ORDER BY position",
					   1, &argtype, &arg, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read sync.collection_columns: %s", SPI_result_code_string(ret));
	oldctx = MemoryContextSwitchTo(spi_result_context());
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		SyncField  *f = palloc0(sizeof(SyncField));
		bool		isnull;

		f->api_field = spi_text(tup, desc, 1);
		f->api_type = spi_text(tup, desc, 2);
		f->column_name = spi_text(tup, desc, 3);
		f->column_type = spi_text(tup, desc, 4);
		f->wire_type = spi_text(tup, desc, 5);
		f->convert_sql = spi_text(tup, desc, 6);
		f->is_key = DatumGetBool(SPI_getbinval(tup, desc, 7, &isnull));
		f->is_version = DatumGetBool(SPI_getbinval(tup, desc, 8, &isnull));
		fields = lappend(fields, f);
	}
	MemoryContextSwitchTo(oldctx);
	return fields;
}

SyncCollection *
sync_load_collection(int32 id)
{
	Oid			argtype = INT4OID;
	Datum		arg = Int32GetDatum(id);
	SyncCollection *c;
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	int			ret;
	MemoryContext oldctx;

	static SPIPlanPtr plan = NULL;

	ret = execute_kept(&plan, "SELECT c.id, c.source_id, c.name, c.relid, c.options, st.cursor, st.phase, "
					   "       st.reconcile_requested, st.column_backfill, "
					   "       coalesce(extract(epoch FROM now() - st.schema_checked_at)::float8, 1e12) "
					   "FROM sync.collections c JOIN sync.collection_state st ON st.collection_id = c.id "
					   "WHERE c.id = $1",
					   1, &argtype, &arg, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read sync.collections: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("sync collection %d does not exist", id)));
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	oldctx = MemoryContextSwitchTo(spi_result_context());
	c = palloc0(sizeof(SyncCollection));
	c->id = DatumGetInt32(SPI_getbinval(tup, desc, 1, &isnull));
	c->source_id = DatumGetInt32(SPI_getbinval(tup, desc, 2, &isnull));
	c->name = spi_text(tup, desc, 3);
	c->relid = DatumGetObjectId(SPI_getbinval(tup, desc, 4, &isnull));
	c->options = spi_json(tup, desc, 5, "collection options");
	c->cursor = spi_json(tup, desc, 6, "collection cursor");
	c->phase = spi_text(tup, desc, 7);
	c->reconcile_requested = DatumGetBool(SPI_getbinval(tup, desc, 8, &isnull));
	c->column_backfill = spi_json(tup, desc, 9, "column backfill");
	c->schema_checked_ago_s = DatumGetFloat8(SPI_getbinval(tup, desc, 10, &isnull));
	MemoryContextSwitchTo(oldctx);
	c->fields = load_fields(id);
	return c;
}

/*
 * The table may have changed while the step's requests were in flight (a
 * column dropped, renamed or retyped): write the page with the columns as
 * they are now, limited to the fields the step asked the API for, so a
 * column added meanwhile is left to its column backfill.
 */
void
sync_refresh_fields(SyncCollection *c, List *asked)
{
	List	   *now = load_fields(c->id);
	List	   *kept = NIL;
	ListCell   *lc;

	foreach(lc, now)
	{
		SyncField  *f = lfirst(lc);
		ListCell   *la;

		foreach(la, asked)
			if (strcmp(((SyncField *) lfirst(la))->api_field, f->api_field) == 0)
			{
				kept = lappend(kept, f);
				break;
			}
	}
	c->fields = kept;
}

void
sync_free_collection(SyncCollection *collection)
{
	json_decref(collection->options);
	json_decref(collection->cursor);
	json_decref(collection->column_backfill);
	collection->options = collection->cursor = collection->column_backfill = NULL;
}

/*
 * Save a refreshed access token (this takes ownership of token). A refresh
 * token that differs from the stored one (rotation) is saved with it, in the
 * same transaction, so a single-use refresh token is never lost.
 */
void
sync_save_refreshed_token(SyncSource *source, json_t *token, const char *new_refresh_token)
{
	json_t	   *volatile rotated = NULL;
	const char *current = sync_json_string(source->credentials, "refresh_token");

	if (new_refresh_token && (current == NULL || strcmp(new_refresh_token, current) != 0))
	{
		rotated = json_deep_copy(source->credentials);
		json_object_set_new(rotated, "refresh_token", json_string(new_refresh_token));
	}
	PG_TRY();
	{
		sync_save_token(source, token, rotated);
	}
	PG_FINALLY();
	{
		json_decref(token);
		json_decref(rotated);
	}
	PG_END_TRY();
}

/*
 * Every worker transaction first takes a share lock on the extension itself.
 * DROP EXTENSION (and ALTER EXTENSION) lock it exclusively before touching any
 * of our tables, so a worker never holds a table lock they wait for: no
 * deadlock, and the worker simply skips its turn while they run.
 */
void
sync_lock_extension(void)
{
	Oid			extension = get_extension_oid(SYNC_EXTENSION_NAME, true);

	if (!OidIsValid(extension) ||
		!ConditionalLockDatabaseObject(ExtensionRelationId, extension, 0, AccessShareLock))
		ereport(ERROR,
				(errcode(ERRCODE_LOCK_NOT_AVAILABLE),
				 errmsg("the sync extension is being dropped or altered")));
}

/*
 * Writes to the catalog that must commit on their own when no transaction
 * is open (a worker between pages), or join the caller's: SPI connected.
 */
void
sync_catalog_write_begin(bool own_xact)
{
	if (own_xact)
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		sync_lock_extension();
		PushActiveSnapshot(GetTransactionSnapshot());
	}
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
}

void
sync_catalog_write_end(bool own_xact)
{
	SPI_finish();
	if (own_xact)
	{
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
}

/*
 * Save a refreshed token, and a rotated refresh token, so the next step and
 * other backends use it. Runs in its own transaction when none is open (the
 * worker between requests); inside the caller's otherwise (sync.add_collection).
 */
void
sync_save_token(SyncSource *source, json_t *token, json_t *rotated_credentials)
{
	bool		own_xact = !IsTransactionState();
	Oid			types[3] = {INT4OID, TEXTOID, TEXTOID};
	Datum		args[3];
	char		nulls[3] = {' ', ' ', ' '};
	char	   *token_text = sync_json_dump(token);
	char	   *cred_text = rotated_credentials ? sync_json_dump(rotated_credentials) : NULL;
	int			ret;

	sync_catalog_write_begin(own_xact);
	args[0] = Int32GetDatum(source->id);
	args[1] = CStringGetTextDatum(token_text);
	if (cred_text)
		args[2] = CStringGetTextDatum(cred_text);
	else
	{
		args[2] = (Datum) 0;
		nulls[2] = 'n';
	}
	ret = SPI_execute_with_args("UPDATE sync.source_secrets SET token = $2::jsonb, token_updated_at = now(), "
								"credentials = coalesce($3::jsonb, credentials) WHERE source_id = $1",
								3, types, args, nulls, false, 0);
	if (ret != SPI_OK_UPDATE)
		elog(ERROR, "could not save a sync token: %s", SPI_result_code_string(ret));
	sync_catalog_write_end(own_xact);
	pfree(token_text);
	if (cred_text)
		pfree(cred_text);
	json_decref(source->token);
	source->token = json_incref(token);
	if (rotated_credentials)
	{
		json_decref(source->credentials);
		source->credentials = json_incref(rotated_credentials);
	}
}
