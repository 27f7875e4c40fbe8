/*
 * target_stripe.c: fuzz src/stripe.c (list pages, events, seeking the first
 * event after a backfill, retention loss, rate-limit answers).
 *
 * Scenarios (input byte 0): collection = n % 7 (customers, charges, invoices,
 * subscriptions, products, prices, payment_intents), state = n / 7 % 7:
 *   0 fresh backfill                 4 seek, next page
 *   1 backfill, next page            5 backfill that sweeps deletes
 *   2 poll events after a cursor     6 seek from past the event retention
 *   3 seek the first event since a time
 * Flags: 0x02 a restricted key (rk_test_); 0x04 api_version option.
 */
#include "harness.h"

static const char *const collections[] = {
	"customers", "charges", "invoices", "subscriptions", "products", "prices", "payment_intents",
};
static const char *const id_prefixes[] = {"cus", "ch", "in", "sub", "prod", "price", "pi"};

static void
stripe_setup(FuzzCase *fc, int scenario)
{
	SyncSource *s = fc->source;
	SyncCollection *c = fc->collection;
	double		now = fc->now;
	int			which = scenario % 7;
	int			state = scenario / 7 % 7;
	const char *after = psprintf("%s_FUZZ0000000001", id_prefixes[which]);

	json_decref(s->credentials);
	s->credentials = fuzz_json("{\"secret_key\": \"%s\"}",
							   (fc->flags & FUZZ_FLAG_ALT_CREDENTIALS) ? "rk_test_CANARYkey" : "sk_test_CANARYkey");
	json_decref(s->options);
	s->options = (fc->flags & FUZZ_FLAG_ALT_OPTIONS) ?
		fuzz_json("{\"requests_per_second\": 20, \"api_version\": \"2025-01-27.acacia\"}") :
		fuzz_json("{\"requests_per_second\": 20}");
	c->name = (char *) collections[which];
	/* the fields are fixed: stripe_describe builds them after its one request */
	c->fields = list_make2(fuzz_field("id", "text", "text", true, false),
						   fuzz_field("_sync_updated", "sync_version", "double precision", false, true));

	switch (state)
	{
		case 0:
			break;
		case 1:
			c->cursor = fuzz_json("{\"mode\": \"backfill\", \"after\": \"%s\", \"read_at\": %.1f, "
								  "\"event\": \"evt_FUZZ0000000001\"}", after, now - 60);
			break;
		case 2:
			c->cursor = fuzz_json("{\"mode\": \"incremental\", \"event\": \"evt_FUZZ0000000001\"}");
			c->phase = "incremental";
			break;
		case 3:
			c->cursor = fuzz_json("{\"mode\": \"incremental\", \"since\": %.1f}", now - 100);
			c->phase = "incremental";
			break;
		case 4:
			c->cursor = fuzz_json("{\"mode\": \"incremental\", \"since\": %.1f, \"seek\": \"evt_FUZZ0000000002\"}",
								  now - 100);
			c->phase = "incremental";
			break;
		case 5:
			c->cursor = fuzz_json("{\"mode\": \"backfill\", \"sweep\": true}");
			break;
		case 6:
			c->cursor = fuzz_json("{\"mode\": \"incremental\", \"since\": %.1f}", now - 40 * 86400.0);
			c->phase = "incremental";
			break;
	}
}

static const FuzzTarget stripe_target = {
	.kind = "stripe",
	.provider = &sync_stripe_provider,
	.nscenarios = 49,
	.setup = stripe_setup,
};

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	return fuzz_test_one_input(&stripe_target, data, size);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	return fuzz_initialize(&stripe_target, argc, argv);
}
