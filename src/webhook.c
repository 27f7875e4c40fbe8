/*
 * webhook.c: ingests one webhook delivery, for the listener
 * (webhook_listener.c) and sync.ingest_webhook() alike. Provider-neutral:
 * the source's provider verifies the signature and timestamp and reads the
 * delivery into changes; this file refuses replays, applies the changes
 * through store.c's guarded statements in the caller's transaction, and
 * records the outcome in sync.webhook_deliveries (never a body or secret).
 *
 * A webhook only brings changes sooner. It never moves a collection's
 * cursor: polling goes on reading the same changes, so a delivery that
 * never arrives is caught by the next poll, and one that arrives twice or
 * late changes nothing (the version guard keeps rows from going backwards).
 */
#include "sync.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "storage/lmgr.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(sync_ingest_webhook);

/* Deliveries and seen event ids are kept this long (Stripe retries for 3 days). */
#define WEBHOOK_RETENTION "7 days"

typedef struct SeenEvent
{
	const char *event_id;
	bool		replayed;
} SeenEvent;

typedef struct OpenCollection
{
	int32		id;
	SyncCollection *collection;	/* NULL: not synced, or paused */
} OpenCollection;

/* The caller's context: the result outlives SPI_finish. */
static MemoryContext webhook_result_ctx = NULL;

static void
webhook_set(SyncWebhookResult *r, int status, const char *outcome, const char *reason)
{
	r->http_status = status;
	r->outcome = outcome;
	r->reason = reason ? MemoryContextStrdup(webhook_result_ctx, reason) : NULL;
}

/* Whether event_id was seen before (in an earlier delivery); remembers it otherwise. */
static bool
webhook_replayed(int32 source_id, const char *event_id, List **seen)
{
	ListCell   *lc;
	SeenEvent  *e;
	Oid			types[2] = {INT4OID, TEXTOID};
	Datum		args[2];
	int			ret;

	foreach(lc, *seen)
	{
		e = lfirst(lc);
		if (strcmp(e->event_id, event_id) == 0)
			return e->replayed;
	}
	args[0] = Int32GetDatum(source_id);
	args[1] = CStringGetTextDatum(event_id);
	ret = SPI_execute_with_args("INSERT INTO sync.webhook_events (source_id, event_id) VALUES ($1, $2) "
								"ON CONFLICT DO NOTHING", 2, types, args, NULL, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "could not record a webhook event: %s", SPI_result_code_string(ret));
	e = palloc(sizeof(SeenEvent));
	e->event_id = event_id;
	e->replayed = SPI_processed == 0;
	*seen = lappend(*seen, e);
	return e->replayed;
}

/*
 * The synced collection an event concerns, loaded and its table locked (a
 * user's lock waits at most lock_timeout), or NULL when the source does not
 * sync it or it is paused.
 */
static SyncCollection *
webhook_collection(SyncSource *source, const char *name, List **open)
{
	Oid			types[2] = {INT4OID, TEXTOID};
	Datum		args[2];
	int			ret;
	int32		id = 0;
	bool		isnull;
	ListCell   *lc;
	OpenCollection *oc;

	args[0] = Int32GetDatum(source->id);
	args[1] = CStringGetTextDatum(name);
	ret = SPI_execute_with_args("SELECT c.id FROM sync.collections c JOIN sync.sources s ON s.id = c.source_id "
								"WHERE c.source_id = $1 AND lower(c.name) = lower($2) "
								"AND NOT c.paused AND NOT s.paused ORDER BY c.name = $2 DESC, c.id LIMIT 1",
								2, types, args, NULL, true, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read sync.collections: %s", SPI_result_code_string(ret));
	if (SPI_processed == 1)
		id = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	foreach(lc, *open)
	{
		oc = lfirst(lc);
		if (oc->id == id)
			return oc->collection;
	}
	oc = palloc0(sizeof(OpenCollection));
	oc->id = id;
	if (id != 0)
	{
		oc->collection = sync_load_collection(id);
		LockRelationOid(oc->collection->relid, RowExclusiveLock);
		sync_refresh_fields(oc->collection, oc->collection->fields);
	}
	*open = lappend(*open, oc);
	return oc->collection;
}

/* Every active collection of the source polls at once (an event naming none: Airtable's ping). */
static int
webhook_request_source_poll(SyncSource *source)
{
	Oid			type = INT4OID;
	Datum		arg = Int32GetDatum(source->id);

	if (SPI_execute_with_args("UPDATE sync.collection_state st SET poll_requested_at = clock_timestamp() "
							  "FROM sync.collections c JOIN sync.sources s ON s.id = c.source_id "
							  "WHERE st.collection_id = c.id AND c.source_id = $1 AND NOT c.paused AND NOT s.paused",
							  1, &type, &arg, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "could not ask for a poll");
	if (SPI_processed > 0)
		sync_wake_worker_at_commit();
	return (int) SPI_processed;
}

/* The secrets of webhooks sync created for the source, for verify_webhook. */
static void
webhook_load_secrets(SyncSource *source)
{
	Oid			type = INT4OID;
	Datum		arg = Int32GetDatum(source->id);
	char	   *text;

	if (SPI_execute_with_args("SELECT coalesce(jsonb_object_agg(webhook_id, secret), '{}') "
							  "FROM sync.webhook_secrets WHERE source_id = $1",
							  1, &type, &arg, NULL, true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not read sync.webhook_secrets");
	text = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	source->webhook_secrets = sync_json_parse(text, strlen(text), "webhook secrets");
}

/*
 * Keep the secret of a webhook sync created (Airtable's macSecretBase64),
 * like a token: in its own transaction when none is open (a worker's step
 * between requests), so it is there before the API's first notification.
 */
void
sync_save_webhook_secret(SyncSource *source, const char *webhook_id, const char *secret)
{
	bool		own_xact = !IsTransactionState();
	Oid			types[3] = {INT4OID, TEXTOID, TEXTOID};
	Datum		args[3];

	sync_catalog_write_begin(own_xact);
	args[0] = Int32GetDatum(source->id);
	args[1] = CStringGetTextDatum(webhook_id);
	args[2] = CStringGetTextDatum(secret);
	if (SPI_execute_with_args("INSERT INTO sync.webhook_secrets (source_id, webhook_id, secret) VALUES ($1, $2, $3) "
							  "ON CONFLICT (source_id, webhook_id) DO UPDATE SET secret = EXCLUDED.secret",
							  3, types, args, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not save a webhook secret");
	/* webhooks of the source that no collection's cursor names any more are gone */
	if (SPI_execute_with_args("DELETE FROM sync.webhook_secrets w WHERE w.source_id = $1 AND w.webhook_id <> $2 "
							  "AND NOT EXISTS (SELECT 1 FROM sync.collection_state st JOIN sync.collections c "
							  "  ON c.id = st.collection_id WHERE c.source_id = $1 "
							  "  AND st.cursor->'hook'->>'id' = w.webhook_id)",
							  2, types, args, NULL, false, 0) != SPI_OK_DELETE)
		elog(ERROR, "could not forget old webhook secrets");
	sync_catalog_write_end(own_xact);
}

/* The collection polls at once (the event lacks the record's data). */
static void
webhook_request_poll(SyncCollection *c)
{
	Oid			type = INT4OID;
	Datum		arg = Int32GetDatum(c->id);

	if (SPI_execute_with_args("UPDATE sync.collection_state SET poll_requested_at = clock_timestamp() "
							  "WHERE collection_id = $1",
							  1, &type, &arg, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "could not ask for a poll");
	sync_wake_worker_at_commit();
}

/* Apply one change; true when it changed a row or asked for a poll. */
static bool
webhook_apply(SyncCollection *c, SyncWebhookChange *change)
{
	SyncPage	page;
	int64		n = 0;
	bool		known = true;

	memset(&page, 0, sizeof(page));
	switch (change->action)
	{
		case SYNC_WEBHOOK_UPSERT:
			page.records = json_array();
			json_array_append(page.records, change->record);
			n = sync_apply_webhook_changes(c, &page);
			json_decref(page.records);
			break;
		case SYNC_WEBHOOK_DELETE:
			page.deletions = json_array();
			json_array_append_new(page.deletions, json_pack("{s:s, s:O}", "id", change->record_id, "at",
															 change->at ? change->at : json_null()));
			n = sync_apply_webhook_changes(c, &page);
			json_decref(page.deletions);
			break;
		case SYNC_WEBHOOK_SET_FIELD:
			n = sync_apply_webhook_field(c, change->record_id, change->field, change->value, change->at, &known);
			break;
		case SYNC_WEBHOOK_POLL:
			webhook_request_poll(c);
			n = 1;
			break;
		case SYNC_WEBHOOK_NONE:
			break;
	}
	return n > 0;
}

static void
webhook_free_changes(List *changes)
{
	ListCell   *lc;

	foreach(lc, changes)
	{
		SyncWebhookChange *ch = lfirst(lc);

		json_decref(ch->record);
		json_decref(ch->at);
		json_decref(ch->value);
	}
}

/*
 * Verify, de-duplicate and apply one delivery to source_name's tables in the
 * caller's transaction (a snapshot active), and record its outcome. A
 * delivery that is refused is answered (result->http_status), not raised;
 * an error while applying is raised, and the caller records the failure.
 */
void
sync_webhook_ingest(const char *source_name, const SyncWebhookRequest *req, const char *via,
					SyncWebhookResult *result)
{
	SyncSource *source;
	const char *reason;
	const char *malformed = NULL;
	List	   *changes;
	List	   *seen = NIL;
	List	   *open = NIL;
	ListCell   *lc;
	const char *first_event = NULL;
	int32		source_id = 0;

	memset(result, 0, sizeof(*result));
	webhook_result_ctx = CurrentMemoryContext;
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	source = sync_load_source_by_name(source_name, true);
	if (source == NULL)
		webhook_set(result, 404, "rejected", "no such source");	/* the name is the caller's: not kept */
	else if (source->provider == NULL || source->provider->verify_webhook == NULL)
	{
		source_id = source->id;
		webhook_set(result, 404, "rejected",
					psprintf("%s sources take no webhooks: they are kept in sync by polling",
							 source->kind));
	}
	else if ((webhook_load_secrets(source), reason = source->provider->verify_webhook(source, req)) != NULL)
	{
		source_id = source->id;
		webhook_set(result, 401, "rejected", reason);
	}
	else if ((changes = source->provider->webhook_changes(source, req, &malformed)) == NIL)
	{
		source_id = source->id;
		webhook_set(result, 400, "rejected", malformed ? malformed : "the delivery carries no event");
	}
	else
	{
		source_id = source->id;
		foreach(lc, changes)
		{
			SyncWebhookChange *change = lfirst(lc);
			SyncCollection *c;

			if (first_event == NULL)
				first_event = change->event_id;
			if (webhook_replayed(source->id, change->event_id, &seen))
				continue;
			if (change->collection == NULL && change->action == SYNC_WEBHOOK_POLL)
			{
				if (webhook_request_source_poll(source) > 0)
					result->applied++;
				else
					result->ignored++;
				continue;
			}
			c = change->action == SYNC_WEBHOOK_NONE ? NULL : webhook_collection(source, change->collection, &open);
			if (c != NULL && webhook_apply(c, change))
				result->applied++;
			else
				result->ignored++;
		}
		webhook_free_changes(changes);
		result->events = list_length(seen);
		foreach(lc, seen)
			result->replayed += ((SeenEvent *) lfirst(lc))->replayed ? 1 : 0;
		if (result->replayed == result->events)
			webhook_set(result, 200, "replayed", "every event of the delivery was received before");
		else if (result->applied > 0)
			webhook_set(result, 200, "applied", NULL);
		else
			webhook_set(result, 200, "ignored",
						"no row changed: the events are older than the rows, or for no synced collection");
	}
	foreach(lc, open)
	{
		OpenCollection *oc = lfirst(lc);

		if (oc->collection)
			sync_free_collection(oc->collection);
	}
	if (source)
	{
		json_decref(source->webhook_secrets);
		source->webhook_secrets = NULL;
		sync_free_source(source);
	}
	if (first_event)
		first_event = MemoryContextStrdup(webhook_result_ctx, first_event);
	SPI_finish();
	sync_webhook_record(source_id, source_name, via, first_event, result);
}

/*
 * Record a delivery's outcome in the caller's transaction, and forget
 * deliveries and event ids past their retention so neither table grows
 * without bound (both deletes are index scans that find nothing mostly).
 * Refusals repeating within a minute (same source, status and reason) are
 * counted in one row: a flood of bad deliveries costs a counter, not rows.
 */
void
sync_webhook_record(int32 source_id, const char *source_name, const char *via, const char *event_id,
					const SyncWebhookResult *r)
{
	Oid			types[9] = {INT4OID, TEXTOID, TEXTOID, INT4OID, INT4OID, TEXTOID, INT4OID, TEXTOID, INT4OID};
	Datum		args[9];
	char		nulls[9] = "         ";
	int			ret;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	args[0] = Int32GetDatum(source_id);
	nulls[0] = source_id ? ' ' : 'n';
	args[1] = CStringGetTextDatum(via);
	args[2] = CStringGetTextDatum(event_id ? event_id : "");
	nulls[2] = event_id ? ' ' : 'n';
	args[3] = Int32GetDatum(r->events);
	args[4] = Int32GetDatum(r->applied);
	args[5] = CStringGetTextDatum(r->outcome ? r->outcome : "failed");
	args[6] = Int32GetDatum(r->http_status);
	args[7] = CStringGetTextDatum(r->reason ? r->reason : "");
	nulls[7] = r->reason ? ' ' : 'n';
	args[8] = Int32GetDatum(r->ignored);
	ret = SPI_execute_with_args("WITH repeated AS ("
								"  UPDATE sync.webhook_deliveries SET repeats = repeats + 1, last_received_at = now() "
								"  WHERE id = (SELECT max(id) FROM sync.webhook_deliveries "
								"              WHERE $6 = 'rejected' AND outcome = 'rejected' "
								"                AND source_id IS NOT DISTINCT FROM $1 AND via = $2 "
								"                AND http_status = $7 AND reason IS NOT DISTINCT FROM $8 "
								"                AND received_at > now() - interval '1 minute') "
								"  RETURNING id) "
								"INSERT INTO sync.webhook_deliveries (source_id, via, event_id, events, applied, "
								"  outcome, http_status, reason, ignored) "
								"SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 WHERE NOT EXISTS (SELECT 1 FROM repeated)",
								9, types, args, nulls, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "could not record a webhook delivery: %s", SPI_result_code_string(ret));
	if (SPI_execute("DELETE FROM sync.webhook_deliveries WHERE last_received_at < now() - interval '" WEBHOOK_RETENTION "'",
					false, 0) != SPI_OK_DELETE ||
		SPI_execute("DELETE FROM sync.webhook_events WHERE received_at < now() - interval '" WEBHOOK_RETENTION "'",
					false, 0) != SPI_OK_DELETE)
		elog(ERROR, "could not prune webhook deliveries");
	SPI_finish();
}

/* The outcome as the SQL function returns it. */
static Jsonb *
webhook_result_jsonb(const SyncWebhookResult *r)
{
	json_t	   *o = json_pack("{s:i, s:s, s:i, s:i, s:i, s:i}", "http_status", r->http_status,
							  "outcome", r->outcome, "events", r->events, "applied", r->applied,
							  "ignored", r->ignored, "replayed", r->replayed);
	char	   *text;

	json_object_set_new(o, "reason", r->reason ? json_string(r->reason) : json_null());
	text = sync_json_dump(o);
	json_decref(o);
	return DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(text)));
}

/*
 * sync._ingest_webhook(source, headers jsonb, body text, url text, method
 * text): for users who already run a web service in front of Postgres. The
 * body must be the raw bytes as received: signatures cover them.
 */
Datum
sync_ingest_webhook(PG_FUNCTION_ARGS)
{
	char	   *source_name;
	Jsonb	   *headers_jb;
	text	   *body;
	char	   *headers_text;
	json_t	   *given;
	SyncWebhookRequest req;
	SyncWebhookResult result;
	const char *name;
	json_t	   *value;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("source, headers and body must not be null")));
	source_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	headers_jb = PG_GETARG_JSONB_P(1);
	body = PG_GETARG_TEXT_PP(2);
	headers_text = JsonbToCString(NULL, &headers_jb->root, VARSIZE(headers_jb));
	given = sync_json_parse(headers_text, strlen(headers_text), "headers");
	if (!json_is_object(given))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("headers must be a JSON object of header names and values")));
	memset(&req, 0, sizeof(req));
	req.headers = json_object();
	json_object_foreach(given, name, value)
	{
		char	   *lower = pstrdup(name);

		for (char *p = lower; *p; p++)
			*p = pg_tolower((unsigned char) *p);
		if (json_is_array(value))
			value = json_array_get(value, 0);
		if (json_is_string(value))
			json_object_set(req.headers, lower, value);
	}
	json_decref(given);
	req.body = text_to_cstring(body);
	req.body_len = VARSIZE_ANY_EXHDR(body);
	req.url = PG_ARGISNULL(3) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(3));
	req.method = PG_ARGISNULL(4) ? "POST" : text_to_cstring(PG_GETARG_TEXT_PP(4));
	req.now = (double) GetCurrentTimestamp() / USECS_PER_SEC +
		((POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY);

	sync_webhook_ingest(source_name, &req, "sql", &result);
	json_decref(req.headers);
	PG_RETURN_JSONB_P(webhook_result_jsonb(&result));
}
