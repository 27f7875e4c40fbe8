/*
 * target_salesforce.c: fuzz src/salesforce.c (token, describe, query and
 * queryAll pages, getDeleted, delete sweeps, usage headers).
 *
 * Scenarios (input byte 0): the collection's state before the first step.
 *   0 fresh backfill            6 getDeleted older than the log: sweep first
 *   1 backfill, next page       7 delete sweep, first page
 *   2 backfill from a keyset    8 delete sweep, next page
 *   3 poll                      9 column backfill (Id, SystemModstamp, Email)
 *   4 poll, next page          10 custom object Widget__c, fresh
 *   5 getDeleted due
 * Flags: 0x02 no access token yet (the first request is the token refresh);
 * 0x04 other options (api_version v59.0, batch_size 2000, overlap 0,
 * deleted_interval 60, login_url).
 */
#include "harness.h"

#define LOCATOR "/services/data/v66.0/query/01gFUZZ000000001-200"

static void
sf_setup(FuzzCase *fc, int scenario)
{
	SyncSource *s = fc->source;
	SyncCollection *c = fc->collection;
	double		now = fc->now;
	char	   *ts = sync_format_utc(now - 120, "%Y-%m-%dT%H:%M:%SZ");
	const char *id = "003FUZZ00000001AAA";
	char	   *incr;

	json_decref(s->credentials);
	s->credentials = fuzz_json("{\"client_id\": \"fuzz-client\", \"client_secret\": \"CANARYsecret\", "
							   "\"refresh_token\": \"CANARYrefresh\"}");
	if (!(fc->flags & FUZZ_FLAG_ALT_CREDENTIALS))
		s->token = fuzz_json("{\"access_token\": \"CANARYaccess\", \"instance_url\": \"%s\"}", s->base_url);
	json_decref(s->options);
	if (fc->flags & FUZZ_FLAG_ALT_OPTIONS)
		s->options = fuzz_json("{\"requests_per_second\": 50, \"api_version\": \"v59.0\", \"batch_size\": 2000, "
							   "\"overlap\": 0, \"deleted_interval\": 60, \"login_url\": \"%s\"}", s->base_url);
	else
		s->options = fuzz_json("{\"requests_per_second\": 50, \"batch_size\": 200}");

	c->name = "Contact";
	c->fields = list_make5(fuzz_field("Id", "id", "text", true, false),
						   fuzz_field("FirstName", "string", "text", false, false),
						   fuzz_field("Email", "email", "text", false, false),
						   fuzz_field("AccountId", "reference", "text", false, false),
						   fuzz_field("SystemModstamp", "datetime", "timestamptz", false, true));
	c->fields = lappend(c->fields, fuzz_field("LastModifiedDate", "datetime", "timestamptz", false, false));

	incr = psprintf("\"mode\": \"incremental\", \"ts\": \"%s\", \"id\": \"%s\", \"safe_from\": %.1f",
					ts, id, now - 120);
	switch (scenario)
	{
		case 0:
			break;
		case 1:
			c->cursor = fuzz_json("{\"mode\": \"backfill\", \"next_url\": \"%s\", \"started\": %.1f, "
								  "\"ts\": \"%s\", \"id\": \"%s\"}", LOCATOR, now - 30, ts, id);
			break;
		case 2:
			c->cursor = fuzz_json("{\"mode\": \"backfill\", \"ts\": \"%s\", \"id\": \"%s\", \"started\": %.1f}",
								  ts, id, now - 30);
			break;
		case 3:
			c->cursor = fuzz_json("{%s, \"deleted_until\": %.1f, \"deleted_at\": %.1f}", incr, now - 30, now);
			c->phase = "incremental";
			break;
		case 4:
			c->cursor = fuzz_json("{%s, \"deleted_until\": %.1f, \"deleted_at\": %.1f, \"next_url\": \"%s\", "
								  "\"started\": %.1f}", incr, now - 30, now, LOCATOR, now - 10);
			c->phase = "incremental";
			break;
		case 5:
			c->cursor = fuzz_json("{%s, \"deleted_until\": %.1f, \"deleted_at\": %.1f}", incr, now - 3600,
								  now - 400);
			c->phase = "incremental";
			break;
		case 6:
			c->cursor = fuzz_json("{%s, \"deleted_until\": %.1f, \"deleted_at\": 0}", incr, now - 20 * 86400);
			c->phase = "incremental";
			break;
		case 7:
			c->cursor = fuzz_json("{%s, \"deleted_until\": %.1f, \"deleted_at\": %.1f, \"sweep\": {}, "
								  "\"sweep_turn\": true}", incr, now - 30, now);
			c->phase = "incremental";
			break;
		case 8:
			c->cursor = fuzz_json("{%s, \"deleted_until\": %.1f, \"deleted_at\": %.1f, "
								  "\"sweep\": {\"next_url\": \"%s\"}, \"sweep_turn\": true}",
								  incr, now - 30, now, LOCATOR);
			c->phase = "incremental";
			break;
		case 9:
			c->fields = list_make3(fuzz_field("Id", "id", "text", true, false),
								   fuzz_field("SystemModstamp", "datetime", "timestamptz", false, true),
								   fuzz_field("Email", "email", "text", false, false));
			break;
		case 10:
			c->name = "Widget__c";
			c->fields = list_make5(fuzz_field("Id", "id", "text", true, false),
								   fuzz_field("Name", "string", "text", false, false),
								   fuzz_field("Amount__c", "currency", "numeric(16,2)", false, false),
								   fuzz_field("Status__c", "picklist", "text", false, false),
								   fuzz_field("SystemModstamp", "datetime", "timestamptz", false, true));
			break;
	}
}

static const FuzzTarget sf_target = {
	.kind = "salesforce",
	.provider = &sync_salesforce_provider,
	.nscenarios = 11,
	.setup = sf_setup,
};

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	return fuzz_test_one_input(&sf_target, data, size);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	return fuzz_initialize(&sf_target, argc, argv);
}
