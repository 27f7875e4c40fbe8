/*
 * target_jsonscan.c: the page scanner (src/jsonscan.c) against jansson.
 *
 * The scanner takes a backfill page without building a JSON tree and must
 * store exactly what the jansson path stores (records.c from jansson's
 * values), or give up on the page. For every input it takes, the same page
 * is parsed with jansson and both batches are compared value by value; a
 * difference aborts. The one difference allowed: a number in a text column,
 * which the scanner keeps as written (jansson would print it again).
 *
 * Fields (one per form records.c knows): a text key, text, jsonb, json,
 * numeric, boolean, a text[] array, and a ';'-list; the deleted flag is
 * "IsDeleted", as Salesforce's.
 */
#include "harness.h"
#include "pgshim.h"

static List *
scan_fields(void)
{
	List	   *fields = NIL;

	fields = lappend(fields, fuzz_field("Id", "id", "text", true, false));
	fields = lappend(fields, fuzz_field("Name", "string", "text", false, false));
	fields = lappend(fields, fuzz_field("Address", "address", "jsonb", false, false));
	fields = lappend(fields, fuzz_field("Extra", "anyType", "json", false, false));
	fields = lappend(fields, fuzz_field("Amount", "currency", "numeric", false, false));
	fields = lappend(fields, fuzz_field("Flag", "boolean", "boolean", false, false));
	fields = lappend(fields, fuzz_field("Tags", "array", "text[]", false, false));
	fields = lappend(fields, fuzz_field("Picks", "multipicklist", "text", false, false));
	return fields;
}

static bool
same_text(Datum a, Datum b)
{
	text	   *x = DatumGetTextPP(a);
	text	   *y = DatumGetTextPP(b);

	return VARSIZE_ANY_EXHDR(x) == VARSIZE_ANY_EXHDR(y) &&
		memcmp(VARDATA_ANY(x), VARDATA_ANY(y), VARSIZE_ANY_EXHDR(x)) == 0;
}

static void
differ(const char *what, int f, int i, SyncBatch *scanned, SyncBatch *parsed)
{
	fprintf(stderr, "fuzz invariant: the scanner and jansson differ (%s) at record %d, field %d:\n", what, i, f);
	if (!scanned->nulls[f][i])
		fprintf(stderr, "  scanned: %s\n", text_to_cstring(DatumGetTextPP(scanned->values[f][i])));
	if (!parsed->nulls[f][i])
		fprintf(stderr, "  jansson: %s\n", text_to_cstring(DatumGetTextPP(parsed->values[f][i])));
	abort();
}

static void
compare_page(const uint8_t *data, size_t size, List *fields, SyncBatch *scanned)
{
	json_error_t err;
	json_t	   *page = json_loadb((const char *) data, size, 0, &err);
	json_t	   *records;
	SyncBatch  *parsed;

	/*
	 * jansson refuses some pages the scanner takes: numbers out of its range
	 * (kept as written in text columns) and nesting deeper than jansson's.
	 */
	if (page == NULL)
		return;
	records = json_object_get(page, "records");
	if (!json_is_array(records))
	{
		fprintf(stderr, "fuzz invariant: the scanner took a page whose records jansson does not see\n");
		abort();
	}
	parsed = sync_batch_from_json(records, fields);
	if (parsed->nrecords != scanned->nrecords)
	{
		fprintf(stderr, "fuzz invariant: %d records scanned, %d parsed\n", scanned->nrecords, parsed->nrecords);
		abort();
	}
	for (int i = 0; i < parsed->nrecords; i++)
	{
		json_t	   *record = json_array_get(records, i);

		for (int f = 0; f < parsed->nfields; f++)
		{
			SyncField  *field = list_nth(fields, f);
			json_t	   *v = json_object_get(record, field->api_field);

			if (parsed->nulls[f][i] != scanned->nulls[f][i])
				differ("null", f, i, scanned, parsed);
			if (parsed->nulls[f][i] || same_text(parsed->values[f][i], scanned->values[f][i]))
				continue;
			if (json_is_number(v) && strcmp(field->wire_type, "json") != 0 &&
				strcmp(field->wire_type, "jsonb") != 0)
				continue;		/* as written, not as printed again: allowed */
			differ("value", f, i, scanned, parsed);
		}
	}
	json_decref(page);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	List	   *fields;
	json_t	   *envelope = NULL;
	SyncBatch  *batch = NULL;

	fuzz_set_stack_base();
	MemoryContextSwitchTo(fuzz_step_arena());
	fields = scan_fields();
	PG_TRY();
	{
		if (sync_json_scan_page((const char *) data, size, "records", fields, "IsDeleted", &envelope, &batch))
		{
			compare_page(data, size, fields, batch);
			json_decref(envelope);
		}
	}
	PG_CATCH();
	{
		ErrorData  *edata = fuzz_current_error();

		fprintf(stderr, "fuzz invariant: the scanner raised an error: %s\n",
				edata && edata->message ? edata->message : "?");
		abort();
	}
	PG_END_TRY();
	FlushErrorState();
	MemoryContextSwitchTo(fuzz_top_arena());
	fuzz_arena_reset(fuzz_step_arena());
	return 0;
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	json_object_seed(1);
	return 0;
}
