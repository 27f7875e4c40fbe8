/*
 * copyload.c: the fast path of a backfill. Records whose keys the table does
 * not hold yet are written through COPY's own machinery (tuples built by the
 * columns' input functions, inserted in batches, indexes updated once per
 * tuple), which costs a fraction of an INSERT ... ON CONFLICT per row. The
 * records whose keys exist go through the upsert as before, so the rules of
 * store.c hold for them: rows never go backwards, unchanged rows are not
 * rewritten.
 *
 * The path is taken only where it writes exactly what the upsert would: every
 * field stored as its text read by the column's type (no conversion
 * expression, wire type text or the column's own type), no key twice in the
 * batch. Anything COPY refuses (a value that does not fit, a key inserted
 * meanwhile by someone else) rolls back its subtransaction and the whole
 * batch takes the upsert, which sets unfit values aside (reject.c).
 */
#include "sync.h"

#include "access/table.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/copy.h"
#include "executor/spi.h"
#include "mb/pg_wchar.h"
#include "nodes/makefuncs.h"
#include "parser/parse_relation.h"
#include "parser/parse_type.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

/* COPY's data source callback takes no argument: the batch being read. */
typedef struct CopySource
{
	SyncBatch  *batch;
	int		   *rows;			/* the records to write, by index */
	int			nrows;
	int			next_row;
	bool	   *split;			/* per field: a ';'-separated list stored as an array */
	const char *synced_at;		/* _synced_at of every row: the transaction's now() */
	StringInfoData buf;			/* rendered COPY text not yet handed out */
	StringInfoData scratch;
	int			buf_pos;
} CopySource;

static CopySource *copy_source = NULL;

#define COPY_RENDER_BYTES 65536

/* Text in COPY's text format: backslash, tab and line ends escaped. */
static void
append_copy_text(StringInfo buf, const char *s, int len)
{
	int			start = 0;

	for (int i = 0; i < len; i++)
	{
		const char *esc;

		switch (s[i])
		{
			case '\\':
				esc = "\\\\";
				break;
			case '\t':
				esc = "\\t";
				break;
			case '\n':
				esc = "\\n";
				break;
			case '\r':
				esc = "\\r";
				break;
			default:
				continue;
		}
		appendBinaryStringInfo(buf, s + start, i - start);
		appendStringInfoString(buf, esc);
		start = i + 1;
	}
	appendBinaryStringInfo(buf, s + start, len - start);
}

/* string_to_array(value, ';') as an array literal, in COPY's text format. */
static void
append_split_value(StringInfo buf, const char *s, int len, StringInfo scratch)
{
	resetStringInfo(scratch);
	sync_append_split_literal(scratch, s, len);
	append_copy_text(buf, scratch->data, scratch->len);
}

static void
render_rows(CopySource *src)
{
	SyncBatch  *b = src->batch;

	resetStringInfo(&src->buf);
	src->buf_pos = 0;
	while (src->next_row < src->nrows && src->buf.len < COPY_RENDER_BYTES)
	{
		int			i = src->rows[src->next_row++];

		for (int f = 0; f < b->nfields; f++)
		{
			if (b->nulls[f][i])
				appendStringInfoString(&src->buf, "\\N");
			else
			{
				text	   *t = DatumGetTextPP(b->values[f][i]);

				if (src->split[f])
					append_split_value(&src->buf, VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t), &src->scratch);
				else
					append_copy_text(&src->buf, VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
			}
			appendStringInfoChar(&src->buf, '\t');
		}
		appendStringInfoString(&src->buf, src->synced_at);
		appendStringInfoChar(&src->buf, '\n');
	}
}

static int
read_copy_source(void *outbuf, int minread, int maxread)
{
	CopySource *src = copy_source;
	int			n;

	if (src->buf_pos >= src->buf.len)
		render_rows(src);
	n = Min(maxread, src->buf.len - src->buf_pos);
	memcpy(outbuf, src->buf.data + src->buf_pos, n);
	src->buf_pos += n;
	return n;					/* 0: every row was read */
}

static bool
is_split(const SyncField *f)
{
	return f->convert_sql && strcmp(f->convert_sql, "string_to_array(%s, ';')") == 0;
}

/*
 * Whether COPY stores field f's text in a column of type typid as the upsert
 * would: read by the column's type itself, or by one of the conversions
 * render_rows does (a plain cast reads the same text or fails the same way,
 * and a failure sends the page to the upsert).
 */
static bool
copy_takes_field(const SyncField *f, Oid typid, int32 typmod)
{
	Oid			wire_typid;
	int32		wire_typmod;

	if (f->convert_sql && f->convert_sql[0])
	{
		if (is_split(f))
			return typid == TEXTARRAYOID;
		if (strcmp(f->convert_sql, "%s::integer") == 0)
			return typid == INT4OID;
		if (strcmp(f->convert_sql, "%s::bigint") == 0)
			return typid == INT8OID;
		return false;
	}
	if (strcmp(f->wire_type, "text") == 0)
		return true;
	/* read as another type first, a value could change on its way (a numeric's scale) */
	parseTypeString(f->wire_type, &wire_typid, &wire_typmod, true);
	return wire_typid == typid && (wire_typmod < 0 || wire_typmod == typmod);
}

/*
 * The statement listing the positions (from 1) of the batch's records whose
 * keys the table holds; NULL when the collection cannot take the COPY path.
 */
char *
sync_existing_keys_sql(SyncCollection *c, const char *table)
{
	const SyncField *key = NULL;
	ListCell   *lc;
	Oid			keytype = InvalidOid;
	int32		keytypmod = -1;

	foreach(lc, c->fields)
	{
		SyncField  *f = lfirst(lc);
		AttrNumber	attnum = get_attnum(c->relid, f->column_name);
		Oid			typid;
		int32		typmod;
		Oid			collid;

		if (attnum == InvalidAttrNumber)
			return NULL;
		get_atttypetypmodcoll(c->relid, attnum, &typid, &typmod, &collid);
		if (!copy_takes_field(f, typid, typmod))
			return NULL;
		if (f->is_key)
		{
			key = f;
			keytype = typid;
			keytypmod = typmod;
		}
	}
	if (key == NULL)
		return NULL;
	return psprintf("SELECT r.pos::int4 FROM unnest($1::text[]) WITH ORDINALITY AS r(k, pos) "
					"WHERE EXISTS (SELECT 1 FROM %s t WHERE t.%s = (r.k)::%s)",
					table, quote_identifier(key->column_name), format_type_with_typemod(keytype, keytypmod));
}

static int
compare_texts(const void *a, const void *b)
{
	text	   *x = DatumGetTextPP(*(const Datum *) a);
	text	   *y = DatumGetTextPP(*(const Datum *) b);
	int			lx = VARSIZE_ANY_EXHDR(x);
	int			ly = VARSIZE_ANY_EXHDR(y);
	int			cmp = memcmp(VARDATA_ANY(x), VARDATA_ANY(y), Min(lx, ly));

	return cmp != 0 ? cmp : (lx > ly) - (lx < ly);
}

/* Whether some key is null or appears twice (the upsert decides between them). */
static bool
keys_need_upsert(SyncBatch *b, int key)
{
	Datum	   *keys = palloc(sizeof(Datum) * Max(b->nrecords, 1));
	bool		result = false;

	for (int i = 0; i < b->nrecords; i++)
	{
		if (b->nulls[key][i])
		{
			pfree(keys);
			return true;
		}
		keys[i] = b->values[key][i];
	}
	qsort(keys, b->nrecords, sizeof(Datum), compare_texts);
	for (int i = 1; i < b->nrecords && !result; i++)
		result = compare_texts(&keys[i - 1], &keys[i]) == 0;
	pfree(keys);
	return result;
}

/* The positions (from 0) of records whose keys exist, marked in *exists. */
static void
find_existing(SyncBatch *b, int key, SPIPlanPtr existing, bool *exists)
{
	int			dims[1] = {b->nrecords};
	int			lbs[1] = {1};
	Datum		arg = PointerGetDatum(construct_md_array(b->values[key], b->nulls[key], 1, dims, lbs,
														 TEXTOID, -1, false, TYPALIGN_INT));
	int			ret = SPI_execute_plan(existing, &arg, NULL, true, 0);

	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not look up a page's keys: %s", SPI_result_code_string(ret));
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		bool		isnull;
		int32		pos = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1, &isnull));

		if (!isnull && pos >= 1 && pos <= b->nrecords)
			exists[pos - 1] = true;
	}
	SPI_freetuptable(SPI_tuptable);
}

static uint64
copy_rows(SyncCollection *c, SyncBatch *b, int *rows, int nrows)
{
	Relation	rel = table_open(c->relid, RowExclusiveLock);
	ParseState *pstate;
	ParseNamespaceItem *nsitem;
	List	   *columns = NIL;
	List	   *options;
	CopyFromState cstate;
	CopySource	src;
	uint64		copied;
	AttrNumber *attnums;
	AttrNumber	synced_at;
	bool	   *split;
	ListCell   *lc;

	split = palloc0(sizeof(bool) * Max(b->nfields, 1));
	foreach(lc, b->fields)
		split[foreach_current_index(lc)] = is_split(lfirst(lc));
	attnums = palloc(sizeof(AttrNumber) * Max(b->nfields, 1));
	if (sync_tuple_load_possible(rel, b->fields, attnums, &synced_at))
	{
		copied = sync_tuple_load(rel, b, rows, nrows, split, attnums, synced_at);
		table_close(rel, NoLock);
		CommandCounterIncrement();
		return copied;
	}

	pstate = make_parsestate(NULL);
	nsitem = addRangeTableEntryForRelation(pstate, rel, RowExclusiveLock, NULL, false, false);
	nsitem->p_rte->requiredPerms = ACL_INSERT;
	foreach(lc, b->fields)
		columns = lappend(columns, makeString(((SyncField *) lfirst(lc))->column_name));
	columns = lappend(columns, makeString("_synced_at"));
	/* the text is the database's own: no conversion, only the validation COPY always does */
	options = list_make1(makeDefElem("encoding", (Node *) makeString((char *) GetDatabaseEncodingName()), -1));

	memset(&src, 0, sizeof(src));
	src.split = split;
	src.batch = b;
	src.rows = rows;
	src.nrows = nrows;
	src.synced_at = DatumGetCString(DirectFunctionCall1(timestamptz_out,
														TimestampTzGetDatum(GetCurrentTransactionStartTimestamp())));
	initStringInfo(&src.buf);
	initStringInfo(&src.scratch);
	copy_source = &src;
	PG_TRY();
	{
		cstate = BeginCopyFrom(pstate, rel, NULL, NULL, false, read_copy_source, columns, options);
		copied = CopyFrom(cstate);
		EndCopyFrom(cstate);
	}
	PG_FINALLY();
	{
		copy_source = NULL;
	}
	PG_END_TRY();
	pfree(src.buf.data);
	pfree(src.scratch.data);
	free_parsestate(pstate);
	table_close(rel, NoLock);
	/* the upsert that follows, and the state update, must see these rows */
	CommandCounterIncrement();
	return copied;
}

/* COPY rows of batch in a subtransaction of its own; false (nothing kept) if it refused. */
static bool
try_copy(SyncCollection *c, SyncBatch *batch, int *rows, int nrows, bool *conflict)
{
	MemoryContext oldcontext = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	volatile bool ok = false;

	*conflict = false;
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcontext);
	PG_TRY();
	{
		uint64		copied;

		PushActiveSnapshot(GetTransactionSnapshot());
		copied = copy_rows(c, batch, rows, nrows);
		/* a trigger that skipped rows: the upsert writes them all, as it would have */
		if (copied != (uint64) nrows)
			elog(ERROR, "COPY of a page wrote %llu of %d rows", (unsigned long long) copied, nrows);
		PopActiveSnapshot();
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
		ok = true;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		/* anything COPY refused, the upsert will sort out record by record */
		MemoryContextSwitchTo(oldcontext);
		edata = CopyErrorData();
		*conflict = edata->sqlerrcode == ERRCODE_UNIQUE_VIOLATION;
		elog(DEBUG1, "sync: %d records of a page go to the upsert: %s", nrows, edata->message);
		FreeErrorData(edata);
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
	}
	PG_END_TRY();
	return ok;
}

/*
 * Write the records of batch whose keys are new through COPY; returns how
 * many, and in *rest the records left for the upsert (the whole batch when
 * COPY cannot take any, or refused them).
 *
 * *optimistic: the collection's last pages held only new keys (a backfill):
 * COPY the whole batch without looking the keys up first; a key that exists
 * after all makes COPY fail, and the keys are looked up from then on, until
 * a page again holds none the table has.
 */
int64
sync_copy_new_records(SyncCollection *c, SyncBatch *batch, SPIPlanPtr existing, bool *optimistic,
					  SyncBatch **rest)
{
	int			key = -1;
	bool	   *exists;
	int		   *rows;
	int			nrows = 0;
	bool		conflict;
	SyncBatch  *left;
	ListCell   *lc;

	*rest = batch;
	foreach(lc, batch->fields)
		if (((SyncField *) lfirst(lc))->is_key)
			key = foreach_current_index(lc);
	if (key < 0 || existing == NULL || keys_need_upsert(batch, key))
		return 0;

	rows = palloc(sizeof(int) * batch->nrecords);
	if (*optimistic)
	{
		for (int i = 0; i < batch->nrecords; i++)
			rows[i] = i;
		if (try_copy(c, batch, rows, batch->nrecords, &conflict))
		{
			*rest = sync_batch_new(batch->fields, 1);
			return batch->nrecords;
		}
		*optimistic = false;
		if (!conflict)
			return 0;			/* not a key that exists: the upsert sorts it out */
	}

	exists = palloc0(sizeof(bool) * batch->nrecords);
	find_existing(batch, key, existing, exists);
	for (int i = 0; i < batch->nrecords; i++)
		if (!exists[i])
			rows[nrows++] = i;
	*optimistic = (nrows == batch->nrecords);
	if (nrows == 0 || !try_copy(c, batch, rows, nrows, &conflict))
		return 0;

	left = sync_batch_new(batch->fields, Max(batch->nrecords - nrows, 1));
	for (int i = 0; i < batch->nrecords; i++)
	{
		int			j;

		if (!exists[i])
			continue;
		j = sync_batch_add(left);
		for (int f = 0; f < batch->nfields; f++)
		{
			left->values[f][j] = batch->values[f][i];
			left->nulls[f][j] = batch->nulls[f][i];
		}
	}
	*rest = left;
	return nrows;
}
