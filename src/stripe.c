/*
 * stripe.c: the Stripe provider.
 *
 * Stripe has fixed object types, so each collection has a fixed typed schema
 * (nested objects as jsonb). Backfill lists a collection newest first with
 * starting_after. Changes and deletes come from /v1/events: before the
 * backfill starts, the newest event id is taken as the change cursor; after
 * it, events are walked forward from that id with ending_before, each page
 * applied oldest first, so two events in the same second apply in Stripe's
 * own order. An event cursor older than Stripe's 30-day retention answers
 * "No such event": the collection is backfilled again as a delete sweep.
 *
 * Stripe objects carry no modification time; a row's _updated_at is the time
 * of the event (or of the list read) it reflects, and no row goes backwards.
 *
 * The cursor:
 *   mode       backfill | incremental
 *   after      backfill position (last id listed)
 *   event      id of the newest event applied (or taken before the backfill)
 *   since      when no event existed at backfill start: its server time
 *   seek       paging back from the newest event to the oldest one since `since`
 *   read_at    server time of the backfill's first page
 *   sweep      the backfill also sweeps deletes (after a retention loss)
 */
#include "sync.h"

#include <time.h>

#define STRIPE_DEFAULT_API_VERSION "2024-06-20"
#define STRIPE_PAGE_SIZE 100

static const char *const stripe_required_credentials[] = {"secret_key", NULL};

typedef struct StripeColumn
{
	const char *field;
	const char *type;			/* text, bigint, boolean, jsonb, timestamp (unix seconds), numeric */
} StripeColumn;

typedef struct StripeCollection
{
	const char *name;			/* list path under /v1 */
	const char *object;			/* the object's "object" value */
	const char *event_prefix;	/* event types are <prefix>.created, ... */
	const char *list_params;	/* extra list parameters */
	bool		delete_events;	/* <prefix>.deleted removes the row */
	const StripeColumn *columns;
} StripeCollection;

#define COMMON_HEAD {"id", "text"}, {"created", "timestamp"}
#define COMMON_TAIL {"livemode", "boolean"}, {"metadata", "jsonb"}, {NULL, NULL}

static const StripeColumn customer_columns[] = {
	COMMON_HEAD, {"email", "text"}, {"name", "text"}, {"description", "text"}, {"phone", "text"},
	{"currency", "text"}, {"balance", "bigint"}, {"delinquent", "boolean"}, {"default_source", "text"},
	{"invoice_prefix", "text"}, {"tax_exempt", "text"}, {"address", "jsonb"}, {"shipping", "jsonb"},
	{"invoice_settings", "jsonb"}, {"discount", "jsonb"}, {"preferred_locales", "jsonb"}, COMMON_TAIL
};
static const StripeColumn charge_columns[] = {
	COMMON_HEAD, {"amount", "bigint"}, {"amount_captured", "bigint"}, {"amount_refunded", "bigint"},
	{"currency", "text"}, {"customer", "text"}, {"description", "text"}, {"status", "text"},
	{"paid", "boolean"}, {"captured", "boolean"}, {"refunded", "boolean"}, {"disputed", "boolean"},
	{"failure_code", "text"}, {"failure_message", "text"}, {"invoice", "text"}, {"payment_intent", "text"},
	{"payment_method", "text"}, {"receipt_email", "text"}, {"statement_descriptor", "text"},
	{"billing_details", "jsonb"}, {"outcome", "jsonb"}, {"payment_method_details", "jsonb"}, COMMON_TAIL
};
static const StripeColumn invoice_columns[] = {
	COMMON_HEAD, {"customer", "text"}, {"subscription", "text"}, {"status", "text"}, {"number", "text"},
	{"currency", "text"}, {"amount_due", "bigint"}, {"amount_paid", "bigint"}, {"amount_remaining", "bigint"},
	{"subtotal", "bigint"}, {"total", "bigint"}, {"paid", "boolean"}, {"attempted", "boolean"},
	{"billing_reason", "text"}, {"collection_method", "text"}, {"due_date", "timestamp"},
	{"period_start", "timestamp"}, {"period_end", "timestamp"}, {"hosted_invoice_url", "text"},
	{"lines", "jsonb"}, COMMON_TAIL
};
static const StripeColumn subscription_columns[] = {
	COMMON_HEAD, {"customer", "text"}, {"status", "text"}, {"currency", "text"},
	{"cancel_at_period_end", "boolean"}, {"cancel_at", "timestamp"}, {"canceled_at", "timestamp"},
	{"ended_at", "timestamp"}, {"current_period_start", "timestamp"}, {"current_period_end", "timestamp"},
	{"start_date", "timestamp"}, {"trial_start", "timestamp"}, {"trial_end", "timestamp"},
	{"collection_method", "text"}, {"default_payment_method", "text"}, {"latest_invoice", "text"},
	{"items", "jsonb"}, COMMON_TAIL
};
static const StripeColumn product_columns[] = {
	COMMON_HEAD, {"updated", "timestamp"}, {"name", "text"}, {"description", "text"}, {"active", "boolean"},
	{"type", "text"}, {"unit_label", "text"}, {"url", "text"}, {"default_price", "text"},
	{"images", "jsonb"}, COMMON_TAIL
};
static const StripeColumn price_columns[] = {
	COMMON_HEAD, {"product", "text"}, {"active", "boolean"}, {"currency", "text"},
	{"unit_amount", "bigint"}, {"unit_amount_decimal", "numeric"}, {"type", "text"},
	{"billing_scheme", "text"}, {"nickname", "text"}, {"lookup_key", "text"}, {"tax_behavior", "text"},
	{"recurring", "jsonb"}, COMMON_TAIL
};
static const StripeColumn payment_intent_columns[] = {
	COMMON_HEAD, {"amount", "bigint"}, {"amount_received", "bigint"}, {"currency", "text"},
	{"customer", "text"}, {"description", "text"}, {"status", "text"}, {"capture_method", "text"},
	{"confirmation_method", "text"}, {"payment_method", "text"}, {"latest_charge", "text"},
	{"invoice", "text"}, {"receipt_email", "text"}, {"canceled_at", "timestamp"},
	{"cancellation_reason", "text"}, {"last_payment_error", "jsonb"}, {"payment_method_types", "jsonb"},
	COMMON_TAIL
};

static const StripeCollection stripe_collections[] = {
	{"customers", "customer", "customer", NULL, true, customer_columns},
	{"charges", "charge", "charge", NULL, false, charge_columns},
	{"invoices", "invoice", "invoice", NULL, true, invoice_columns},
	/* canceled subscriptions are listed only with status=all; ".deleted" means canceled */
	{"subscriptions", "subscription", "customer.subscription", "status=all", false, subscription_columns},
	{"products", "product", "product", NULL, true, product_columns},
	{"prices", "price", "price", NULL, true, price_columns},
	{"payment_intents", "payment_intent", "payment_intent", NULL, false, payment_intent_columns},
};

/* The synthetic version field the provider adds to every record it hands over. */
#define STRIPE_VERSION_FIELD "_sync_updated"

static const StripeCollection *
stripe_collection(const char *name)
{
	for (size_t i = 0; i < lengthof(stripe_collections); i++)
		if (pg_strcasecmp(stripe_collections[i].name, name) == 0)
			return &stripe_collections[i];
	return NULL;
}

static const char *
stripe_collection_names(void)
{
	StringInfoData buf;

	initStringInfo(&buf);
	for (size_t i = 0; i < lengthof(stripe_collections); i++)
		appendStringInfo(&buf, "%s%s", i ? ", " : "", stripe_collections[i].name);
	return buf.data;
}

static void
stripe_validate_source(SyncSource *source)
{
	const char *key = sync_json_string(source->credentials, "secret_key");

	if (strncmp(key, "sk_", 3) != 0 && strncmp(key, "rk_", 3) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the Stripe secret_key must be a secret key (sk_...) or a restricted key (rk_...)"),
				 errhint("Publishable keys (pk_...) cannot read data.")));
}

/* ---------- requests ---------- */

static void
stripe_raise(SyncHttpResponse *resp, const char *what)
{
	json_t	   *body = json_loadb(resp->body, resp->body_len, 0, NULL);
	json_t	   *error = body ? json_object_get(body, "error") : NULL;
	const char *type = sync_json_string(error, "type");
	const char *code = sync_json_string(error, "code");
	const char *message = sync_json_string(error, "message");
	int			sqlstate;

	type = pstrdup(type ? type : "unknown_error");
	code = pstrdup(code ? code : "");
	message = pstrdup(message ? message : (resp->body_len ? "unexpected response body" : "empty response body"));
	json_decref(body);

	if (resp->status == 401 || resp->status == 403)
		sqlstate = ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION;
	else if (resp->status == 429)
		sqlstate = ERRCODE_CONFIGURATION_LIMIT_EXCEEDED;
	else if (resp->status == 404 || strcmp(code, "resource_missing") == 0)
		sqlstate = ERRCODE_UNDEFINED_OBJECT;
	else if (resp->status >= 500)
		sqlstate = ERRCODE_CONNECTION_FAILURE;
	else
		sqlstate = ERRCODE_DATA_EXCEPTION;

	ereport(ERROR,
			(errcode(sqlstate),
			 errmsg("Stripe %s failed with HTTP %ld %s%s%s: %s", what, resp->status, type,
					code[0] ? "/" : "", code, message),
			 resp->status == 401 ?
			 errhint("Check the secret_key; give a new one with sync.alter_source().") : 0));
}

/* GET a path (with query string) and return the parsed body; the caller owns it. */
static json_t *
stripe_get(SyncSource *source, SyncPage *page, const char *path, const char *what, SyncHttpResponse *resp)
{
	SyncHttpHeader headers[2];
	const char *version = sync_json_string(source->options, "api_version");
	char	   *url = psprintf("%s%s", source->base_url, path);

	headers[0].name = "Authorization";
	headers[0].value = psprintf("Bearer %s", sync_json_string(source->credentials, "secret_key"));
	headers[1].name = "Stripe-Version";
	headers[1].value = version ? version : STRIPE_DEFAULT_API_VERSION;
	sync_api_request(source, page, "GET", url, headers, 2, NULL, NULL, resp);
	memset((char *) headers[0].value, 0, strlen(headers[0].value));
	if (resp->status < 200 || resp->status >= 300)
		stripe_raise(resp, what);
	return sync_json_parse(resp->body, resp->body_len, psprintf("Stripe %s response", what));
}

static json_t *
stripe_list_data(json_t *body, const char *what)
{
	json_t	   *data = json_object_get(body, "data");

	if (!json_is_array(data))
	{
		json_decref(body);		/* the step ends here: nobody else will */
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("Stripe %s response has no data array", what)));
	}
	return data;
}

/* ---------- describe ---------- */

static List *
stripe_describe(SyncSource *source, const char *collection, char **canonical_name)
{
	const StripeCollection *sc = stripe_collection(collection);
	List	   *fields = NIL;
	SyncHttpResponse resp = {0};
	json_t	   *body;
	SyncField  *version;

	if (sc == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("Stripe has no collection \"%s\" that sync can read", collection),
				 errhint("Stripe collections are: %s.", stripe_collection_names())));
	*canonical_name = pstrdup(sc->name);

	/* Prove the key can read this collection now, not later in a log. */
	body = stripe_get(source, NULL, psprintf("/v1/%s?limit=1%s%s", sc->name,
											 sc->list_params ? "&" : "", sc->list_params ? sc->list_params : ""),
					  "list", &resp);
	json_decref(body);

	for (const StripeColumn *col = sc->columns; col->field; col++)
	{
		SyncField  *f = palloc0(sizeof(SyncField));

		f->api_field = pstrdup(col->field);
		f->column_name = pstrdup(col->field);
		f->is_key = strcmp(col->field, "id") == 0;
		if (strcmp(col->type, "timestamp") == 0)
		{
			f->api_type = "unix_time";
			f->column_type = "timestamptz";
			f->wire_type = "double precision";
			f->convert_sql = "to_timestamp(%s)";
		}
		else
		{
			f->api_type = pstrdup(col->type);
			f->column_type = pstrdup(col->type);
			f->wire_type = pstrdup(col->type);
		}
		fields = lappend(fields, f);
	}
	version = palloc0(sizeof(SyncField));
	version->api_field = STRIPE_VERSION_FIELD;
	version->api_type = "sync_version";
	version->column_name = "_updated_at";
	version->column_type = "timestamptz";
	version->wire_type = "double precision";
	version->convert_sql = "to_timestamp(%s)";
	version->is_version = true;
	return lappend(fields, version);
}

/* ---------- steps ---------- */

static void
stripe_take_object(SyncPage *page, json_t *object, double version)
{
	json_t	   *copy = json_copy(object);

	json_object_set_new(copy, STRIPE_VERSION_FIELD, json_real(version));
	json_array_append_new(page->records, copy);
}

/* The newest event now, taken before a backfill: changes after it are replayed afterwards. */
static void
stripe_mark_event_cursor(SyncSource *source, const StripeCollection *sc, SyncPage *page, json_t *cursor)
{
	SyncHttpResponse resp = {0};
	json_t	   *body = stripe_get(source, page, psprintf("/v1/events?limit=1&type=%s.*", sc->event_prefix),
								  "events", &resp);
	json_t	   *data = stripe_list_data(body, "events");
	const char *newest = json_array_size(data) ? sync_json_string(json_array_get(data, 0), "id") : NULL;

	if (newest)
		json_object_set_new(cursor, "event", json_string(newest));
	else
		json_object_set_new(cursor, "since", json_real(sync_http_server_time(&resp)));
	json_decref(body);
}

static void
stripe_backfill_step(SyncSource *source, const StripeCollection *sc, SyncCollection *c, SyncPage *page,
					 json_t *cursor)
{
	const char *after = sync_json_string(cursor, "after");
	bool		first = (after == NULL && !json_object_get(cursor, "read_at"));
	StringInfoData path;
	SyncHttpResponse resp = {0};
	json_t	   *body;
	json_t	   *data;
	json_t	   *object;
	size_t		i;
	double		read_at;

	if (first)
		stripe_mark_event_cursor(source, sc, page, cursor);

	initStringInfo(&path);
	appendStringInfo(&path, "/v1/%s?limit=%d", sc->name, STRIPE_PAGE_SIZE);
	if (sc->list_params)
		appendStringInfo(&path, "&%s", sc->list_params);
	if (after)
		appendStringInfo(&path, "&starting_after=%s", sync_http_urlencode(after));
	body = stripe_get(source, page, path.data, "list", &resp);
	if (first)
		json_object_set_new(cursor, "read_at", json_real(sync_http_server_time(&resp)));
	read_at = sync_json_number(cursor, "read_at", sync_http_server_time(&resp));

	data = stripe_list_data(body, "list");
	if (json_object_get(cursor, "sweep"))
	{
		page->sweep_begin = first;
		page->sweep_ids = json_array();
	}
	json_array_foreach(data, i, object)
	{
		const char *id = sync_json_string(object, "id");

		if (id == NULL)
			continue;
		/* A page read is as new as the page: events before read_at are older. */
		stripe_take_object(page, object, read_at);
		if (page->sweep_ids)
			json_array_append_new(page->sweep_ids, json_string(id));
		json_object_set_new(cursor, "after", json_string(id));
	}
	page->activity = "backfilling";
	if (sync_json_bool(body, "has_more", false) && json_array_size(data) > 0)
	{
		page->phase = "backfill";
		page->more = true;
	}
	else
	{
		page->backfill_done = true;
		page->sweep_end = page->sweep_ids != NULL;
		page->phase = "incremental";
		page->more = true;
		json_object_set_new(cursor, "mode", json_string("incremental"));
		json_object_del(cursor, "after");
		json_object_del(cursor, "sweep");
	}
	json_decref(body);
}

/* Apply one event (oldest first): a snapshot upsert, or a delete. */
static void
stripe_take_event(const StripeCollection *sc, SyncPage *page, json_t *event)
{
	const char *type = sync_json_string(event, "type");
	json_t	   *object = json_object_get(json_object_get(event, "data"), "object");
	const char *object_type = sync_json_string(object, "object");
	double		created = sync_json_number(event, "created", 0);
	size_t		prefix_len = strlen(sc->event_prefix);
	const char *id = sync_json_string(object, "id");

	/* customer.* also carries customer.subscription.*, customer.discount.*, ... */
	if (type == NULL || id == NULL || object_type == NULL || strcmp(object_type, sc->object) != 0 ||
		strncmp(type, sc->event_prefix, prefix_len) != 0 || type[prefix_len] != '.')
		return;
	if (sc->delete_events && strcmp(type + prefix_len, ".deleted") == 0)
	{
		json_t	   *deletion = json_pack("{s:s}", "id", id);

		json_object_set_new(deletion, "at", json_real(created));
		json_array_append_new(page->deletions, deletion);
	}
	else
		stripe_take_object(page, object, created);
}

#define STRIPE_EVENT_RETENTION_S (30 * 86400)

/* Changes since our cursor can no longer be read: backfill again as a delete sweep. */
static void
stripe_restart_as_sweep(SyncCollection *c, SyncPage *page, json_t *cursor)
{
	ereport(LOG,
			(errmsg("event cursor of collection \"%s\" is past Stripe's event retention; backfilling it again with a delete sweep",
					c->name)));
	json_object_clear(cursor);
	json_object_set_new(cursor, "mode", json_string("backfill"));
	json_object_set_new(cursor, "sweep", json_true());
	page->phase = "backfill";
	page->activity = "event retention lost: backfilling again";
	page->more = true;
}

/*
 * No event existed when the backfill began, so the cursor is a time. Events
 * are listed newest first: page back to the oldest event since then, apply
 * that page, and from its newest event walk forward exactly as usual.
 */
static void
stripe_seek_step(SyncSource *source, const StripeCollection *sc, SyncCollection *c, SyncPage *page,
				 json_t *cursor)
{
	double		since = sync_json_number(cursor, "since", 0);
	const char *seek = sync_json_string(cursor, "seek");
	StringInfoData path;
	SyncHttpResponse resp = {0};
	json_t	   *body;
	json_t	   *data;

	initStringInfo(&path);
	appendStringInfo(&path, "/v1/events?limit=%d&type=%s.*&created[gte]=%.0f", STRIPE_PAGE_SIZE,
					 sc->event_prefix, since);
	if (seek)
		appendStringInfo(&path, "&starting_after=%s", sync_http_urlencode(seek));
	body = stripe_get(source, page, path.data, "events", &resp);
	if (sync_http_server_time(&resp) - since > STRIPE_EVENT_RETENTION_S)
	{
		json_decref(body);
		stripe_restart_as_sweep(c, page, cursor);
		return;
	}
	data = stripe_list_data(body, "events");
	page->phase = "incremental";
	if (sync_json_bool(body, "has_more", false) && json_array_size(data) > 0)
	{
		/* older events remain: nothing is applied until the oldest page is reached */
		json_object_set_new(cursor, "seek",
							json_string(sync_json_string(json_array_get(data, json_array_size(data) - 1), "id")));
		page->activity = "finding the first event after the backfill";
		page->more = true;
	}
	else if (json_array_size(data) > 0)
	{
		for (size_t i = json_array_size(data); i > 0; i--)
			stripe_take_event(sc, page, json_array_get(data, i - 1));
		json_object_set_new(cursor, "event", json_string(sync_json_string(json_array_get(data, 0), "id")));
		json_object_del(cursor, "since");
		json_object_del(cursor, "seek");
		page->activity = "polling events";
		page->more = true;
	}
	else
	{
		/* nothing since, or the seek position vanished: look again from the newest */
		json_object_del(cursor, "seek");
		page->activity = "polling events";
	}
	json_decref(body);
}

static void
stripe_poll_step(SyncSource *source, const StripeCollection *sc, SyncCollection *c, SyncPage *page,
				 json_t *cursor)
{
	const char *event = sync_json_string(cursor, "event");
	StringInfoData path;
	SyncHttpResponse resp = {0};
	json_t	   *volatile body = NULL;
	json_t	   *data;
	MemoryContext ctx = CurrentMemoryContext;

	if (event == NULL)
	{
		stripe_seek_step(source, sc, c, page, cursor);
		return;
	}
	initStringInfo(&path);
	appendStringInfo(&path, "/v1/events?limit=%d&type=%s.*&ending_before=%s", STRIPE_PAGE_SIZE,
					 sc->event_prefix, sync_http_urlencode(event));
	PG_TRY();
	{
		body = stripe_get(source, page, path.data, "events", &resp);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(ctx);
		edata = CopyErrorData();
		if (!(resp.status == 400 && edata->message && strstr(edata->message, "resource_missing")))
			PG_RE_THROW();
		FlushErrorState();
		body = NULL;
	}
	PG_END_TRY();

	if (body == NULL)
	{
		stripe_restart_as_sweep(c, page, cursor);
		return;
	}

	data = stripe_list_data(body, "events");
	/* Stripe lists newest first: apply this page oldest first. */
	for (size_t i = json_array_size(data); i > 0; i--)
		stripe_take_event(sc, page, json_array_get(data, i - 1));
	if (json_array_size(data) > 0)
		json_object_set_new(cursor, "event", json_string(sync_json_string(json_array_get(data, 0), "id")));
	page->phase = "incremental";
	page->activity = "polling events";
	page->more = sync_json_bool(body, "has_more", false);
	json_decref(body);
}

static void
stripe_step(SyncSource *source, SyncCollection *c, SyncPage *page)
{
	const StripeCollection *sc = stripe_collection(c->name);
	json_t	   *cursor = json_is_object(c->cursor) ? json_deep_copy(c->cursor) : json_object();
	const char *mode = sync_json_string(cursor, "mode");

	page->records = json_array();
	page->deletions = json_array();
	page->cursor = cursor;
	if (sc == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("Stripe has no collection \"%s\"", c->name)));
	if (c->reconcile_requested && mode && strcmp(mode, "incremental") == 0)
	{
		/* Stripe's sweep is a backfill that also lists every id. */
		json_object_clear(cursor);
		json_object_set_new(cursor, "sweep", json_true());
		mode = NULL;
	}
	if (mode == NULL || strcmp(mode, "backfill") == 0)
	{
		json_object_set_new(cursor, "mode", json_string("backfill"));
		stripe_backfill_step(source, sc, c, page, cursor);
	}
	else
		stripe_poll_step(source, sc, c, page, cursor);
}

/* ---------- limits ---------- */

/* Stripe allows 100 requests/s in live mode and 25 in test mode (sandboxes). */
static void
stripe_limits(SyncSource *source, const SyncQuota *seen, SyncLimits *limits)
{
	const char *key = sync_json_string(source->credentials, "secret_key");
	bool		test_mode = key && (strncmp(key, "sk_test_", 8) == 0 || strncmp(key, "rk_test_", 8) == 0);

	limits->rate = test_mode ? 25.0 : 100.0;
	limits->basis = test_mode ? "Stripe's 25 requests/s in test mode" : "Stripe's 100 requests/s in live mode";
}

/* Stripe names no wait: back off a second, longer when it happens again. */
static double
stripe_rate_limit_wait(SyncHttpResponse *resp, const char **reason)
{
	if (resp->status != 429)
		return 0;
	*reason = (resp->body && strstr(resp->body, "lock_timeout")) ?
		"Stripe's lock on an object" : "Stripe's rate limit";
	return 1;
}

/* ---------- webhooks ---------- */

#define STRIPE_WEBHOOK_TOLERANCE_S 300

/*
 * Stripe-Signature: t=<unix time>,v1=<hex>[,v1=<hex>...][,v0=...]; v1 is
 * HMAC-SHA256 of "<t>.<raw body>" under the endpoint's secret (whsec_...,
 * used as it is). Any v1 may match (Stripe signs with old and new secrets
 * while one is rolled). The signature is checked before the time, so a
 * forged delivery is called forged whatever its time says.
 */
static const char *
stripe_verify_webhook(SyncSource *source, const SyncWebhookRequest *req)
{
	const char *secret = sync_json_string(source->credentials, "webhook_secret");
	const char *header = sync_webhook_header(req, "stripe-signature");
	double		tolerance = sync_json_number(source->options, "webhook_tolerance", STRIPE_WEBHOOK_TOLERANCE_S);
	char	   *copy;
	char	   *save = NULL;
	const char *t = NULL;
	List	   *signatures = NIL;
	StringInfoData signed_payload;
	uint8		digest[SYNC_HMAC_SHA256_LEN];
	char	   *expected;
	bool		match = false;
	ListCell   *lc;
	char	   *end;
	double		at;

	if (secret == NULL || secret[0] == '\0')
		return "the source has no webhook_secret in its credentials";
	if (header == NULL)
		return "no Stripe-Signature header";
	copy = pstrdup(header);
	for (char *part = strtok_r(copy, ",", &save); part; part = strtok_r(NULL, ",", &save))
	{
		while (*part == ' ')
			part++;
		if (strncmp(part, "t=", 2) == 0)
			t = part + 2;
		else if (strncmp(part, "v1=", 3) == 0)
			signatures = lappend(signatures, part + 3);
	}
	if (t == NULL || signatures == NIL)
		return "the Stripe-Signature header has no timestamp or no v1 signature";
	at = strtod(t, &end);
	if (end == t || *end != '\0' || at <= 0)
		return "the Stripe-Signature timestamp is not a number";

	initStringInfo(&signed_payload);
	appendStringInfo(&signed_payload, "%s.", t);
	appendBinaryStringInfo(&signed_payload, req->body, (int) req->body_len);
	if (!sync_hmac_sha256(secret, strlen(secret), signed_payload.data, signed_payload.len, digest))
		return "could not compute the signature";
	expected = sync_hex(digest, sizeof(digest));
	foreach(lc, signatures)
		match |= sync_equal_secret(expected, lfirst(lc));
	if (!match)
		return "bad signature: no v1 signature of the Stripe-Signature header matches";
	if (req->now - at > tolerance)
		return "stale delivery: its signed timestamp is older than the tolerance";
	if (at - req->now > tolerance)
		return "delivery from the future: its signed timestamp is beyond the tolerance";
	return NULL;
}

/*
 * A Stripe event carries the whole object as of the event: an upsert at the
 * event's time (the version every row of a Stripe table has), or a delete
 * for <prefix>.deleted, for each collection whose events it is.
 */
static List *
stripe_webhook_changes(SyncSource *source, const SyncWebhookRequest *req, const char **malformed)
{
	json_t	   *event = json_loadb(req->body, req->body_len, 0, NULL);
	const char *id = sync_json_string(event, "id");
	List	   *changes = NIL;

	if (!json_is_object(event) || id == NULL || sync_json_string(event, "type") == NULL ||
		!json_is_number(json_object_get(event, "created")) ||
		!json_is_object(json_object_get(json_object_get(event, "data"), "object")))
	{
		json_decref(event);
		*malformed = "the body is not a Stripe event (id, type, created, data.object)";
		return NIL;
	}
	for (size_t i = 0; i < lengthof(stripe_collections); i++)
	{
		SyncPage	page;
		SyncWebhookChange *change = palloc0(sizeof(SyncWebhookChange));

		memset(&page, 0, sizeof(page));
		page.records = json_array();
		page.deletions = json_array();
		stripe_take_event(&stripe_collections[i], &page, event);
		change->event_id = pstrdup(id);
		change->collection = pstrdup(stripe_collections[i].name);
		if (json_array_size(page.records) > 0)
		{
			change->action = SYNC_WEBHOOK_UPSERT;
			change->record = json_incref(json_array_get(page.records, 0));
		}
		else if (json_array_size(page.deletions) > 0)
		{
			json_t	   *deletion = json_array_get(page.deletions, 0);

			change->action = SYNC_WEBHOOK_DELETE;
			change->record_id = pstrdup(sync_json_string(deletion, "id"));
			change->at = json_incref(json_object_get(deletion, "at"));
		}
		json_decref(page.records);
		json_decref(page.deletions);
		if (change->action != SYNC_WEBHOOK_NONE)
			changes = lappend(changes, change);
	}
	if (changes == NIL)
	{
		/* an event of a type sync does not store: accepted, nothing to do */
		SyncWebhookChange *none = palloc0(sizeof(SyncWebhookChange));

		none->event_id = pstrdup(id);
		changes = lappend(changes, none);
	}
	json_decref(event);
	return changes;
}

const SyncProvider sync_stripe_provider = {
	.kind = "stripe",
	.required_credentials = stripe_required_credentials,
	.default_quota_fraction = 0.2,
	.limits = stripe_limits,
	.rate_limit_wait = stripe_rate_limit_wait,
	.validate_source = stripe_validate_source,
	.describe = stripe_describe,
	.step = stripe_step,
	.verify_webhook = stripe_verify_webhook,
	.webhook_changes = stripe_webhook_changes,
};
