/*
 * target_hubspot.c: fuzz src/hubspot.c (token, properties, list pages, the
 * count search, search pages with tie queries, recycle bin, sweeps, merged
 * ids, associations, rate-limit headers and answers).
 *
 * Scenarios (input byte 0): collection = n % 5 (contacts, companies, deals,
 * the custom object 2-1234567, contacts/companies associations), state = n / 5 % 8:
 *   0 fresh backfill                 4 recycle bin due
 *   1 backfill, next page            5 recycle bin, next page
 *   2 poll                           6 delete sweep
 *   3 poll in a tie query            7 column backfill (id, stamp, email)
 * (associations: fresh, next page, incremental walk).
 * Flags: 0x02 OAuth credentials, no token yet; 0x04 date api_version
 * 2026-03, overlap 0, deleted_interval 60.
 */
#include "harness.h"

static const char *const collections[] = {"contacts", "companies", "deals", "2-1234567", "contacts/companies"};

static void
hs_setup(FuzzCase *fc, int scenario)
{
	SyncSource *s = fc->source;
	SyncCollection *c = fc->collection;
	double		now = fc->now;
	int			which = scenario % 5;
	int			state = scenario / 5 % 8;
	long long	ms = (long long) (now - 300) * 1000;
	const char *version = which == 0 ? "lastmodifieddate" : "hs_lastmodifieddate";
	char	   *incr;

	json_decref(s->credentials);
	if (fc->flags & FUZZ_FLAG_ALT_CREDENTIALS)
		s->credentials = fuzz_json("{\"client_id\": \"fuzz-client\", \"client_secret\": \"CANARYsecret\", "
								   "\"refresh_token\": \"CANARYrefresh\"}");
	else
		s->credentials = fuzz_json("{\"access_token\": \"CANARYaccess\"}");
	json_decref(s->options);
	s->options = (fc->flags & FUZZ_FLAG_ALT_OPTIONS) ?
		fuzz_json("{\"requests_per_second\": 50, \"api_version\": \"2026-03\", \"overlap\": 0, "
				  "\"deleted_interval\": 60}") :
		fuzz_json("{\"requests_per_second\": 50}");
	c->name = (char *) collections[which];

	if (which == 4)
	{
		c->fields = list_make5(fuzz_field("id", "association", "text", true, false),
							   fuzz_field("from_id", "association", "bigint", false, false),
							   fuzz_field("to_id", "association", "bigint", false, false),
							   fuzz_field("type_id", "association", "integer", false, false),
							   fuzz_field("label", "association", "text", false, false));
		switch (state % 3)
		{
			case 0:
				break;
			case 1:
				c->cursor = fuzz_json("{\"mode\": \"backfill\", \"after\": \"1001\"}");
				break;
			case 2:
				c->cursor = fuzz_json("{\"mode\": \"incremental\"}");
				c->phase = "incremental";
				break;
		}
		return;
	}

	c->fields = list_make5(fuzz_field("id", "id", "bigint", true, false),
						   fuzz_field(version, "datetime/date", "timestamptz", false, true),
						   fuzz_field("email", "string/text", "text", false, false),
						   fuzz_field("amount", "number/number", "numeric", false, false),
						   fuzz_field("hs_merged_object_ids", "enumeration/checkbox", "text[]", false, false));
	incr = psprintf("\"mode\": \"incremental\", \"ts\": %lld, \"safe_from\": %lld", ms, ms + 180000);
	switch (state)
	{
		case 0:
			break;
		case 1:
			c->cursor = fuzz_json("{\"mode\": \"backfill\", \"after\": \"1001\", \"started\": %lld, \"ts\": %lld}",
								  ms + 240000, ms);
			break;
		case 2:
			c->cursor = fuzz_json("{%s, \"archived_at\": %.1f}", incr, now);
			c->phase = "incremental";
			break;
		case 3:
			c->cursor = fuzz_json("{%s, \"archived_at\": %.1f, \"started\": %lld, \"poll\": {\"from\": %lld, "
								  "\"incl\": true, \"tie_ts\": %lld, \"tie_id\": 1001}}",
								  incr, now, ms + 290000, ms, ms + 1000);
			c->phase = "incremental";
			break;
		case 4:
			c->cursor = fuzz_json("{%s, \"archived_at\": %.1f}", incr, now - 400);
			c->phase = "incremental";
			break;
		case 5:
			c->cursor = fuzz_json("{%s, \"archived_at\": %.1f, \"archived\": {\"after\": \"1001\"}}", incr, now);
			c->phase = "incremental";
			break;
		case 6:
			c->cursor = fuzz_json("{%s, \"archived_at\": %.1f, \"sweep\": {}, \"sweep_turn\": true}", incr, now);
			c->phase = "incremental";
			break;
		case 7:
			c->fields = list_make3(fuzz_field("id", "id", "bigint", true, false),
								   fuzz_field(version, "datetime/date", "timestamptz", false, true),
								   fuzz_field("email", "string/text", "text", false, false));
			break;
	}
}

static const FuzzTarget hs_target = {
	.kind = "hubspot",
	.provider = &sync_hubspot_provider,
	.nscenarios = 40,
	.setup = hs_setup,
};

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	return fuzz_test_one_input(&hs_target, data, size);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	return fuzz_initialize(&hs_target, argc, argv);
}
