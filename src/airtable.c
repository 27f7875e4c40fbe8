/*
 * airtable.c: the Airtable provider (tables of one base).
 *
 * Backfill walks a table with `offset` iterators (100 records a page, fields
 * by id so any field name works). Changes: the same walk filtered by
 * IS_AFTER(LAST_MODIFIED_TIME(), <previous poll's start - overlap>), with
 * server times from the Date header. Airtable has no delete feed: deleted
 * records are found by delete sweeps that list every id of the table, one
 * page between polls, every sweep_interval; last_sweep_at in sync.status
 * shows how recent the delete check is. Iterators expire after minutes: an
 * expired offset restarts that walk; upserts are idempotent, so nothing is
 * lost or applied twice. An omitted field is an empty one, so it becomes null.
 *
 * The cursor:
 *   mode        backfill | incremental
 *   offset      iterator of the walk in progress (backfill or poll)
 *   started     server time the backfill or current poll began
 *   safe_from   lower bound of the next poll: started - overlap
 *   sweep       a delete sweep in progress: {offset}
 *   sweep_at    local time the last sweep began
 *   hook        the collection's webhook, with option webhook_notification_url (see below)
 *   hook_turn   the next incremental step reads the webhook's payloads
 */
#include "sync.h"

#include <time.h>

#include "common/base64.h"

#define AT_PAGE_SIZE 100
#define AT_REQUESTS_PER_SECOND_PER_BASE 5.0
#define AT_PENALTY_S 30.0
#define AT_DEFAULT_OVERLAP_S 10
#define AT_DEFAULT_SWEEP_INTERVAL_S 300
#define AT_REFRESH_MARGIN_S 300

static const char *
at_base_id(SyncSource *source)
{
	return sync_json_string(source->options, "base_id");
}

static bool
at_uses_oauth(SyncSource *source)
{
	return sync_json_string(source->credentials, "access_token") == NULL;
}

static void
at_validate_source(SyncSource *source)
{
	const char *base = at_base_id(source);
	const char *token_url = sync_json_string(source->options, "token_url");
	char	   *why;

	if (base == NULL || strncmp(base, "app", 3) != 0 || strlen(base) != 17)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("an airtable source needs the option \"base_id\": \"app\" and 14 letters or digits"),
				 errhint("The base id is the part of the base's URL that starts with \"app\".")));
	if (sync_json_string(source->credentials, "access_token") == NULL &&
		(sync_json_string(source->credentials, "client_id") == NULL ||
		 sync_json_string(source->credentials, "refresh_token") == NULL))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("credentials of an airtable source need \"access_token\", or \"client_id\" and \"refresh_token\""),
				 errhint("Give a personal access token as {\"access_token\": \"pat...\"}, or an OAuth integration's client id (and secret) with a refresh token.")));
	if (token_url && !sync_url_is_valid(token_url, &why))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid token_url \"%s\": %s", token_url, why)));
	if (sync_json_string(source->options, "webhook_notification_url") &&
		!sync_url_is_valid(sync_json_string(source->options, "webhook_notification_url"), &why))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid webhook_notification_url: %s", why),
				 errhint("Give the public http(s) URL that reaches the webhook listener, ending in /webhooks/<source name>.")));
}

/* ---------- requests ---------- */

static void
at_raise(SyncHttpResponse *resp, const char *what)
{
	json_t	   *body = json_loadb(resp->body, resp->body_len, 0, NULL);
	json_t	   *error = body ? json_object_get(body, "error") : NULL;
	const char *type = NULL;
	const char *message = NULL;
	int			sqlstate;

	if (json_is_string(error))
		type = json_string_value(error);
	else if (json_is_object(error))
	{
		type = sync_json_string(error, "type");
		message = sync_json_string(error, "message");
		if (type == NULL)
			type = sync_json_string(body, "error");
	}
	else if (json_is_array(json_object_get(body, "errors")))
	{
		json_t	   *first = json_array_get(json_object_get(body, "errors"), 0);

		type = sync_json_string(first, "error");
		message = sync_json_string(first, "message");
	}
	if (type == NULL && body)
		type = sync_json_string(body, "error_description");
	type = pstrdup(type ? type : "UNKNOWN");
	message = pstrdup(message ? message : "");
	json_decref(body);

	if (resp->status == 401 || resp->status == 403)
		sqlstate = ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION;
	else if (resp->status == 429)
		sqlstate = ERRCODE_CONFIGURATION_LIMIT_EXCEEDED;
	else if (resp->status == 404)
		sqlstate = ERRCODE_UNDEFINED_OBJECT;
	else if (resp->status >= 500)
		sqlstate = ERRCODE_CONNECTION_FAILURE;
	else
		sqlstate = ERRCODE_DATA_EXCEPTION;
	ereport(ERROR,
			(errcode(sqlstate),
			 errmsg("Airtable %s failed with HTTP %ld %s%s%s", what, resp->status, type,
					message[0] ? ": " : "", message),
			 resp->status == 429 ?
			 errhint("Airtable allows 5 requests per second per base and answers 429 for 30 seconds after; lower the source's quota_fraction or requests_per_second.") : 0));
}

static const char *
at_token_url(SyncSource *source)
{
	const char *url = sync_json_string(source->options, "token_url");

	if (url)
		return url;
	/* Airtable's token endpoint is on airtable.com, not on the API host. */
	if (strcmp(source->base_url, "https://api.airtable.com") == 0)
		return "https://airtable.com/oauth2/v1/token";
	return psprintf("%s/oauth2/v1/token", source->base_url);
}

/*
 * OAuth: refresh tokens are single use. The new one is committed (with the
 * access token) before the access token is used, so a crash after this
 * point never leaves us holding a spent refresh token.
 */
static void
at_refresh_token(SyncSource *source, SyncPage *page)
{
	StringInfoData form;
	SyncHttpResponse resp = {0};
	SyncHttpHeader header;
	int			nheaders = 0;
	json_t	   *body;
	json_t	   *token;
	const char *secret = sync_json_string(source->credentials, "client_secret");
	char	   *refresh;
	double		now = (double) time(NULL);

	initStringInfo(&form);
	appendStringInfo(&form, "grant_type=refresh_token&refresh_token=%s",
					 sync_http_urlencode(sync_json_string(source->credentials, "refresh_token")));
	if (secret && secret[0])
	{
		/* confidential integrations authenticate with HTTP Basic */
		char	   *pair = psprintf("%s:%s", sync_json_string(source->credentials, "client_id"), secret);
		int			len = pg_b64_enc_len(strlen(pair));
		char	   *b64 = palloc0(len + 1);

		pg_b64_encode(pair, strlen(pair), b64, len);
		header.name = "Authorization";
		header.value = psprintf("Basic %s", b64);
		nheaders = 1;
	}
	else
		appendStringInfo(&form, "&client_id=%s",
						 sync_http_urlencode(sync_json_string(source->credentials, "client_id")));
	sync_api_request(source, page, "POST", at_token_url(source), &header, nheaders, form.data,
					  "application/x-www-form-urlencoded", &resp);
	memset(form.data, 0, form.len);
	if (resp.status != 200)
		at_raise(&resp, "token refresh");
	body = sync_json_parse(resp.body, resp.body_len, "Airtable token response");
	if (sync_json_string(body, "access_token") == NULL)
	{
		json_decref(body);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
				 errmsg("Airtable token response lacks access_token")));
	}
	token = json_pack("{s:s, s:f}", "access_token", sync_json_string(body, "access_token"),
					  "expires_at", now + (double) sync_token_lifetime(body, 3600));
	refresh = sync_json_string(body, "refresh_token") ? pstrdup(sync_json_string(body, "refresh_token")) : NULL;
	json_decref(body);
	sync_save_refreshed_token(source, token, refresh);
}

static const char *
at_access_token(SyncSource *source, SyncPage *page)
{
	if (!at_uses_oauth(source))
		return sync_json_string(source->credentials, "access_token");
	if (source->token == NULL || sync_json_string(source->token, "access_token") == NULL ||
		sync_json_number(source->token, "expires_at", 0) - (double) time(NULL) < AT_REFRESH_MARGIN_S)
		sync_refresh_token(source, page);
	return sync_json_string(source->token, "access_token");
}

static json_t *
at_get(SyncSource *source, SyncPage *page, const char *path, const char *what, SyncHttpResponse *resp)
{
	for (int attempt = 0;; attempt++)
	{
		SyncHttpHeader header;

		header.name = "Authorization";
		header.value = psprintf("Bearer %s", at_access_token(source, page));
		sync_api_request(source, page, "GET", psprintf("%s%s", source->base_url, path), &header, 1, NULL, NULL,
						  resp);
		memset((char *) header.value, 0, strlen(header.value));
		if (resp->status == 401 && attempt == 0 && at_uses_oauth(source))
		{
			json_decref(source->token);
			source->token = NULL;
			continue;
		}
		if (resp->status < 200 || resp->status >= 300)
			at_raise(resp, what);
		return sync_json_parse(resp->body, resp->body_len, psprintf("Airtable %s response", what));
	}
}

/* ---------- describe ---------- */

typedef struct AtTypeMap
{
	const char *type;
	const char *column_type;
	const char *convert_sql;
} AtTypeMap;

static const AtTypeMap at_types[] = {
	{"singleLineText", "text", NULL}, {"multilineText", "text", NULL}, {"richText", "text", NULL},
	{"email", "text", NULL}, {"url", "text", NULL}, {"phoneNumber", "text", NULL},
	{"singleSelect", "text", NULL}, {"barcode", "jsonb", NULL},
	{"number", "numeric", NULL}, {"currency", "numeric", NULL}, {"percent", "numeric", NULL},
	{"rating", "numeric", NULL}, {"duration", "numeric", NULL}, {"count", "numeric", NULL},
	{"autoNumber", "bigint", NULL},
	/* an unchecked box is omitted from the record: it is false, not unknown */
	{"checkbox", "boolean", "coalesce(%s, false)"},
	{"multipleSelects", "text[]", NULL}, {"multipleRecordLinks", "text[]", NULL},
	{"date", "date", NULL}, {"dateTime", "timestamptz", NULL}, {"createdTime", "timestamptz", NULL},
	{"lastModifiedTime", "timestamptz", NULL},
};

static List *
at_describe(SyncSource *source, const char *collection, char **canonical_name)
{
	SyncHttpResponse resp = {0};
	json_t	   *volatile body = NULL;
	List	   *volatile fields = NIL;
	List	   *volatile taken = list_make2(pstrdup("_synced_at"), pstrdup("id"));

	PG_TRY();
	{
		json_t	   *tables;
		json_t	   *volatile table = NULL;
		json_t	   *t;
		json_t	   *f;
		size_t		i;
		SyncField  *id;
		StringInfoData names;

		PG_TRY();
		{
			body = at_get(source, NULL, psprintf("/v0/meta/bases/%s/tables", sync_http_urlencode(at_base_id(source))),
						  "base schema", &resp);
		}
		PG_CATCH();
		{
			if (resp.status == 403 || resp.status == 404)
			{
				FlushErrorState();
				ereport(ERROR,
						(errcode(ERRCODE_UNDEFINED_OBJECT),
						 errmsg("Airtable base \"%s\" does not exist or the token cannot read it", at_base_id(source)),
						 errhint("Check the source's base_id and that the token has the schema.bases:read and data.records:read scopes for this base.")));
			}
			PG_RE_THROW();
		}
		PG_END_TRY();

		tables = json_object_get(body, "tables");
		initStringInfo(&names);
		json_array_foreach(tables, i, t)
		{
			const char *tid = sync_json_string(t, "id");
			const char *tname = sync_json_string(t, "name");

			appendStringInfo(&names, "%s\"%s\"", names.len ? ", " : "", tname ? tname : "?");
			if ((tid && strcmp(tid, collection) == 0) || (tname && strcmp(tname, collection) == 0))
				table = t;
		}
		if (table == NULL)
			json_array_foreach(tables, i, t)
			{
				const char *tname = sync_json_string(t, "name");

				if (tname && pg_strcasecmp(tname, collection) == 0)
					table = t;
			}
		if (table == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("Airtable base \"%s\" has no table \"%s\"", at_base_id(source), collection),
					 errhint("Its tables are: %s.", names.data)));
		/* matched by id, the table may lack a name: then the id names it */
		*canonical_name = pstrdup(sync_json_string(table, "name") ? sync_json_string(table, "name")
								  : sync_json_string(table, "id"));

		id = palloc0(sizeof(SyncField));
		id->api_field = "id";
		id->api_type = "recordId";
		id->column_name = "id";
		id->column_type = "text";
		id->wire_type = "text";
		id->is_key = true;
		fields = lappend(fields, id);

		json_array_foreach(json_object_get(table, "fields"), i, f)
		{
			const char *fid = sync_json_string(f, "id");
			const char *fname = sync_json_string(f, "name");
			const char *type = sync_json_string(f, "type");
			const AtTypeMap *map = NULL;
			SyncField  *field;

			if (fid == NULL || fname == NULL || type == NULL)
				continue;
			for (size_t k = 0; k < lengthof(at_types); k++)
				if (strcmp(at_types[k].type, type) == 0)
					map = &at_types[k];
			field = palloc0(sizeof(SyncField));
			field->api_field = pstrdup(fid);
			field->api_type = pstrdup(type);
			field->column_name = sync_unique_identifier(sync_identifier_from_api_name(fname), taken);
			taken = lappend(taken, field->column_name);
			/* formulas, lookups, rollups, attachments, collaborators: kept as they come */
			field->column_type = map ? (char *) map->column_type : "jsonb";
			field->wire_type = field->column_type;
			field->convert_sql = map ? (char *) map->convert_sql : NULL;
			fields = lappend(fields, field);
		}
	}
	PG_FINALLY();
	{
		json_decref(body);
	}
	PG_END_TRY();
	return fields;
}

/* ---------- steps ---------- */

static bool
at_offset_expired(SyncHttpResponse *resp, ErrorData *edata)
{
	return resp->status == 422 && edata->message &&
		(strstr(edata->message, "LIST_RECORDS_ITERATOR_NOT_AVAILABLE") ||
		 strstr(edata->message, "INVALID_OFFSET_VALUE"));
}

/*
 * One page of a walk over the table. NULL when the iterator expired: the
 * caller starts that walk again.
 */
static json_t *
at_list_page(SyncSource *source, SyncCollection *c, SyncPage *page, const char *offset,
			 const char *formula, const char *only_field, SyncHttpResponse *resp)
{
	StringInfoData path;
	MemoryContext ctx = CurrentMemoryContext;
	json_t	   *volatile body = NULL;

	initStringInfo(&path);
	appendStringInfo(&path, "/v0/%s/%s?pageSize=%d&returnFieldsByFieldId=true",
					 sync_http_urlencode(at_base_id(source)), sync_http_urlencode(c->name), AT_PAGE_SIZE);
	if (formula)
		appendStringInfo(&path, "&filterByFormula=%s", sync_http_urlencode(formula));
	if (only_field)
		appendStringInfo(&path, "&%s=%s", sync_http_urlencode("fields[]"), sync_http_urlencode(only_field));
	if (offset)
		appendStringInfo(&path, "&offset=%s", sync_http_urlencode(offset));
	PG_TRY();
	{
		body = at_get(source, page, path.data, "list", resp);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(ctx);
		edata = CopyErrorData();
		if (offset == NULL || !at_offset_expired(resp, edata))
			PG_RE_THROW();
		FlushErrorState();
		body = NULL;
	}
	PG_END_TRY();
	return body;
}

/* Flatten {id, fields} into one object keyed by field id; an omitted field reads as null. */
static void
at_take_records(SyncPage *page, json_t *body, json_t *sweep_ids)
{
	json_t	   *records = json_object_get(body, "records");
	json_t	   *r;
	size_t		i;

	if (!json_is_array(records))
	{
		json_decref(body);		/* the step ends here: nobody else will */
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("Airtable list response has no records array")));
	}
	json_array_foreach(records, i, r)
	{
		const char *id = sync_json_string(r, "id");
		json_t	   *fields = json_object_get(r, "fields");
		json_t	   *flat;

		if (id == NULL)
		{
			json_decref(body);
			ereport(ERROR,
					(errcode(ERRCODE_DATA_EXCEPTION),
					 errmsg("Airtable record without an id"),
					 errdetail("Record %zu of the page.", i)));
		}
		if (sweep_ids)
		{
			json_array_append_new(sweep_ids, json_string(id));
			continue;
		}
		flat = json_is_object(fields) ? json_deep_copy(fields) : json_object();
		json_object_set_new(flat, "id", json_string(id));
		json_array_append_new(page->records, flat);
	}
}

static void
at_walk_step(SyncSource *source, SyncCollection *c, SyncPage *page, json_t *cursor, bool backfill)
{
	const char *offset = sync_json_string(cursor, "offset");
	char	   *formula = NULL;
	SyncHttpResponse resp = {0};
	json_t	   *body;
	const char *next;
	double		overlap = sync_json_number(source->options, "overlap", AT_DEFAULT_OVERLAP_S);

	if (!backfill)
		formula = psprintf("IS_AFTER(LAST_MODIFIED_TIME(), '%s')",
						   sync_format_utc(sync_json_number(cursor, "safe_from", 0), "%Y-%m-%dT%H:%M:%S.000Z"));
	body = at_list_page(source, c, page, offset, formula, NULL, &resp);
	page->phase = backfill ? "backfill" : "incremental";
	page->more = true;
	if (body == NULL)
	{
		/* The iterator expired: walk again from the start (upserts are idempotent). */
		json_object_del(cursor, "offset");
		page->backfill_restart = backfill;
		page->activity = "iterator expired: walking again";
		return;
	}
	if (!json_object_get(cursor, "started"))
		json_object_set_new(cursor, "started", json_real(sync_http_server_time(&resp)));
	at_take_records(page, body, NULL);
	next = sync_json_string(body, "offset");
	page->activity = backfill ? "backfilling" : "polling for changes";
	if (next)
	{
		json_object_set_new(cursor, "offset", json_string(next));
		json_decref(body);
		return;
	}
	json_decref(body);
	json_object_del(cursor, "offset");
	json_object_set_new(cursor, "safe_from", json_real(sync_json_number(cursor, "started", 0) - overlap));
	json_object_del(cursor, "started");
	if (backfill)
	{
		page->backfill_done = true;
		page->phase = "incremental";
		json_object_set_new(cursor, "mode", json_string("incremental"));
		json_object_set_new(cursor, "sweep_at", json_real((double) time(NULL)));
	}
	else
	{
		page->caught_up = true;
		page->more = json_object_get(cursor, "sweep") != NULL;
	}
}

/* One page of a delete sweep: every id, one cheap field each. */
static void
at_sweep_step(SyncSource *source, SyncCollection *c, SyncPage *page, json_t *cursor)
{
	json_t	   *sweep = json_object_get(cursor, "sweep");
	const char *offset = sync_json_string(sweep, "offset");
	const char *one_field = NULL;
	SyncHttpResponse resp = {0};
	json_t	   *body;
	ListCell   *lc;

	foreach(lc, c->fields)
		if (!((SyncField *) lfirst(lc))->is_key)
		{
			one_field = ((SyncField *) lfirst(lc))->api_field;
			break;
		}
	body = at_list_page(source, c, page, offset, NULL, one_field, &resp);
	page->phase = "incremental";
	page->more = true;
	page->activity = "sweeping ids for deletes";
	if (body == NULL)
	{
		json_object_del(sweep, "offset");	/* expired: the next page starts the sweep over */
		return;
	}
	page->sweep_begin = (offset == NULL);
	page->sweep_ids = json_array();
	at_take_records(page, body, page->sweep_ids);
	if (sync_json_string(body, "offset"))
		json_object_set_new(sweep, "offset", json_string(sync_json_string(body, "offset")));
	else
	{
		page->sweep_end = true;
		json_object_del(cursor, "sweep");
	}
	json_decref(body);
}

/* ---------- webhooks ---------- */

/*
 * With the source option webhook_notification_url, each collection keeps a
 * webhook of its own (scoped to its table) in its cursor:
 *   hook        {id, table, expires, next}: next is the payload cursor
 *   hook_turn   the next incremental step reads payloads first
 * Airtable pings that URL when the table changes; the listener makes the
 * collection poll at once, and its walk reads the webhook's payloads first:
 * their destroyedRecordIds are the only delete feed Airtable has (deletes
 * are otherwise found by sweeps), applied with the payload cursor in one
 * transaction. Created and changed records are left to the poll that
 * follows at once: payload cells are in another format than records.
 * Webhooks expire after 7 days: one is refreshed when less than a day is
 * left, and made again when it is gone.
 */
#define AT_HOOK_REFRESH_MARGIN_S 86400.0

/* A request with a JSON body (or none); the parsed answer, or NULL for a 404 when missing_ok. */
static json_t *
at_send(SyncSource *source, SyncPage *page, const char *method, const char *path, json_t *body,
		const char *what, bool missing_ok, SyncHttpResponse *resp)
{
	char	   *text = body ? sync_json_dump(body) : NULL;

	for (int attempt = 0;; attempt++)
	{
		SyncHttpHeader header;

		header.name = "Authorization";
		header.value = psprintf("Bearer %s", at_access_token(source, page));
		sync_api_request(source, page, method, psprintf("%s%s", source->base_url, path), &header, 1,
						 text, text ? "application/json" : NULL, resp);
		memset((char *) header.value, 0, strlen(header.value));
		if (resp->status == 401 && attempt == 0 && at_uses_oauth(source))
		{
			json_decref(source->token);
			source->token = NULL;
			continue;
		}
		if (resp->status == 404 && missing_ok)
			return NULL;
		if (resp->status < 200 || resp->status >= 300)
			at_raise(resp, what);
		return sync_json_parse(resp->body, resp->body_len, psprintf("Airtable %s response", what));
	}
}

static double
at_hook_expires(json_t *body)
{
	const char *at = sync_json_string(body, "expirationTime");
	double		t = at ? sync_parse_iso8601(at) : -1;

	/* unknown: assume the documented 7 days */
	return t > 0 ? t : (double) time(NULL) + 7 * 86400.0;
}

/* The id of the collection's table (webhooks are scoped by table id). */
static char *
at_table_id(SyncSource *source, SyncCollection *c, SyncPage *page)
{
	SyncHttpResponse resp = {0};
	json_t	   *body = at_send(source, page, "GET",
							   psprintf("/v0/meta/bases/%s/tables", sync_http_urlencode(at_base_id(source))),
							   NULL, "schema", false, &resp);
	json_t	   *t;
	size_t		i;
	char	   *id = NULL;

	json_array_foreach(json_object_get(body, "tables"), i, t)
	{
		const char *tid = sync_json_string(t, "id");
		const char *name = sync_json_string(t, "name");

		if (tid && ((name && pg_strcasecmp(name, c->name) == 0) || strcmp(tid, c->name) == 0))
			id = pstrdup(tid);
	}
	json_decref(body);
	if (id == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("Airtable base \"%s\" has no table \"%s\" any more", at_base_id(source), c->name)));
	return id;
}

/*
 * Make the collection's webhook. One we made before whose id never reached
 * a committed cursor (a step that failed after creating it) is deleted
 * first: a base holds at most 10 webhooks.
 */
static void
at_create_hook(SyncSource *source, SyncCollection *c, SyncPage *page, json_t *cursor, const char *url)
{
	const char *base = sync_http_urlencode(at_base_id(source));
	char	   *table = at_table_id(source, c, page);
	SyncHttpResponse resp = {0};
	json_t	   *list = at_send(source, page, "GET", psprintf("/v0/bases/%s/webhooks", base), NULL,
							   "webhook list", false, &resp);
	json_t	   *hook;
	json_t	   *spec;
	json_t	   *created;
	size_t		i;
	const char *id;
	const char *secret;

	json_array_foreach(json_object_get(list, "webhooks"), i, hook)
	{
		json_t	   *filters = json_object_get(json_object_get(json_object_get(hook, "specification"), "options"),
											  "filters");
		const char *hook_url = sync_json_string(hook, "notificationUrl");
		const char *scope = sync_json_string(filters, "recordChangeScope");

		if (hook_url && strcmp(hook_url, url) == 0 && scope && strcmp(scope, table) == 0 &&
			sync_json_string(hook, "id"))
		{
			SyncHttpResponse del = {0};

			json_decref(at_send(source, page, "DELETE",
								psprintf("/v0/bases/%s/webhooks/%s", base,
										 sync_http_urlencode(sync_json_string(hook, "id"))),
								NULL, "webhook delete", true, &del));
		}
	}
	json_decref(list);

	spec = json_pack("{s:s, s:{s:{s:{s:[s], s:s}}}}", "notificationUrl", url, "specification", "options",
					 "filters", "dataTypes", "tableData", "recordChangeScope", table);
	created = at_send(source, page, "POST", psprintf("/v0/bases/%s/webhooks", base), spec, "webhook creation",
					  false, &resp);
	json_decref(spec);
	id = sync_json_string(created, "id");
	secret = sync_json_string(created, "macSecretBase64");
	if (id == NULL || secret == NULL)
	{
		json_decref(created);
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("Airtable webhook creation answered without an id or macSecretBase64")));
	}
	/* the secret is committed now: the first ping may come before this page commits */
	sync_save_webhook_secret(source, id, secret);
	json_object_set_new(cursor, "hook", json_pack("{s:s, s:s, s:f, s:i}", "id", id, "table", table,
												  "expires", at_hook_expires(created), "next", 1));
	json_object_set_new(cursor, "hook_turn", json_true());
	json_decref(created);
	page->activity = "creating a webhook";
}

/* Read the webhook's payloads from its cursor: the table's destroyed records are deletions. */
static void
at_read_payloads(SyncSource *source, SyncCollection *c, SyncPage *page, json_t *cursor, json_t *hook)
{
	SyncHttpResponse resp = {0};
	const char *table = sync_json_string(hook, "table");
	json_t	   *body = at_send(source, page, "GET",
							   psprintf("/v0/bases/%s/webhooks/%s/payloads?cursor=%lld",
										sync_http_urlencode(at_base_id(source)),
										sync_http_urlencode(sync_json_string(hook, "id")),
										(long long) sync_json_int(hook, "next", 1)),
							   NULL, "webhook payloads", true, &resp);
	json_t	   *payload;
	size_t		i;

	page->activity = "reading webhook payloads";
	if (body == NULL || !json_is_array(json_object_get(body, "payloads")) ||
		!json_is_integer(json_object_get(body, "cursor")))
	{
		/* gone (expired, deleted): make a new one; deletes meanwhile are found by the next sweep */
		json_decref(body);
		ereport(LOG,
				(errmsg("the Airtable webhook of collection \"%s\" is gone; making a new one", c->name)));
		json_object_del(cursor, "hook");
		json_object_set_new(cursor, "sweep_at", json_real(0));
		return;
	}
	json_array_foreach(json_object_get(body, "payloads"), i, payload)
	{
		json_t	   *changed = json_object_get(json_object_get(payload, "changedTablesById"), table ? table : "");
		json_t	   *id;
		size_t		k;

		if (sync_json_bool(payload, "error", false))
		{
			/* Airtable could not keep the payloads: only a sweep can tell what was deleted */
			json_object_set_new(cursor, "sweep_at", json_real(0));
			continue;
		}
		json_array_foreach(json_object_get(changed, "destroyedRecordIds"), k, id)
			if (json_is_string(id))
			json_array_append_new(page->deletions, json_pack("{s:O, s:n}", "id", id, "at"));
	}
	json_object_set_new(hook, "next", json_integer(json_integer_value(json_object_get(body, "cursor"))));
	json_decref(body);
}

/*
 * The webhook's part of an incremental step, when it makes a request: true
 * when it did (the step ends there; the poll follows at once).
 */
static bool
at_hook_step(SyncSource *source, SyncCollection *c, SyncPage *page, json_t *cursor)
{
	const char *url = sync_json_string(source->options, "webhook_notification_url");
	json_t	   *hook = json_object_get(cursor, "hook");
	const char *hook_url = sync_json_string(hook, "url");
	SyncHttpResponse resp = {0};

	if (url == NULL || json_object_get(cursor, "offset"))
		return false;			/* no webhooks, or a poll walk in progress */
	page->phase = "incremental";
	page->more = true;
	if (hook && hook_url && strcmp(hook_url, url) != 0)
	{
		/* the URL changed: the old webhook goes */
		json_decref(at_send(source, page, "DELETE",
							psprintf("/v0/bases/%s/webhooks/%s", sync_http_urlencode(at_base_id(source)),
									 sync_http_urlencode(sync_json_string(hook, "id"))),
							NULL, "webhook delete", true, &resp));
		json_object_del(cursor, "hook");
		page->activity = "deleting the old webhook";
		return true;
	}
	if (hook == NULL)
	{
		at_create_hook(source, c, page, cursor, url);
		json_object_set_new(json_object_get(cursor, "hook"), "url", json_string(url));
		return true;
	}
	if (sync_json_number(hook, "expires", 0) - (double) time(NULL) < AT_HOOK_REFRESH_MARGIN_S)
	{
		json_t	   *body = at_send(source, page, "POST",
								   psprintf("/v0/bases/%s/webhooks/%s/refresh",
											sync_http_urlencode(at_base_id(source)),
											sync_http_urlencode(sync_json_string(hook, "id"))),
								   NULL, "webhook refresh", true, &resp);

		page->activity = "refreshing the webhook";
		if (body == NULL)
			json_object_del(cursor, "hook");	/* expired already: made again next step */
		else
			json_object_set_new(hook, "expires", json_real(at_hook_expires(body)));
		json_decref(body);
		return true;
	}
	if (sync_json_bool(cursor, "hook_turn", true))
	{
		at_read_payloads(source, c, page, cursor, hook);
		json_object_set_new(cursor, "hook_turn", json_false());
		return true;
	}
	/* the payloads were read: now the poll (whose end makes it their turn again) */
	return false;
}

/*
 * X-Airtable-Content-MAC: hmac-sha256=<hex of HMAC-SHA256(base64-decoded
 * macSecretBase64, raw body)>, under the secret of one of the webhooks sync
 * made for the source (each collection has its own).
 */
static const char *
at_verify_webhook(SyncSource *source, const SyncWebhookRequest *req)
{
	const char *mac = sync_webhook_header(req, "x-airtable-content-mac");
	const char *webhook_id;
	json_t	   *secret;
	bool		match = false;

	if (json_object_size(source->webhook_secrets) == 0)
		return "the source has made no Airtable webhook (set its option webhook_notification_url)";
	if (mac == NULL || strncmp(mac, "hmac-sha256=", 12) != 0)
		return "no X-Airtable-Content-MAC header";
	json_object_foreach(source->webhook_secrets, webhook_id, secret)
	{
		size_t		key_len;
		uint8	   *key = json_is_string(secret) ?
			sync_base64_decode(json_string_value(secret), json_string_length(secret), &key_len) : NULL;
		uint8		digest[SYNC_HMAC_SHA256_LEN];

		if (key && sync_hmac_sha256(key, key_len, req->body, req->body_len, digest))
			match |= sync_equal_secret(sync_hex(digest, sizeof(digest)), mac + 12);
	}
	return match ? NULL : "bad signature: X-Airtable-Content-MAC does not match";
}

/* A ping carries no data: every collection of the source polls (and reads its payloads) now. */
static List *
at_webhook_changes(SyncSource *source, const SyncWebhookRequest *req, const char **malformed)
{
	json_t	   *ping = json_loadb(req->body, req->body_len, 0, NULL);
	const char *hook = sync_json_string(json_object_get(ping, "webhook"), "id");
	const char *timestamp = sync_json_string(ping, "timestamp");
	SyncWebhookChange *change;

	if (hook == NULL || timestamp == NULL)
	{
		json_decref(ping);
		*malformed = "the body is not an Airtable notification (webhook.id, timestamp)";
		return NIL;
	}
	change = palloc0(sizeof(SyncWebhookChange));
	change->event_id = psprintf("%s:%s", hook, timestamp);
	change->action = SYNC_WEBHOOK_POLL;
	json_decref(ping);
	return list_make1(change);
}

static void
at_step(SyncSource *source, SyncCollection *c, SyncPage *page)
{
	json_t	   *cursor = json_is_object(c->cursor) ? json_deep_copy(c->cursor) : json_object();
	const char *mode = sync_json_string(cursor, "mode");
	double		interval = sync_json_number(c->options, "sweep_interval",
											sync_json_number(source->options, "sweep_interval",
															 AT_DEFAULT_SWEEP_INTERVAL_S));
	bool		polling = json_object_get(cursor, "offset") != NULL;

	page->records = json_array();
	page->deletions = json_array();
	page->cursor = cursor;
	if (mode == NULL || strcmp(mode, "backfill") == 0)
	{
		json_object_set_new(cursor, "mode", json_string("backfill"));
		at_walk_step(source, c, page, cursor, true);
		return;
	}
	if (at_hook_step(source, c, page, cursor))
		return;
	if (!json_object_get(cursor, "sweep") &&
		(c->reconcile_requested || (double) time(NULL) - sync_json_number(cursor, "sweep_at", 0) >= interval))
	{
		json_object_set_new(cursor, "sweep", json_object());
		json_object_set_new(cursor, "sweep_at", json_real((double) time(NULL)));
	}
	/* A sweep page and a poll take turns, so changes keep arriving during a long sweep. */
	if (!polling && json_object_get(cursor, "sweep") && sync_json_bool(cursor, "sweep_turn", true))
	{
		at_sweep_step(source, c, page, cursor);
		json_object_set_new(cursor, "sweep_turn", json_false());
	}
	else
	{
		at_walk_step(source, c, page, cursor, false);
		json_object_set_new(cursor, "sweep_turn", json_true());
		if (page->caught_up && json_object_get(cursor, "hook"))
			json_object_set_new(cursor, "hook_turn", json_true());
	}
}

/* ---------- limits ---------- */

static void
at_limits(SyncSource *source, const SyncQuota *seen, SyncLimits *limits)
{
	limits->rate = AT_REQUESTS_PER_SECOND_PER_BASE;
	limits->basis = "Airtable's 5 requests/s per base";
}

/* After a 429 Airtable refuses every request of the base for 30 seconds. */
static double
at_rate_limit_wait(SyncHttpResponse *resp, const char **reason)
{
	if (resp->status != 429)
		return 0;
	if (resp->body && strstr(resp->body, "PUBLIC_API_BILLING_LIMIT_EXCEEDED"))
	{
		*reason = "the workspace's monthly API call cap is spent";
		return 3600;
	}
	*reason = "Airtable's 30-second penalty after too many requests";
	return AT_PENALTY_S;
}

const SyncProvider sync_airtable_provider = {
	.kind = "airtable",
	.required_credentials = NULL,
	.default_quota_fraction = 0.6,
	.limits = at_limits,
	.rate_limit_wait = at_rate_limit_wait,
	.validate_source = at_validate_source,
	.describe = at_describe,
	.refresh_token = at_refresh_token,
	.step = at_step,
	.verify_webhook = at_verify_webhook,
	.webhook_changes = at_webhook_changes,
};
