/*
 * reject.c: values that do not fit their columns. When a page's upsert fails
 * on a value (text where a number belongs, a date out of range, a string too
 * long for a narrowed column), each field is checked over the whole page,
 * and the failing field value by value, each check in a subtransaction of
 * its own. A value that does not fit is set to null in the page and recorded
 * in sync.rejected_values; the row is still stored. A record whose key does
 * not fit cannot be stored at all and is recorded the same way.
 *
 * Only pages that failed come here: a clean page costs nothing extra.
 */
#include "sync.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"

#define REJECTED_VALUE_MAX_BYTES 1000

/*
 * The expression that stores a field's value r.f1 (records.c) in the column as an
 * INSERT would: assignment semantics, so a too-long string is an error (an
 * explicit cast would silently cut it).
 */
static char *
stored_value_expr(SyncCollection *c, const SyncField *f)
{
	AttrNumber	attnum = get_attnum(c->relid, f->column_name);
	Oid			typid;
	int32		typmod;
	Oid			collid;
	StringInfoData expr;
	char	   *ref = sync_record_value(list_make1((SyncField *) f), f);

	initStringInfo(&expr);
	if (f->convert_sql && f->convert_sql[0])
	{
		const char *p = strstr(f->convert_sql, "%s");

		appendBinaryStringInfo(&expr, f->convert_sql, p - f->convert_sql);
		appendStringInfoString(&expr, ref);
		appendStringInfoString(&expr, p + 2);
	}
	else
		appendStringInfoString(&expr, ref);
	if (attnum == InvalidAttrNumber)
		return expr.data;
	get_atttypetypmodcoll(c->relid, attnum, &typid, &typmod, &collid);
	if ((typid == VARCHAROID || typid == BPCHAROID) && typmod >= 0)
		return psprintf("pg_catalog.%s((%s)::text, %d, false)",
						typid == VARCHAROID ? "varchar" : "bpchar", expr.data, typmod);
	return psprintf("CAST((%s) AS %s)", expr.data, format_type_with_typemod(typid, typmod));
}

/* Whether every value of batch survives sql; the error of the first that does not. */
static bool
fits(const char *sql, SyncBatch *batch, ErrorData **error)
{
	int64		processed;
	ErrorData  *failure = sync_try_with_records(NULL, sql, batch, SPI_OK_SELECT, &processed);

	if (failure && error)
		*error = failure;
	return failure == NULL;
}

static void
record_rejection(SyncCollection *c, SyncBatch *batch, int key, int f, int i, ErrorData *error,
				 bool record_dropped)
{
	const SyncField *field = list_nth(batch->fields, f);
	char	   *key_text = sync_batch_text(batch, key, i);
	char	   *value_text = sync_batch_text(batch, f, i);
	Oid			types[8] = {INT4OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, BOOLOID};
	Datum		args[8];
	char		nulls[8] = "        ";

	if (value_text && strlen(value_text) > REJECTED_VALUE_MAX_BYTES)
		value_text[pg_mbcliplen(value_text, strlen(value_text), REJECTED_VALUE_MAX_BYTES)] = '\0';
	args[0] = Int32GetDatum(c->id);
	args[1] = CStringGetTextDatum(key_text ? key_text : "");
	args[2] = CStringGetTextDatum(field->api_field);
	args[3] = CStringGetTextDatum(field->column_name);
	args[4] = CStringGetTextDatum(value_text ? value_text : "");
	nulls[4] = value_text ? ' ' : 'n';
	args[5] = CStringGetTextDatum(unpack_sql_state(error->sqlerrcode));
	args[6] = CStringGetTextDatum(error->message ? error->message : "does not fit");
	args[7] = BoolGetDatum(record_dropped);
	if (SPI_execute_with_args("INSERT INTO sync.rejected_values AS v (collection_id, record_id, api_field, column_name, "
							  "  value, sqlstate, message, record_dropped) "
							  "VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
							  "ON CONFLICT (collection_id, record_id, api_field) DO UPDATE "
							  "SET column_name = $4, value = $5, sqlstate = $6, message = $7, record_dropped = $8, "
							  "    last_rejected_at = now(), times = v.times + 1",
							  8, types, args, nulls, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not record a rejected value");
}

/*
 * Make a batch storable: null each value that does not fit its column
 * (dropping records whose key does not fit) and record it. Returns how many
 * values were rejected; 0 means the failure was not a value that does not fit.
 */
int64
sync_reject_unfit_values(SyncCollection *c, SyncBatch *batch)
{
	int			key = -1;
	int64		rejected = 0;
	ListCell   *lc;

	foreach(lc, batch->fields)
		if (((SyncField *) lfirst(lc))->is_key)
			key = foreach_current_index(lc);
	if (key < 0)
		return 0;

	/* the key first: a record without a storable key is dropped, so other checks skip it */
	for (int pass = 0; pass < 2; pass++)
	{
		foreach(lc, batch->fields)
		{
			SyncField  *f = lfirst(lc);
			int			n = foreach_current_index(lc);
			char	   *sql;
			ErrorData  *error = NULL;

			if ((pass == 0) != f->is_key)
				continue;
			sql = psprintf("SELECT count(%s) FROM %s",
						   stored_value_expr(c, f), sync_records_from(list_make1(f), 1));
			if (fits(sql, sync_batch_column(batch, n), NULL))
				continue;
			for (int i = 0; i < batch->nrecords;)
			{
				if (fits(sql, sync_batch_one(batch, n, i), &error))
				{
					i++;
					continue;
				}
				record_rejection(c, batch, key, n, i, error, f->is_key);
				rejected++;
				if (f->is_key)
				{
					sync_batch_remove(batch, i);
					continue;
				}
				batch->nulls[n][i] = true;
				i++;
			}
		}
	}
	if (rejected > 0)
		ereport(LOG,
				(errmsg("sync stored a page of collection \"%s\" without %lld values that do not fit their columns",
						c->name, (long long) rejected),
				 errhint("They are listed in sync.rejected_values.")));
	return rejected;
}
