/*
 * tupleload.c: new records of a page written straight into the table and
 * its indexes, the way COPY writes them (batched heap inserts, constraints
 * checked, indexes updated per tuple) but without rendering the values as
 * COPY text for COPY to split again: each value goes from the batch to its
 * column's input function. The encoding check COPY makes is not repeated:
 * every value of a batch is valid UTF-8 already (the JSON and CSV readers
 * check it, and fuzzing checks them), as the upsert path relies on too.
 *
 * Taken only for tables where COPY would do nothing more than that: a plain
 * table without triggers (user triggers, foreign keys), row security,
 * partitions, and without columns outside the collection's that would need
 * a default, an identity or a generated value computed. Other tables take
 * COPY (copyload.c), which does all of it.
 */
#include "sync.h"

#include "access/heapam.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/executor.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "parser/parse_relation.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/timestamp.h"

/* As COPY: at most this many tuples, or this many bytes of values, per heap insert. */
#define TUPLES_PER_INSERT 1000
#define BYTES_PER_INSERT 65536

/*
 * The attribute number of each field's column in rel, and of _synced_at;
 * false when rel is not a table this path may write (see above).
 */
bool
sync_tuple_load_possible(Relation rel, List *fields, AttrNumber *attnums, AttrNumber *synced_at)
{
	TupleDesc	desc = RelationGetDescr(rel);
	bool	   *ours = palloc0(sizeof(bool) * (desc->natts + 1));
	bool		ok = true;
	ListCell   *lc;

	if (rel->rd_rel->relkind != RELKIND_RELATION || rel->trigdesc != NULL ||
		rel->rd_rel->relrowsecurity || rel->rd_rel->relhassubclass)
		ok = false;
	foreach(lc, fields)
	{
		AttrNumber	attnum = get_attnum(RelationGetRelid(rel), ((SyncField *) lfirst(lc))->column_name);

		if (attnum <= 0 || attnum > desc->natts)
			ok = false;
		else
			ours[attnum] = true;
		attnums[foreach_current_index(lc)] = attnum;
	}
	*synced_at = get_attnum(RelationGetRelid(rel), "_synced_at");
	if (*synced_at <= 0 || *synced_at > desc->natts ||
		TupleDescAttr(desc, *synced_at - 1)->atttypid != TIMESTAMPTZOID)
		ok = false;
	else
		ours[*synced_at] = true;
	for (int i = 0; ok && i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);

		if (!att->attisdropped && !ours[i + 1] &&
			(att->atthasdef || att->attidentity || att->attgenerated))
			ok = false;
	}
	pfree(ours);
	return ok;
}

/*
 * ';'-separated text as the array literal string_to_array(value, ';') would
 * equal: every element quoted, so that any text survives; '' is the empty
 * array, as string_to_array makes it.
 */
void
sync_append_split_literal(StringInfo buf, const char *s, int len)
{
	appendStringInfoChar(buf, '{');
	if (len > 0)
	{
		appendStringInfoChar(buf, '"');
		for (int i = 0; i < len; i++)
		{
			if (s[i] == ';')
				appendStringInfoString(buf, "\",\"");
			else
			{
				if (s[i] == '"' || s[i] == '\\')
					appendStringInfoChar(buf, '\\');
				appendStringInfoChar(buf, s[i]);
			}
		}
		appendStringInfoChar(buf, '"');
	}
	appendStringInfoChar(buf, '}');
}

/* Insert the buffered tuples, then their index entries, as CopyFrom does. */
static void
flush_tuples(Relation rel, ResultRelInfo *rri, EState *estate, TupleTableSlot **slots, int n,
			 CommandId cid, BulkInsertState bistate)
{
	if (n == 0)
		return;
	table_multi_insert(rel, slots, n, cid, 0, bistate);
	for (int i = 0; i < n; i++)
	{
		if (rri->ri_NumIndices > 0)
		{
			List	   *recheck = ExecInsertIndexTuples(rri, slots[i], estate, false, false, NULL, NIL);

			list_free(recheck);
		}
		ExecClearTuple(slots[i]);
	}
}

/*
 * Write rows (indexes into batch) into rel; split[f]: field f is a
 * ';'-separated list stored as text[]. Errors are raised as COPY's would be
 * (a value its column refuses, a key the table holds): the caller runs this
 * in a subtransaction.
 */
uint64
sync_tuple_load(Relation rel, SyncBatch *b, const int *rows, int nrows, const bool *split,
				const AttrNumber *attnums, AttrNumber synced_at)
{
	TupleDesc	desc = RelationGetDescr(rel);
	EState	   *estate = CreateExecutorState();
	ResultRelInfo *rri = makeNode(ResultRelInfo);
	RangeTblEntry *rte = makeNode(RangeTblEntry);
	FmgrInfo   *in_funcs = palloc(sizeof(FmgrInfo) * Max(b->nfields, 1));
	Oid		   *in_params = palloc(sizeof(Oid) * Max(b->nfields, 1));
	TupleTableSlot **slots = palloc(sizeof(TupleTableSlot *) * TUPLES_PER_INSERT);
	MemoryContext tuples_cxt = AllocSetContextCreate(CurrentMemoryContext, "sync tuple load",
													 ALLOCSET_DEFAULT_SIZES);
	MemoryContext oldcxt;
	BulkInsertState bistate = GetBulkInsertState();
	CommandId	cid = GetCurrentCommandId(true);
	Datum		now = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
	StringInfoData value;
	int			nslots = 0;
	int			buffered = 0;
	int64		buffered_bytes = 0;

	for (int f = 0; f < b->nfields; f++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, attnums[f] - 1);
		Oid			func;

		getTypeInputInfo(att->atttypid, &func, &in_params[f]);
		fmgr_info(func, &in_funcs[f]);
	}

	rte->rtekind = RTE_RELATION;
	rte->relid = RelationGetRelid(rel);
	rte->relkind = rel->rd_rel->relkind;
	rte->rellockmode = RowExclusiveLock;
	rte->requiredPerms = ACL_INSERT;
	ExecInitRangeTable(estate, list_make1(rte));
	ExecInitResultRelation(estate, rri, 1);
	CheckValidResultRel(rri, CMD_INSERT);
	ExecOpenIndices(rri, false);
	estate->es_output_cid = cid;

	initStringInfo(&value);
	oldcxt = MemoryContextSwitchTo(tuples_cxt);
	for (int r = 0; r < nrows; r++)
	{
		int			i = rows[r];
		TupleTableSlot *slot;

		if (buffered == nslots)
		{
			MemoryContextSwitchTo(oldcxt);
			slots[nslots++] = table_slot_create(rel, NULL);
			MemoryContextSwitchTo(tuples_cxt);
		}
		slot = slots[buffered];
		ExecClearTuple(slot);
		memset(slot->tts_isnull, true, sizeof(bool) * desc->natts);
		for (int f = 0; f < b->nfields; f++)
		{
			AttrNumber	a = attnums[f] - 1;
			text	   *t;

			if (b->nulls[f][i])
				continue;
			t = DatumGetTextPP(b->values[f][i]);
			resetStringInfo(&value);
			if (split[f])
				sync_append_split_literal(&value, VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
			else
				appendBinaryStringInfo(&value, VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
			slot->tts_values[a] = InputFunctionCall(&in_funcs[f], value.data, in_params[f],
													TupleDescAttr(desc, a)->atttypmod);
			slot->tts_isnull[a] = false;
			buffered_bytes += value.len;
		}
		slot->tts_values[synced_at - 1] = now;
		slot->tts_isnull[synced_at - 1] = false;
		ExecStoreVirtualTuple(slot);
		if (desc->constr)
			ExecConstraints(rri, slot, estate);
		buffered++;
		if (buffered == TUPLES_PER_INSERT || buffered_bytes >= BYTES_PER_INSERT)
		{
			flush_tuples(rel, rri, estate, slots, buffered, cid, bistate);
			buffered = 0;
			buffered_bytes = 0;
			MemoryContextReset(tuples_cxt);
			CHECK_FOR_INTERRUPTS();
		}
	}
	flush_tuples(rel, rri, estate, slots, buffered, cid, bistate);
	MemoryContextSwitchTo(oldcxt);

	for (int s = 0; s < nslots; s++)
		ExecDropSingleTupleTableSlot(slots[s]);
	FreeBulkInsertState(bistate);
	table_finish_bulk_insert(rel, 0);
	ExecCloseResultRelations(estate);
	ExecCloseRangeTableRelations(estate);
	FreeExecutorState(estate);
	MemoryContextDelete(tuples_cxt);
	pfree(value.data);
	pfree(in_funcs);
	pfree(in_params);
	pfree(slots);
	return nrows;
}
