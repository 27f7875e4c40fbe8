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
 * The expression that stores a field's wire value r.f1 in the column as an
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
	char	   *ref = psprintf("r.%s", sync_record_key(0));

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

/* Whether every value of records survives sql; the error of the first that does not. */
static bool
fits(const char *sql, json_t *records, const SyncField *f, ErrorData **error)
{
	int64		processed;
	ErrorData  *failure = sync_try_with_records(NULL, sql, records, list_make1((SyncField *) f), SPI_OK_SELECT,
												&processed);

	if (failure && error)
		*error = failure;
	return failure == NULL;
}

static void
record_rejection(SyncCollection *c, const SyncField *key, const SyncField *f, json_t *record,
				 ErrorData *error, bool record_dropped)
{
	json_t	   *kv = json_object_get(record, key->api_field);
	json_t	   *v = json_object_get(record, f->api_field);
	char	   *key_text = kv ? (json_is_string(kv) ? pstrdup(json_string_value(kv)) : sync_json_dump(kv)) : pstrdup("");
	char	   *value_text = v ? (json_is_string(v) ? pstrdup(json_string_value(v)) : sync_json_dump(v)) : NULL;
	Oid			types[8] = {INT4OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, BOOLOID};
	Datum		args[8];
	char		nulls[8] = "        ";

	if (value_text && strlen(value_text) > REJECTED_VALUE_MAX_BYTES)
		value_text[pg_mbcliplen(value_text, strlen(value_text), REJECTED_VALUE_MAX_BYTES)] = '\0';
	args[0] = Int32GetDatum(c->id);
	args[1] = CStringGetTextDatum(key_text);
	args[2] = CStringGetTextDatum(f->api_field);
	args[3] = CStringGetTextDatum(f->column_name);
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
 * Make page->records storable: null each value that does not fit its column
 * (dropping records whose key does not fit) and record it. Returns how many
 * values were rejected; 0 means the failure was not a value that does not fit.
 */
int64
sync_reject_unfit_values(SyncCollection *c, SyncPage *page)
{
	const SyncField *key = NULL;
	int64		rejected = 0;
	ListCell   *lc;

	foreach(lc, c->fields)
		if (((SyncField *) lfirst(lc))->is_key)
			key = lfirst(lc);
	if (key == NULL || !json_is_array(page->records))
		return 0;

	/* the key first: a record without a storable key is dropped, so other checks skip it */
	for (int pass = 0; pass < 2; pass++)
	{
		foreach(lc, c->fields)
		{
			SyncField  *f = lfirst(lc);
			char	   *sql;
			ErrorData  *error = NULL;

			if ((pass == 0) != f->is_key)
				continue;
			sql = psprintf("SELECT count(%s) FROM json_to_recordset($1::json) AS r(%s %s)",
						   stored_value_expr(c, f), sync_record_key(0), f->wire_type);
			if (fits(sql, page->records, f, NULL))
				continue;
			for (size_t i = 0; i < json_array_size(page->records);)
			{
				json_t	   *record = json_array_get(page->records, i);
				json_t	   *one = json_pack("[O]", record);
				bool		ok = fits(sql, one, f, &error);

				json_decref(one);
				if (ok)
				{
					i++;
					continue;
				}
				record_rejection(c, key, f, record, error, f->is_key);
				rejected++;
				if (f->is_key)
				{
					json_array_remove(page->records, i);
					continue;
				}
				json_object_set_new(record, f->api_field, json_null());
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
