/*
 * target_airtable.c: fuzz src/airtable.c (token refresh with rotating refresh
 * tokens, base schema, list pages with offsets, expired iterators, filtered
 * polls, delete sweeps, rate-limit answers).
 *
 * Scenarios (input byte 0): table = n % 4 (Contacts, "Companies & Partners",
 * a name with quotes and an emoji, a table id), state = n / 4 % 7:
 *   0 fresh backfill             4 delete sweep due
 *   1 backfill, next page        5 delete sweep, next page
 *   2 poll                       6 column backfill (id and one field)
 *   3 poll, next page
 * Flags: 0x02 OAuth credentials, no token yet (with 0x04 too: no client
 * secret); 0x04 overlap 0 and sweep_interval 60.
 */
#include "harness.h"

static const char *const tables[] = {
	"Contacts", "Companies & Partners", "Zo\xc3\xab's \"Tasks\" \xf0\x9f\x9a\x80", "tblFUZZ0000000001",
};

static void
at_setup(FuzzCase *fc, int scenario)
{
	SyncSource *s = fc->source;
	SyncCollection *c = fc->collection;
	double		now = fc->now;
	int			which = scenario % 4;
	int			state = scenario / 4 % 7;
	const char *offset = "itrFUZZ0000000001/recFUZZ0000000001";
	char	   *incr;

	json_decref(s->credentials);
	if ((fc->flags & FUZZ_FLAG_ALT_CREDENTIALS) && (fc->flags & FUZZ_FLAG_ALT_OPTIONS))
		s->credentials = fuzz_json("{\"client_id\": \"fuzz-client\", \"refresh_token\": \"CANARYrefresh\"}");
	else if (fc->flags & FUZZ_FLAG_ALT_CREDENTIALS)
		s->credentials = fuzz_json("{\"client_id\": \"fuzz-client\", \"client_secret\": \"CANARYsecret\", "
								   "\"refresh_token\": \"CANARYrefresh\"}");
	else
		s->credentials = fuzz_json("{\"access_token\": \"CANARYaccess\"}");
	json_decref(s->options);
	s->options = (fc->flags & FUZZ_FLAG_ALT_OPTIONS) ?
		fuzz_json("{\"base_id\": \"appFUZZ0000000001\", \"requests_per_second\": 5, \"overlap\": 0, "
				  "\"sweep_interval\": 60}") :
		fuzz_json("{\"base_id\": \"appFUZZ0000000001\", \"requests_per_second\": 5}");
	c->name = (char *) tables[which];
	c->fields = list_make5(fuzz_field("id", "recordId", "text", true, false),
						   fuzz_field("fldFUZZ0000000001", "singleLineText", "text", false, false),
						   fuzz_field("fldFUZZ0000000002", "number", "numeric", false, false),
						   fuzz_field("fldFUZZ0000000003", "checkbox", "boolean", false, false),
						   fuzz_field("fldFUZZ0000000004", "multipleSelects", "text[]", false, false));

	incr = psprintf("\"mode\": \"incremental\", \"safe_from\": %.1f", now - 70);
	switch (state)
	{
		case 0:
			break;
		case 1:
			c->cursor = fuzz_json("{\"mode\": \"backfill\", \"offset\": \"%s\", \"started\": %.1f}", offset,
								  now - 30);
			break;
		case 2:
			c->cursor = fuzz_json("{%s, \"sweep_at\": %.1f}", incr, now);
			c->phase = "incremental";
			break;
		case 3:
			c->cursor = fuzz_json("{%s, \"sweep_at\": %.1f, \"offset\": \"%s\", \"started\": %.1f}", incr, now,
								  offset, now - 10);
			c->phase = "incremental";
			break;
		case 4:
			c->cursor = fuzz_json("{%s, \"sweep_at\": %.1f}", incr, now - 400);
			c->phase = "incremental";
			break;
		case 5:
			c->cursor = fuzz_json("{%s, \"sweep_at\": %.1f, \"sweep\": {\"offset\": \"%s\"}, \"sweep_turn\": true}",
								  incr, now, offset);
			c->phase = "incremental";
			break;
		case 6:
			c->fields = list_make2(fuzz_field("id", "recordId", "text", true, false),
								   fuzz_field("fldFUZZ0000000002", "number", "numeric", false, false));
			break;
	}
}

static const FuzzTarget at_target = {
	.kind = "airtable",
	.provider = &sync_airtable_provider,
	.nscenarios = 28,
	.setup = at_setup,
};

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	return fuzz_test_one_input(&at_target, data, size);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	return fuzz_initialize(&at_target, argc, argv);
}
