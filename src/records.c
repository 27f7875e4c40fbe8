/*
 * records.c: a page's records as SQL arguments. Each field travels as one
 * text array (element i: record i's value, NULL where the record has none),
 * which statements unnest WITH ORDINALITY into r(f1, ..., fN, _sync_position)
 * and cast to the field's wire type. Every value is read once, by its type's
 * input function, as COPY reads it: no JSON text of the page is printed and
 * parsed again on the way into the table.
 *
 * Fields are named by position (f1, f2, ...), never by their API names:
 * those can be longer than an identifier or collide once cut.
 */
#include "sync.h"

#include "catalog/pg_type.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

typedef enum WireForm
{
	WIRE_TEXT,					/* strings as they are, other values as JSON text */
	WIRE_JSON,					/* every value as JSON text (json, jsonb) */
	WIRE_ARRAY					/* a JSON array as an array literal */
} WireForm;

static WireForm
wire_form(const SyncField *f)
{
	size_t		len = strlen(f->wire_type);

	if (strcmp(f->wire_type, "json") == 0 || strcmp(f->wire_type, "jsonb") == 0)
		return WIRE_JSON;
	if (len > 2 && strcmp(f->wire_type + len - 2, "[]") == 0)
		return WIRE_ARRAY;
	return WIRE_TEXT;
}

/* "unnest($first::text[], ...) WITH ORDINALITY AS r(f1, ..., _sync_position)" */
char *
sync_records_from(List *fields, int first_param)
{
	StringInfoData sql;
	int			n = list_length(fields);

	initStringInfo(&sql);
	appendStringInfoString(&sql, "unnest(");
	for (int i = 0; i < n; i++)
		appendStringInfo(&sql, "%s$%d::text[]", i > 0 ? ", " : "", first_param + i);
	appendStringInfoString(&sql, ") WITH ORDINALITY AS r(");
	for (int i = 0; i < n; i++)
		appendStringInfo(&sql, "%s, ", sync_record_key(i));
	appendStringInfoString(&sql, "_sync_position)");
	return sql.data;
}

/* The wire value of field f (one of fields) in a row of sync_records_from(fields): "(r.f3)::numeric" */
char *
sync_record_value(List *fields, const SyncField *f)
{
	ListCell   *lc;

	foreach(lc, fields)
	{
		if (lfirst(lc) != f)
			continue;
		if (strcmp(f->wire_type, "text") == 0)
			return psprintf("r.%s", sync_record_key(foreach_current_index(lc)));
		return psprintf("(r.%s)::%s", sync_record_key(foreach_current_index(lc)), f->wire_type);
	}
	elog(ERROR, "field \"%s\" is not among the collection's fields", f->api_field);
	return NULL;
}

/* An element of an array literal: quoted, so that any text survives */
static void
append_array_element(StringInfo buf, json_t *item)
{
	const char *s;
	size_t		len;
	char	   *dumped = NULL;

	if (json_is_null(item))
	{
		appendStringInfoString(buf, "NULL");
		return;
	}
	if (json_is_array(item))
	{
		size_t		i;
		json_t	   *sub;

		/* nested arrays: a multidimensional literal, as json_to_recordset reads them */
		appendStringInfoChar(buf, '{');
		json_array_foreach(item, i, sub)
		{
			if (i > 0)
				appendStringInfoChar(buf, ',');
			append_array_element(buf, sub);
		}
		appendStringInfoChar(buf, '}');
		return;
	}
	if (json_is_string(item))
	{
		s = json_string_value(item);
		len = json_string_length(item);
	}
	else
	{
		dumped = sync_json_dump(item);
		s = dumped;
		len = strlen(dumped);
	}
	appendStringInfoChar(buf, '"');
	for (size_t i = 0; i < len; i++)
	{
		if (s[i] == '\0')
			continue;			/* no NUL in text */
		if (s[i] == '"' || s[i] == '\\')
			appendStringInfoChar(buf, '\\');
		appendStringInfoChar(buf, s[i]);
	}
	appendStringInfoChar(buf, '"');
	if (dumped)
		pfree(dumped);
}

static Datum
value_datum(json_t *v, WireForm form, StringInfo scratch)
{
	char		number[64];

	if (form != WIRE_JSON)
	{
		switch (json_typeof(v))
		{
			case JSON_STRING:
				if (memchr(json_string_value(v), '\0', json_string_length(v)) == NULL)
					return PointerGetDatum(cstring_to_text_with_len(json_string_value(v), json_string_length(v)));
				/* text cannot hold NUL: dropped, as the JSON writer drops it */
				resetStringInfo(scratch);
				for (size_t i = 0; i < json_string_length(v); i++)
					if (json_string_value(v)[i] != '\0')
						appendStringInfoChar(scratch, json_string_value(v)[i]);
				return PointerGetDatum(cstring_to_text_with_len(scratch->data, scratch->len));
			case JSON_INTEGER:
				snprintf(number, sizeof(number), "%" JSON_INTEGER_FORMAT, json_integer_value(v));
				return PointerGetDatum(cstring_to_text(number));
			case JSON_TRUE:
				return PointerGetDatum(cstring_to_text("true"));
			case JSON_FALSE:
				return PointerGetDatum(cstring_to_text("false"));
			case JSON_ARRAY:
				if (form == WIRE_ARRAY)
				{
					resetStringInfo(scratch);
					append_array_element(scratch, v);
					return PointerGetDatum(cstring_to_text_with_len(scratch->data, scratch->len));
				}
				break;
			default:
				break;
		}
	}
	resetStringInfo(scratch);
	sync_json_append(scratch, v);
	return PointerGetDatum(cstring_to_text_with_len(scratch->data, scratch->len));
}

/*
 * A text value of the batch: carved from large blocks of the batch's memory
 * context rather than a palloc each (a page holds tens of thousands of
 * values, all freed together). Large values get their own.
 */
#define BATCH_ARENA_BYTES (128 * 1024)

Datum
sync_batch_make_text(SyncBatch *b, const char *data, int len)
{
	Size		need = INTALIGN(VARHDRSZ + (Size) len);
	text	   *t;

	if (need > b->arena_left)
	{
		if (need > BATCH_ARENA_BYTES / 8)
		{
			t = (text *) MemoryContextAlloc(b->context, VARHDRSZ + len);
			SET_VARSIZE(t, VARHDRSZ + len);
			memcpy(VARDATA(t), data, len);
			return PointerGetDatum(t);
		}
		b->arena = MemoryContextAlloc(b->context, BATCH_ARENA_BYTES);
		b->arena_left = BATCH_ARENA_BYTES;
	}
	t = (text *) b->arena;
	SET_VARSIZE(t, VARHDRSZ + len);
	memcpy(VARDATA(t), data, len);
	b->arena += need;
	b->arena_left -= need;
	return PointerGetDatum(t);
}

/* An empty batch for fields, with room for capacity records (it grows). */
SyncBatch *
sync_batch_new(List *fields, int capacity)
{
	SyncBatch  *b = palloc0(sizeof(SyncBatch));

	b->fields = fields;
	b->context = CurrentMemoryContext;
	b->nfields = list_length(fields);
	b->capacity = Max(capacity, 1);
	b->values = palloc(sizeof(Datum *) * Max(b->nfields, 1));
	b->nulls = palloc(sizeof(bool *) * Max(b->nfields, 1));
	for (int f = 0; f < b->nfields; f++)
	{
		b->values[f] = palloc(sizeof(Datum) * b->capacity);
		b->nulls[f] = palloc(sizeof(bool) * b->capacity);
	}
	return b;
}

/* Room for one more record, all its values null; returns its index. */
int
sync_batch_add(SyncBatch *b)
{
	if (b->nrecords == b->capacity)
	{
		b->capacity *= 2;
		for (int f = 0; f < b->nfields; f++)
		{
			b->values[f] = repalloc(b->values[f], sizeof(Datum) * b->capacity);
			b->nulls[f] = repalloc(b->nulls[f], sizeof(bool) * b->capacity);
		}
	}
	for (int f = 0; f < b->nfields; f++)
	{
		b->values[f][b->nrecords] = (Datum) 0;
		b->nulls[f][b->nrecords] = true;
	}
	return b->nrecords++;
}

/* Record i's value of field f as text (NULL: null), as SQL will read it. */
char *
sync_batch_text(SyncBatch *b, int f, int i)
{
	return b->nulls[f][i] ? NULL : text_to_cstring(DatumGetTextPP(b->values[f][i]));
}

/* Forget record i (the later ones move up). */
void
sync_batch_remove(SyncBatch *b, int i)
{
	for (int f = 0; f < b->nfields; f++)
	{
		memmove(&b->values[f][i], &b->values[f][i + 1], sizeof(Datum) * (b->nrecords - i - 1));
		memmove(&b->nulls[f][i], &b->nulls[f][i + 1], sizeof(bool) * (b->nrecords - i - 1));
	}
	b->nrecords--;
}

/* A batch of field f of record i alone (sharing the values). */
SyncBatch *
sync_batch_one(SyncBatch *b, int f, int i)
{
	SyncBatch  *one = sync_batch_new(list_make1(list_nth(b->fields, f)), 1);

	sync_batch_add(one);
	one->values[0][0] = b->values[f][i];
	one->nulls[0][0] = b->nulls[f][i];
	return one;
}

/* Field f of every record alone (sharing the values). */
SyncBatch *
sync_batch_column(SyncBatch *b, int f)
{
	SyncBatch  *col = palloc0(sizeof(SyncBatch));

	col->context = CurrentMemoryContext;
	col->fields = list_make1(list_nth(b->fields, f));
	col->nfields = 1;
	col->nrecords = b->nrecords;
	col->capacity = b->capacity;
	col->values = palloc(sizeof(Datum *));
	col->nulls = palloc(sizeof(bool *));
	col->values[0] = b->values[f];
	col->nulls[0] = b->nulls[f];
	return col;
}

/*
 * The batch for fields, which sync_refresh_fields() read again after the
 * batch was made (a column may have gone meanwhile): the same values, matched
 * by API field, sharing b's.
 */
SyncBatch *
sync_batch_for_fields(SyncBatch *b, List *fields)
{
	SyncBatch  *mapped;
	ListCell   *lc;

	if (b->fields == fields)
		return b;
	mapped = palloc0(sizeof(SyncBatch));
	mapped->context = CurrentMemoryContext;
	mapped->fields = fields;
	mapped->nfields = list_length(fields);
	mapped->nrecords = b->nrecords;
	mapped->capacity = b->capacity;
	mapped->values = palloc(sizeof(Datum *) * Max(mapped->nfields, 1));
	mapped->nulls = palloc(sizeof(bool *) * Max(mapped->nfields, 1));
	foreach(lc, fields)
	{
		SyncField  *f = lfirst(lc);
		int			n = foreach_current_index(lc);
		ListCell   *old;

		mapped->values[n] = NULL;
		foreach(old, b->fields)
			if (strcmp(((SyncField *) lfirst(old))->api_field, f->api_field) == 0)
			{
				mapped->values[n] = b->values[foreach_current_index(old)];
				mapped->nulls[n] = b->nulls[foreach_current_index(old)];
				break;
			}
		if (mapped->values[n] == NULL)
		{
			/* not read with the page (cannot happen: fields only shrink): nulls */
			mapped->values[n] = palloc0(sizeof(Datum) * Max(b->capacity, 1));
			mapped->nulls[n] = palloc(sizeof(bool) * Max(b->capacity, 1));
			memset(mapped->nulls[n], true, sizeof(bool) * Max(b->capacity, 1));
		}
	}
	return mapped;
}

/* Records as the API gave them (objects keyed by API field) as a batch for fields. */
SyncBatch *
sync_batch_from_json(json_t *records, List *fields)
{
	SyncBatch  *b = sync_batch_new(fields, (int) json_array_size(records));
	StringInfoData scratch;
	json_t	   *record;
	size_t		i;
	ListCell   *lc;

	initStringInfo(&scratch);
	json_array_foreach(records, i, record)
		sync_batch_add(b);
	foreach(lc, fields)
	{
		const SyncField *f = lfirst(lc);
		WireForm	form = wire_form(f);
		int			n = foreach_current_index(lc);

		json_array_foreach(records, i, record)
		{
			json_t	   *v = json_is_object(record) ? json_object_get(record, f->api_field) : NULL;

			if (v == NULL || json_is_null(v))
				continue;
			b->nulls[n][i] = false;
			b->values[n][i] = value_datum(v, form, &scratch);
		}
	}
	pfree(scratch.data);
	return b;
}

/* A value of field f as records.c makes it text (*isnull for JSON null). */
Datum
sync_json_value_datum(json_t *v, const SyncField *f, bool *isnull)
{
	StringInfoData scratch;
	Datum		d;

	*isnull = (v == NULL || json_is_null(v));
	if (*isnull)
		return (Datum) 0;
	initStringInfo(&scratch);
	d = value_datum(v, wire_form(f), &scratch);
	pfree(scratch.data);
	return d;
}

/* One text[] per field of the batch, in values[0..nfields-1], in the current memory context. */
void
sync_batch_arrays(SyncBatch *b, Datum *values)
{
	int			dims[1] = {b->nrecords};
	int			lbs[1] = {1};

	for (int f = 0; f < b->nfields; f++)
		values[f] = PointerGetDatum(construct_md_array(b->values[f], b->nulls[f], 1, dims, lbs,
													   TEXTOID, -1, false, TYPALIGN_INT));
}

/* Argument types for sync_batch_arrays(): n text arrays. */
Oid *
sync_records_argtypes(int n)
{
	Oid		   *types = palloc(sizeof(Oid) * Max(n, 1));

	for (int i = 0; i < n; i++)
		types[i] = TEXTARRAYOID;
	return types;
}
