/*
 * hubspot.c: the HubSpot provider (CRM objects).
 *
 * Backfill lists an object type with `after` paging. Changes come from the
 * search API on the last-modified property (contacts: lastmodifieddate,
 * others: hs_lastmodifieddate), sorted ascending. Search reaches at most
 * 10,000 results per query, so the walk never pages with `after`: each page
 * is a new query from a keyset. When a page is full, the records sharing the
 * last timestamp are read in a tie query (that timestamp AND hs_object_id >
 * last id, sorted by id), however many there are; then the walk goes on
 * after that timestamp. Search lags writes, so each poll also re-reads an
 * overlap window before the previous poll began.
 *
 * Deletes: archiving does not move the last-modified stamp, so the recycle
 * bin (archived=true listing) is walked every deleted_interval; merged-away
 * ids are listed in the surviving record's hs_merged_object_ids.
 *
 * The cursor:
 *   mode          backfill | incremental
 *   after         backfill position
 *   started       server time (ms) the backfill or current poll began
 *   safe_from     lower bound (ms) of the next poll: started - overlap
 *   ts            newest last-modified time (ms) applied
 *   poll          a poll in progress: {from, incl, tie_ts, tie_id}
 *   archived      a recycle-bin walk in progress: {after}
 *   archived_at   local time the last recycle-bin walk began
 *   sweep         a delete sweep in progress: {after}
 *
 * Association collections ("contacts/companies") keep only `mode` and `after`.
 */
#include "sync.h"

#include <math.h>
#include <time.h>

#define HS_DEFAULT_OVERLAP_S 120
#define HS_DEFAULT_DELETED_INTERVAL_S 300
/* The recycle bin keeps records 90 days; allow a day for walks in flight. */
#define HS_RECYCLE_BIN_HORIZON_S ((90 - 1) * 86400.0)
#define HS_LIST_LIMIT 100
#define HS_SEARCH_LIMIT 200
#define HS_REFRESH_MARGIN_S 300
#define HS_SEARCH_PER_SECOND 5.0

/* ---------- paths and options ---------- */

/* "v3" (default) or a date version such as "2026-03". */
static const char *
hs_api_version(SyncSource *source)
{
	const char *v = sync_json_string(source->options, "api_version");

	return v ? v : "v3";
}

static bool
hs_date_versioned(SyncSource *source)
{
	return strcmp(hs_api_version(source), "v3") != 0;
}

static char *
hs_objects_path(SyncSource *source, const char *type)
{
	return hs_date_versioned(source) ?
		psprintf("/crm/objects/%s/%s", hs_api_version(source), sync_http_urlencode(type)) :
		psprintf("/crm/v3/objects/%s", sync_http_urlencode(type));
}

static char *
hs_properties_path(SyncSource *source, const char *type)
{
	return hs_date_versioned(source) ?
		psprintf("/crm/properties/%s/%s", hs_api_version(source), sync_http_urlencode(type)) :
		psprintf("/crm/v3/properties/%s", sync_http_urlencode(type));
}

static bool
hs_uses_oauth(SyncSource *source)
{
	return sync_json_string(source->credentials, "access_token") == NULL;
}

static void
hs_validate_source(SyncSource *source)
{
	const char *version = sync_json_string(source->options, "api_version");
	bool		has_token = sync_json_string(source->credentials, "access_token") != NULL;
	char	   *why;
	bool		has_oauth = sync_json_string(source->credentials, "client_id") &&
		sync_json_string(source->credentials, "client_secret") &&
		sync_json_string(source->credentials, "refresh_token");

	if (!has_token && !has_oauth)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("credentials of a hubspot source need \"access_token\", or \"client_id\", \"client_secret\" and \"refresh_token\""),
				 errhint("Give a private app or service key token as {\"access_token\": \"pat-...\"}, or an OAuth app's client and refresh token.")));
	if (sync_json_string(source->options, "webhook_url") &&
		!sync_url_is_valid(sync_json_string(source->options, "webhook_url"), &why))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid webhook_url: %s", why),
				 errhint("Give the target URL registered with HubSpot, exactly.")));
	if (version && strcmp(version, "v3") != 0)
	{
		int			year,
					month;
		char		extra;

		if (sscanf(version, "%4d-%2d%c", &year, &month, &extra) != 2 || year < 2026 || month < 1 || month > 12)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid HubSpot api_version \"%s\"", version),
					 errhint("Use \"v3\" or a date version such as \"2026-03\".")));
	}
}

/* ---------- requests ---------- */

static void
hs_raise(SyncHttpResponse *resp, const char *what)
{
	json_t	   *body = json_loadb(resp->body, resp->body_len, 0, NULL);
	const char *category = sync_json_string(body, "category");
	const char *message = sync_json_string(body, "message");
	int			sqlstate;

	if (category == NULL)
		category = sync_json_string(body, "errorType");
	if (category == NULL)
		category = sync_json_string(body, "status");
	category = pstrdup(category ? category : "UNKNOWN");
	message = pstrdup(message ? message : (resp->body_len ? "unexpected response body" : "empty response body"));
	json_decref(body);

	if (resp->status == 401 || resp->status == 403 || resp->status == 530)
		sqlstate = ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION;
	else if (resp->status == 429)
		sqlstate = ERRCODE_CONFIGURATION_LIMIT_EXCEEDED;
	else if (resp->status == 404)
		sqlstate = ERRCODE_UNDEFINED_OBJECT;
	else if (resp->status >= 500 || resp->status == 423)
		sqlstate = ERRCODE_CONNECTION_FAILURE;
	else
		sqlstate = ERRCODE_DATA_EXCEPTION;
	ereport(ERROR,
			(errcode(sqlstate),
			 errmsg("HubSpot %s failed with HTTP %ld %s: %s", what, resp->status, category, message),
			 resp->status == 414 ?
			 errhint("The collection has too many properties for one request: sync fewer with the option \"fields\".") : 0));
}

/* OAuth: trade the refresh token for an access token that lives 30 minutes. */
static void
hs_refresh_token(SyncSource *source, SyncPage *page)
{
	StringInfoData form;
	SyncHttpResponse resp = {0};
	json_t	   *body;
	json_t	   *token;
	const char *access;
	char	   *new_refresh;
	double		now = (double) time(NULL);

	initStringInfo(&form);
	appendStringInfo(&form, "grant_type=refresh_token&client_id=%s&client_secret=%s&refresh_token=%s",
					 sync_http_urlencode(sync_json_string(source->credentials, "client_id")),
					 sync_http_urlencode(sync_json_string(source->credentials, "client_secret")),
					 sync_http_urlencode(sync_json_string(source->credentials, "refresh_token")));
	sync_api_request(source, page, "POST", psprintf("%s/oauth/v1/token", source->base_url), NULL, 0, form.data,
					  "application/x-www-form-urlencoded", &resp);
	memset(form.data, 0, form.len);
	if (resp.status != 200)
		hs_raise(&resp, "token refresh");
	body = sync_json_parse(resp.body, resp.body_len, "HubSpot token response");
	access = sync_json_string(body, "access_token");
	if (access == NULL)
	{
		json_decref(body);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
				 errmsg("HubSpot token response lacks access_token")));
	}
	token = json_pack("{s:s, s:f}", "access_token", access,
					  "expires_at", now + (double) sync_token_lifetime(body, 1800));
	new_refresh = sync_json_string(body, "refresh_token") ? pstrdup(sync_json_string(body, "refresh_token")) : NULL;
	json_decref(body);
	sync_save_refreshed_token(source, token, new_refresh);
}

static const char *
hs_access_token(SyncSource *source, SyncPage *page)
{
	if (!hs_uses_oauth(source))
		return sync_json_string(source->credentials, "access_token");
	/* HubSpot says a 401 is no reliable signal: refresh before the token expires. */
	if (source->token == NULL || sync_json_string(source->token, "access_token") == NULL ||
		sync_json_number(source->token, "expires_at", 0) - (double) time(NULL) < HS_REFRESH_MARGIN_S)
		sync_refresh_token(source, page);
	return sync_json_string(source->token, "access_token");
}

/* A request with the source's token; OAuth sources refresh and retry once on 401. */
static json_t *
hs_request(SyncSource *source, SyncPage *page, const char *method, const char *path, json_t *json_body,
		   const char *what, SyncHttpResponse *resp)
{
	char	   *volatile text = NULL;

	if (json_body)
		text = sync_json_dump(json_body);

	for (int attempt = 0;; attempt++)
	{
		SyncHttpHeader header;

		header.name = "Authorization";
		header.value = psprintf("Bearer %s", hs_access_token(source, page));
		PG_TRY();
		{
			sync_api_request(source, page, method, psprintf("%s%s", source->base_url, path), &header, 1, text,
							  text ? "application/json" : NULL, resp);
		}
		PG_FINALLY();
		{
			memset((char *) header.value, 0, strlen(header.value));
		}
		PG_END_TRY();
		if (resp->status == 401 && attempt == 0 && hs_uses_oauth(source))
		{
			json_decref(source->token);
			source->token = NULL;
			continue;
		}
		if (resp->status < 200 || resp->status >= 300)
			hs_raise(resp, what);
		return sync_json_parse(resp->body, resp->body_len, psprintf("HubSpot %s response", what));
	}
}

/* ---------- describe ---------- */

/* The property that stamps a record's last change. */
static const char *
hs_modified_property(const char *type)
{
	return strcmp(type, "contacts") == 0 || strcmp(type, "0-1") == 0 ? "lastmodifieddate" : "hs_lastmodifieddate";
}

static SyncField *
hs_plain_field(const char *name, const char *column_type, const char *convert_sql, bool is_key)
{
	SyncField  *f = palloc0(sizeof(SyncField));

	f->api_field = pstrdup(name);
	f->api_type = "association";
	f->column_name = pstrdup(name);
	f->column_type = pstrdup(column_type);
	f->wire_type = "text";
	f->convert_sql = convert_sql ? pstrdup(convert_sql) : NULL;
	f->is_key = is_key;
	return f;
}

/*
 * An association collection "contacts/companies": one row per (from, to,
 * association type). Both object types must exist.
 */
static List *
hs_describe_associations(SyncSource *source, const char *collection, char **canonical_name)
{
	char	   *from = pstrdup(collection);
	char	   *to = strchr(from, '/');
	SyncHttpResponse resp = {0};

	*to++ = '\0';
	for (int side = 0; side < 2; side++)
	{
		const char *type = side ? to : from;
		json_t	   *body = NULL;

		PG_TRY();
		{
			body = hs_request(source, NULL, "GET", hs_properties_path(source, type), NULL, "properties", &resp);
		}
		PG_CATCH();
		{
			if (resp.status == 400 || resp.status == 404)
			{
				FlushErrorState();
				ereport(ERROR,
						(errcode(ERRCODE_UNDEFINED_OBJECT),
						 errmsg("HubSpot has no object type \"%s\"", type),
						 errhint("An association collection is \"<from type>/<to type>\", such as contacts/companies.")));
			}
			PG_RE_THROW();
		}
		PG_END_TRY();
		json_decref(body);
	}
	*canonical_name = psprintf("%s/%s", from, to);
	return list_make5(hs_plain_field("id", "text", NULL, true),
					  hs_plain_field("from_id", "bigint", "%s::bigint", false),
					  hs_plain_field("to_id", "bigint", "%s::bigint", false),
					  hs_plain_field("type_id", "integer", "%s::integer", false),
					  hs_plain_field("label", "text", NULL, false));
}

static List *
hs_describe(SyncSource *source, const char *collection, char **canonical_name)
{
	SyncHttpResponse resp = {0};
	json_t	   *volatile body = NULL;
	List	   *volatile fields = NIL;
	List	   *volatile taken = list_make1(pstrdup("_synced_at"));
	const char *modified = hs_modified_property(collection);
	volatile bool has_modified = false;

	for (const char *p = collection; *p; p++)
		if (!isalnum((unsigned char) *p) && *p != '_' && *p != '-' && *p != '/')
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid HubSpot object type \"%s\"", collection),
					 errhint("Use an object type such as contacts, companies, deals, or a custom object's name or id (2-1234567); \"contacts/companies\" syncs associations.")));
	if (strchr(collection, '/'))
	{
		if (strchr(collection, '/') == collection || strchr(strchr(collection, '/') + 1, '/') ||
			strchr(collection, '/')[1] == '\0')
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid HubSpot association collection \"%s\"", collection),
					 errhint("Name two object types: \"contacts/companies\".")));
		return hs_describe_associations(source, collection, canonical_name);
	}

	PG_TRY();
	{
		json_t	   *list;
		json_t	   *prop;
		size_t		i;
		SyncField  *id;

		PG_TRY();
		{
			body = hs_request(source, NULL, "GET", hs_properties_path(source, collection), NULL,
							  "properties", &resp);
		}
		PG_CATCH();
		{
			if (resp.status == 400 || resp.status == 404)
			{
				FlushErrorState();
				ereport(ERROR,
						(errcode(ERRCODE_UNDEFINED_OBJECT),
						 errmsg("HubSpot has no object type \"%s\"", collection),
						 errhint("Use contacts, companies, deals, tickets, ... or a custom object's name or id.")));
			}
			PG_RE_THROW();
		}
		PG_END_TRY();
		*canonical_name = pstrdup(collection);

		id = palloc0(sizeof(SyncField));
		id->api_field = "id";
		id->api_type = "id";
		id->column_name = "id";
		id->column_type = "bigint";
		id->wire_type = "text";
		id->convert_sql = "%s::bigint";
		id->is_key = true;
		fields = lappend(fields, id);
		taken = lappend(taken, "id");

		list = json_object_get(body, "results");
		json_array_foreach(list, i, prop)
		{
			const char *name = sync_json_string(prop, "name");
			const char *type = sync_json_string(prop, "type");
			const char *field_type = sync_json_string(prop, "fieldType");
			SyncField  *f;

			if (name == NULL || type == NULL || sync_json_bool(prop, "archived", false))
				continue;
			f = palloc0(sizeof(SyncField));
			f->api_field = pstrdup(name);
			f->api_type = psprintf("%s/%s", type, field_type ? field_type : "");
			f->column_name = sync_unique_identifier(sync_identifier_from_api_name(name), taken);
			taken = lappend(taken, f->column_name);
			/* Every value arrives as a string, or "" / null when empty. */
			f->wire_type = "text";
			if (strcmp(type, "number") == 0)
			{
				f->column_type = "numeric";
				f->convert_sql = "nullif(%s, '')::numeric";
			}
			else if (strcmp(type, "bool") == 0)
			{
				f->column_type = "boolean";
				f->convert_sql = "nullif(%s, '')::boolean";
			}
			else if (strcmp(type, "date") == 0)
			{
				f->column_type = "date";
				f->convert_sql = "nullif(%s, '')::date";
			}
			else if (strcmp(type, "datetime") == 0)
			{
				f->column_type = "timestamptz";
				f->convert_sql = "nullif(%s, '')::timestamptz";
			}
			else if (strcmp(type, "enumeration") == 0 && field_type && strcmp(field_type, "checkbox") == 0)
			{
				f->column_type = "text[]";
				f->convert_sql = "string_to_array(nullif(%s, ''), ';')";
			}
			else
				f->column_type = "text";
			f->is_version = strcmp(name, modified) == 0;
			has_modified |= f->is_version;
			fields = lappend(fields, f);
		}
		if (!has_modified)
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("HubSpot object type \"%s\" has no %s property", collection, modified),
					 errdetail("sync detects changes by it.")));
	}
	PG_FINALLY();
	{
		json_decref(body);
	}
	PG_END_TRY();
	return fields;
}

/* ---------- records ---------- */

static const char *
hs_version_field(SyncCollection *c)
{
	ListCell   *lc;

	foreach(lc, c->fields)
		if (((SyncField *) lfirst(lc))->is_version)
			return ((SyncField *) lfirst(lc))->api_field;
	return "hs_lastmodifieddate";
}

static char *
hs_property_list(SyncCollection *c)
{
	StringInfoData buf;
	ListCell   *lc;

	initStringInfo(&buf);
	foreach(lc, c->fields)
	{
		SyncField  *f = lfirst(lc);

		if (!f->is_key)
			appendStringInfo(&buf, "%s%s", buf.len ? "," : "", f->api_field);
	}
	return buf.data;
}

static json_t *
hs_property_array(SyncCollection *c)
{
	json_t	   *array = json_array();
	ListCell   *lc;

	foreach(lc, c->fields)
	{
		SyncField  *f = lfirst(lc);

		if (!f->is_key)
			json_array_append_new(array, json_string(f->api_field));
	}
	return array;
}

static int64
hs_millis(const char *iso)
{
	double		t = sync_parse_iso8601(iso);

	return t < 0 ? -1 : (int64) (t * 1000.0 + 0.5);
}

/*
 * Flatten each {id, properties} into one object keyed by property name, take
 * merged-away ids as deletions, and return the newest last-modified time (ms).
 */
static int64
hs_take_results(SyncCollection *c, SyncPage *page, json_t *body, int64 *last_id, int64 *last_ms)
{
	const char *version = hs_version_field(c);
	json_t	   *results = json_object_get(body, "results");
	int64		newest = -1;
	json_t	   *r;
	size_t		i;

	if (!json_is_array(results))
	{
		json_decref(body);		/* the step ends here: nobody else will */
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("HubSpot response has no results array")));
	}
	json_array_foreach(results, i, r)
	{
		const char *id = sync_json_string(r, "id");
		json_t	   *props = json_object_get(r, "properties");
		json_t	   *flat;
		const char *merged;
		int64		ms;

		if (id == NULL || !json_is_object(props))
		{
			json_decref(body);
			ereport(ERROR,
					(errcode(ERRCODE_DATA_EXCEPTION),
					 errmsg("HubSpot record without id or properties"),
					 errdetail("Record %zu of the page.", i)));
		}
		flat = json_deep_copy(props);
		json_object_set_new(flat, "id", json_string(id));
		json_array_append_new(page->records, flat);

		merged = sync_json_string(props, "hs_merged_object_ids");
		if (merged && merged[0])
		{
			char	   *list = pstrdup(merged);
			char	   *save = NULL;

			for (char *tok = strtok_r(list, ";", &save); tok; tok = strtok_r(NULL, ";", &save))
				if (strcmp(tok, id) != 0)
					json_array_append_new(page->deletions, json_pack("{s:s, s:n}", "id", tok, "at"));
		}
		ms = hs_millis(sync_json_string(props, version));
		if (ms > newest)
			newest = ms;
		if (last_id)
			*last_id = strtoll(id, NULL, 10);
		if (last_ms)
			*last_ms = ms;
	}
	return newest;
}

/* ---------- steps ---------- */

static char *
hs_list_path(SyncSource *source, SyncCollection *c, const char *after, const char *properties, bool archived)
{
	StringInfoData path;

	initStringInfo(&path);
	appendStringInfo(&path, "%s?limit=%d&properties=%s", hs_objects_path(source, c->name), HS_LIST_LIMIT,
					 sync_http_urlencode(properties));
	if (archived)
		appendStringInfoString(&path, "&archived=true");
	if (after)
		appendStringInfo(&path, "&after=%s", sync_http_urlencode(after));
	return path.data;
}

static const char *
hs_next_after(json_t *body)
{
	return sync_json_string(json_object_get(json_object_get(body, "paging"), "next"), "after");
}

/* How many records the backfill will read: the list API does not say, a one-result search does. */
static int64
hs_count(SyncSource *source, SyncCollection *c, SyncPage *page)
{
	SyncHttpResponse resp = {0};
	json_t	   *request = json_pack("{s:[s], s:i}", "properties", "hs_object_id", "limit", 1);
	json_t	   *volatile body = NULL;
	int64		total;

	PG_TRY();
	{
		body = hs_request(source, page, "POST", psprintf("%s/search", hs_objects_path(source, c->name)),
						  request, "count", &resp);
	}
	PG_FINALLY();
	{
		json_decref(request);
	}
	PG_END_TRY();
	total = sync_json_int(body, "total", -1);
	json_decref(body);
	return total;
}

static void
hs_backfill_step(SyncSource *source, SyncCollection *c, SyncPage *page, json_t *cursor)
{
	SyncHttpResponse resp = {0};
	json_t	   *body;
	const char *next;
	int64		newest;

	if (sync_json_string(cursor, "after") == NULL)
		page->total = hs_count(source, c, page);
	body = hs_request(source, page, "GET",
					  hs_list_path(source, c, sync_json_string(cursor, "after"), hs_property_list(c), false),
					  NULL, "list", &resp);
	if (!json_object_get(cursor, "started"))
		json_object_set_new(cursor, "started", json_integer((json_int_t) (sync_http_server_time(&resp) * 1000)));
	newest = hs_take_results(c, page, body, NULL, NULL);
	if (newest > sync_json_int(cursor, "ts", -1))
		json_object_set_new(cursor, "ts", json_integer(newest));
	next = hs_next_after(body);
	page->activity = "backfilling";
	if (next)
	{
		json_object_set_new(cursor, "after", json_string(next));
		page->phase = "backfill";
		page->more = true;
	}
	else
	{
		int64		overlap = sync_json_int(source->options, "overlap", HS_DEFAULT_OVERLAP_S) * 1000;

		page->backfill_done = true;
		page->phase = "incremental";
		page->more = true;
		json_object_del(cursor, "after");
		json_object_set_new(cursor, "mode", json_string("incremental"));
		/* Changes made while the backfill ran are re-read by the first poll. */
		json_object_set_new(cursor, "safe_from", json_integer(sync_json_int(cursor, "started", 0) - overlap));
		json_object_del(cursor, "started");
		/* a random first check keeps collections backfilled together from checking in one cycle */
		json_object_set_new(cursor, "archived_at",
							json_real((double) time(NULL) -
									  sync_json_number(c->options, "deleted_interval",
													   sync_json_number(source->options, "deleted_interval",
																		HS_DEFAULT_DELETED_INTERVAL_S)) *
									  ((double) random() / (double) PG_INT32_MAX)));
	}
	json_decref(body);
}

static json_t *
hs_filter(const char *property, const char *op, int64 value)
{
	return json_pack("{s:s, s:s, s:s}", "propertyName", property, "operator", op,
					 "value", psprintf(INT64_FORMAT, value));
}

/* One search page of a poll: the walk from poll.from, or the tie at poll.tie_ts. */
static void
hs_poll_step(SyncSource *source, SyncCollection *c, SyncPage *page, json_t *cursor)
{
	const char *version = hs_version_field(c);
	json_t	   *poll = json_object_get(cursor, "poll");
	json_t	   *filters;
	json_t	   *request;
	json_t	   *volatile body = NULL;
	SyncHttpResponse resp = {0};
	bool		tie;
	int64		last_id = 0;
	int64		last_ms = -1;
	int64		newest;
	size_t		n;

	if (poll == NULL)
	{
		int64		ts = sync_json_int(cursor, "ts", -1);
		int64		safe_from = sync_json_int(cursor, "safe_from", -1);
		bool		incl = (safe_from >= 0 && (ts < 0 || ts >= safe_from));

		poll = json_pack("{s:I, s:b}", "from", (json_int_t) (incl ? safe_from : Max(ts, 0)), "incl", incl);
		json_object_set_new(cursor, "poll", poll);
	}
	tie = json_object_get(poll, "tie_ts") != NULL;
	if (tie)
		filters = json_pack("[o, o]",
							hs_filter(version, "EQ", sync_json_int(poll, "tie_ts", 0)),
							hs_filter("hs_object_id", "GT", sync_json_int(poll, "tie_id", 0)));
	else
		filters = json_pack("[o]", hs_filter(version, sync_json_bool(poll, "incl", false) ? "GTE" : "GT",
											 sync_json_int(poll, "from", 0)));
	request = json_pack("{s:[{s:o}], s:[{s:s, s:s}], s:o, s:i}",
						"filterGroups", "filters", filters,
						"sorts", "propertyName", tie ? "hs_object_id" : version, "direction", "ASCENDING",
						"properties", hs_property_array(c),
						"limit", HS_SEARCH_LIMIT);
	PG_TRY();
	{
		body = hs_request(source, page, "POST", psprintf("%s/search", hs_objects_path(source, c->name)),
						  request, "search", &resp);
	}
	PG_FINALLY();
	{
		json_decref(request);
	}
	PG_END_TRY();
	if (!json_object_get(cursor, "started"))
		json_object_set_new(cursor, "started", json_integer((json_int_t) (sync_http_server_time(&resp) * 1000)));

	n = json_array_size(json_object_get(body, "results"));
	newest = hs_take_results(c, page, body, &last_id, &last_ms);
	json_decref(body);
	if (newest > sync_json_int(cursor, "ts", -1))
		json_object_set_new(cursor, "ts", json_integer(newest));

	page->phase = "incremental";
	page->activity = "polling for changes";
	page->more = true;
	if (tie && n == HS_SEARCH_LIMIT)
		json_object_set_new(poll, "tie_id", json_integer(last_id));
	else if (tie)
	{
		/* Every record of that timestamp is read: go on after it. */
		json_object_set_new(poll, "from", json_integer(sync_json_int(poll, "tie_ts", 0)));
		json_object_set_new(poll, "incl", json_false());
		json_object_del(poll, "tie_ts");
		json_object_del(poll, "tie_id");
	}
	else if (n == HS_SEARCH_LIMIT && last_ms >= 0)
	{
		/* A full page: read all records of its last timestamp by id, never with `after`. */
		json_object_set_new(poll, "tie_ts", json_integer(last_ms));
		json_object_set_new(poll, "tie_id", json_integer(0));
	}
	else
	{
		int64		overlap = sync_json_int(source->options, "overlap", HS_DEFAULT_OVERLAP_S) * 1000;

		json_object_set_new(cursor, "safe_from", json_integer(sync_json_int(cursor, "started", 0) - overlap));
		json_object_del(cursor, "started");
		json_object_del(cursor, "poll");
		page->caught_up = true;
		page->more = json_object_get(cursor, "sweep") != NULL;
	}
}

/* One page of a listing by id: the recycle bin (deletes) or every record (a delete sweep). */
static void
hs_walk_step(SyncSource *source, SyncCollection *c, SyncPage *page, json_t *cursor, bool sweep)
{
	const char *key = sweep ? "sweep" : "archived";
	json_t	   *walk = json_object_get(cursor, key);
	SyncHttpResponse resp = {0};
	json_t	   *body;
	json_t	   *r;
	size_t		i;
	const char *next;
	bool		first = (walk == NULL || sync_json_string(walk, "after") == NULL);

	if (walk == NULL)
	{
		walk = json_object();
		json_object_set_new(cursor, key, walk);
	}
	body = hs_request(source, page, "GET",
					  hs_list_path(source, c, sync_json_string(walk, "after"), "hs_object_id", !sweep),
					  NULL, sweep ? "sweep" : "archived list", &resp);
	if (sweep)
	{
		page->sweep_begin = first;
		page->sweep_ids = json_array();
	}
	json_array_foreach(json_object_get(body, "results"), i, r)
	{
		const char *id = sync_json_string(r, "id");

		if (id == NULL)
			continue;
		if (sweep)
			json_array_append_new(page->sweep_ids, json_string(id));
		else
			json_array_append_new(page->deletions, json_pack("{s:s, s:n}", "id", id, "at"));
	}
	next = hs_next_after(body);
	if (next)
		json_object_set_new(walk, "after", json_string(next));
	else
	{
		json_object_del(cursor, key);
		page->sweep_end = sweep;
	}
	json_decref(body);
	page->phase = "incremental";
	page->activity = sweep ? "sweeping ids for deletes" : "reading the recycle bin";
	page->more = true;
}

/*
 * Associations do not move either record's modification date, so they are
 * read by walking every id of the "from" type and batch-reading its
 * associations, 100 ids a step. Each walk is also a delete sweep: an
 * association not seen by the end of a walk is removed. The association
 * lag is the time of one walk, shown by last_sweep_at.
 */
static void
hs_association_step(SyncSource *source, SyncCollection *c, SyncPage *page, json_t *cursor)
{
	char	   *from = pstrdup(c->name);
	char	   *to = strchr(from, '/');
	const char *after = sync_json_string(cursor, "after");
	SyncHttpResponse resp = {0};
	json_t	   *list;
	json_t	   *inputs;
	json_t	   *r;
	size_t		i;
	const char *next;
	bool		backfill = !sync_json_string(cursor, "mode") || strcmp(sync_json_string(cursor, "mode"), "backfill") == 0;

	*to++ = '\0';
	list = hs_request(source, page, "GET", hs_list_path(source, &(SyncCollection) {.name = from}, after, "hs_object_id", false),
					  NULL, "list", &resp);
	inputs = json_array();
	json_array_foreach(json_object_get(list, "results"), i, r)
		if (sync_json_string(r, "id"))
			json_array_append_new(inputs, json_pack("{s:s}", "id", sync_json_string(r, "id")));
	next = hs_next_after(list);
	if (next)
		json_object_set_new(cursor, "after", json_string(next));
	else
		json_object_del(cursor, "after");
	json_decref(list);

	page->sweep_begin = (after == NULL);
	page->sweep_ids = json_array();
	if (json_array_size(inputs) > 0)
	{
		json_t	   *request = json_pack("{s:o}", "inputs", inputs);
		json_t	   *body;
		json_t	   *result;

		PG_TRY();
		{
			body = hs_request(source, page, "POST",
							  hs_date_versioned(source) ?
							  psprintf("/crm/associations/%s/%s/%s/batch/read", hs_api_version(source),
									   sync_http_urlencode(from), sync_http_urlencode(to)) :
							  psprintf("/crm/v4/associations/%s/%s/batch/read",
									   sync_http_urlencode(from), sync_http_urlencode(to)),
							  request, "associations batch read", &resp);
		}
		PG_CATCH();
		{
			json_decref(request);
			PG_RE_THROW();
		}
		PG_END_TRY();
		json_decref(request);
		/* 207: ids without associations come back as errors, which is no error for us */
		json_array_foreach(json_object_get(body, "results"), i, result)
		{
			const char *from_id = sync_json_string(json_object_get(result, "from"), "id");
			json_t	   *target;
			size_t		k;

			json_array_foreach(json_object_get(result, "to"), k, target)
			{
				json_t	   *type;
				size_t		t;
				char	   *to_id = psprintf("%" JSON_INTEGER_FORMAT, json_integer_value(json_object_get(target, "toObjectId")));

				json_array_foreach(json_object_get(target, "associationTypes"), t, type)
				{
					char	   *type_id = psprintf("%" JSON_INTEGER_FORMAT, json_integer_value(json_object_get(type, "typeId")));
					char	   *key = psprintf("%s:%s:%s", from_id, to_id, type_id);
					json_t	   *row = json_pack("{s:s, s:s, s:s, s:s}", "id", key, "from_id", from_id,
												"to_id", to_id, "type_id", type_id);

					if (sync_json_string(type, "label"))
						json_object_set_new(row, "label", json_string(sync_json_string(type, "label")));
					json_array_append_new(page->records, row);
					json_array_append_new(page->sweep_ids, json_string(key));
				}
			}
		}
		json_decref(body);
	}
	else
		json_decref(inputs);

	page->activity = "reading associations";
	page->phase = backfill ? "backfill" : "incremental";
	page->more = (next != NULL);
	if (next == NULL)
	{
		page->sweep_end = true;
		page->backfill_done = backfill;
		page->phase = "incremental";
		json_object_set_new(cursor, "mode", json_string("incremental"));
	}
}

static void
hs_step(SyncSource *source, SyncCollection *c, SyncPage *page)
{
	json_t	   *cursor = json_is_object(c->cursor) ? json_deep_copy(c->cursor) : json_object();
	const char *mode = sync_json_string(cursor, "mode");
	double		interval = sync_json_number(c->options, "deleted_interval",
											sync_json_number(source->options, "deleted_interval",
															 HS_DEFAULT_DELETED_INTERVAL_S));
	bool		polling = json_object_get(cursor, "poll") != NULL;

	page->records = json_array();
	page->deletions = json_array();
	page->cursor = cursor;
	if (strchr(c->name, '/'))
	{
		hs_association_step(source, c, page, cursor);
		return;
	}
	if (c->reconcile_requested && mode && strcmp(mode, "incremental") == 0 && !json_object_get(cursor, "sweep"))
		json_object_set_new(cursor, "sweep", json_object());
	/*
	 * Records deleted since the last walk of the bin may have been purged from
	 * it (the sync was paused, or the server down, for that long): only a
	 * sweep of every id finds them.
	 */
	if (mode && strcmp(mode, "incremental") == 0 && !json_object_get(cursor, "sweep") &&
		!json_object_get(cursor, "archived") &&
		(double) time(NULL) - sync_json_number(cursor, "archived_at", 0) >= HS_RECYCLE_BIN_HORIZON_S)
		json_object_set_new(cursor, "sweep", json_object());

	if (mode == NULL || strcmp(mode, "backfill") == 0)
	{
		json_object_set_new(cursor, "mode", json_string("backfill"));
		hs_backfill_step(source, c, page, cursor);
	}
	else if (!polling && json_object_get(cursor, "archived"))
		hs_walk_step(source, c, page, cursor, false);
	else if (!polling && (double) time(NULL) - sync_json_number(cursor, "archived_at", 0) >= interval)
	{
		json_object_set_new(cursor, "archived_at", json_real((double) time(NULL)));
		hs_walk_step(source, c, page, cursor, false);
	}
	else if (!polling && json_object_get(cursor, "sweep") && sync_json_bool(cursor, "sweep_turn", true))
	{
		hs_walk_step(source, c, page, cursor, true);
		json_object_set_new(cursor, "sweep_turn", json_false());
	}
	else
	{
		hs_poll_step(source, c, page, cursor);
		json_object_set_new(cursor, "sweep_turn", json_true());
	}
}

/* ---------- limits ---------- */

/*
 * A private app may make 100 requests per 10 s (more on higher tiers, as
 * X-HubSpot-RateLimit-Max tells) and its account 250,000 a day; a public
 * OAuth app 110 per 10 s and no daily cap. CRM search allows 5 per second.
 */
static void
hs_limits(SyncSource *source, const SyncQuota *seen, SyncLimits *limits)
{
	bool		oauth = hs_uses_oauth(source);

	if (seen->burst_limit > 0 && seen->burst_window_s > 0)
		limits->rate = seen->burst_limit / seen->burst_window_s;
	else
		limits->rate = (oauth ? 110.0 : 100.0) / 10.0;
	limits->search_rate = HS_SEARCH_PER_SECOND;
	if (seen->daily_limit > 0)
		limits->daily_limit = seen->daily_limit;
	else if (!oauth)
		limits->daily_limit = 250000;
	limits->basis = psprintf("HubSpot's %.0f requests per 10 s%s", limits->rate * 10,
							 limits->daily_limit > 0 ? psprintf(" and %.0f a day", limits->daily_limit) : "");
}

static double
header_number(SyncHttpResponse *resp, const char *name)
{
	char	   *v = sync_http_header(resp, name);
	double		n = v ? strtod(v, NULL) : -1;

	/* a count of requests or milliseconds: finite and within reason, else unknown */
	return (n >= 0 && n <= 1e10) ? n : -1;
}

static bool
hs_observe_quota(SyncHttpResponse *resp, SyncQuota *seen)
{
	double		daily = header_number(resp, "X-HubSpot-RateLimit-Daily");
	double		max = header_number(resp, "X-HubSpot-RateLimit-Max");
	double		interval_ms = header_number(resp, "X-HubSpot-RateLimit-Interval-Milliseconds");

	if (daily > 0)
	{
		seen->daily_limit = daily;
		seen->daily_remaining = header_number(resp, "X-HubSpot-RateLimit-Daily-Remaining");
	}
	/* HubSpot's windows are 1 s and 10 s; anything outside a second to a day is not a window */
	if (interval_ms < 1000 || interval_ms > 86400000)
		interval_ms = -1;
	if (max > 0 && interval_ms > 0)
	{
		seen->burst_limit = max;
		seen->burst_window_s = interval_ms / 1000.0;
	}
	return daily > 0 || (max > 0 && interval_ms > 0);
}

static double
hs_rate_limit_wait(SyncHttpResponse *resp, const char **reason)
{
	json_t	   *body;
	const char *policy;
	double		wait;

	if (resp->status != 429)
		return 0;
	body = json_loadb(resp->body, resp->body_len, 0, NULL);
	policy = sync_json_string(body, "policyName");
	if (policy && strcmp(policy, "DAILY") == 0)
	{
		*reason = "the account's daily HubSpot API limit is spent";
		wait = 3600;
	}
	else if (policy && strcmp(policy, "SECONDLY") == 0)
	{
		*reason = "HubSpot's search limit of 5 requests/s";
		wait = 1;
	}
	else
	{
		*reason = "HubSpot's limit per 10 seconds";
		wait = 10;
	}
	json_decref(body);
	return wait;
}

static bool
hs_is_search(const char *method, const char *url)
{
	return strcmp(method, "POST") == 0 && strstr(url, "/search") != NULL;
}

/* ---------- webhooks ---------- */

#define HS_WEBHOOK_MAX_AGE_MS (5 * 60 * 1000)

/*
 * The URI as HubSpot signs it: the URL it called, with the escapes of
 * : / ? @ ! $ ' ( ) * , ; decoded (HubSpot's v3 signature documentation).
 */
static char *
hs_signed_uri(const char *url)
{
	static const char *const decoded[][2] = {
		{"%3A", ":"}, {"%2F", "/"}, {"%3F", "?"}, {"%40", "@"}, {"%21", "!"}, {"%24", "$"},
		{"%27", "'"}, {"%28", "("}, {"%29", ")"}, {"%2A", "*"}, {"%2C", ","}, {"%3B", ";"},
	};
	StringInfoData out;

	initStringInfo(&out);
	for (const char *p = url; *p;)
	{
		bool		done = false;

		if (*p == '%')
			for (size_t i = 0; i < lengthof(decoded) && !done; i++)
				if (pg_strncasecmp(p, decoded[i][0], 3) == 0)
				{
					appendStringInfoString(&out, decoded[i][1]);
					p += 3;
					done = true;
				}
		if (!done)
			appendStringInfoChar(&out, *p++);
	}
	return out.data;
}

/*
 * X-HubSpot-Signature-v3 = base64(HMAC-SHA256(app client secret, method +
 * URI + body + X-HubSpot-Request-Timestamp)); a timestamp over 5 minutes
 * old is refused (HubSpot's advice), as is one as far in the future. The
 * URI is the public URL registered with HubSpot (option webhook_url) when a
 * proxy stands between, else the one the listener was called at.
 */
static const char *
hs_verify_webhook(SyncSource *source, const SyncWebhookRequest *req)
{
	const char *secret = sync_json_string(source->credentials, "webhook_secret");
	const char *signature = sync_webhook_header(req, "x-hubspot-signature-v3");
	const char *timestamp = sync_webhook_header(req, "x-hubspot-request-timestamp");
	const char *url = sync_json_string(source->options, "webhook_url");
	StringInfoData msg;
	uint8		digest[SYNC_HMAC_SHA256_LEN];
	char	   *expected;
	char	   *end;
	double		ms;

	if (secret == NULL)
		secret = sync_json_string(source->credentials, "client_secret");
	if (secret == NULL || secret[0] == '\0')
		return "the source has no client_secret or webhook_secret in its credentials";
	if (signature == NULL || timestamp == NULL)
		return "no X-HubSpot-Signature-v3 or X-HubSpot-Request-Timestamp header";
	if (url == NULL)
		url = req->url;
	if (url == NULL)
		return "no URL to check the signature against: set the source's webhook_url option";
	ms = strtod(timestamp, &end);
	if (end == timestamp || *end != '\0' || ms <= 0)
		return "X-HubSpot-Request-Timestamp is not a number";

	initStringInfo(&msg);
	appendStringInfo(&msg, "%s%s", req->method ? req->method : "POST", hs_signed_uri(url));
	appendBinaryStringInfo(&msg, req->body, (int) req->body_len);
	appendStringInfoString(&msg, timestamp);
	if (!sync_hmac_sha256(secret, strlen(secret), msg.data, msg.len, digest))
		return "could not compute the signature";
	expected = sync_base64_encode(digest, sizeof(digest));
	if (expected == NULL || !sync_equal_secret(expected, signature))
		return "bad signature: X-HubSpot-Signature-v3 does not match";
	if (req->now * 1000.0 - ms > HS_WEBHOOK_MAX_AGE_MS)
		return "stale delivery: X-HubSpot-Request-Timestamp is more than 5 minutes old";
	if (ms - req->now * 1000.0 > HS_WEBHOOK_MAX_AGE_MS)
		return "delivery from the future: X-HubSpot-Request-Timestamp is more than 5 minutes ahead";
	return NULL;
}

/* contact -> contacts, company -> companies, line_item -> line_items */
static char *
hs_collection_of(const char *object, size_t len)
{
	if (len > 1 && object[len - 1] == 'y')
		return psprintf("%.*sies", (int) len - 1, object);
	return psprintf("%.*ss", (int) len, object);
}

/* An integer field of an event as text, or NULL. */
static char *
hs_event_number(json_t *event, const char *key)
{
	json_t	   *v = json_object_get(event, key);

	if (json_is_integer(v))
		return psprintf("%lld", (long long) json_integer_value(v));
	if (json_is_string(v) && json_string_length(v) > 0 && json_string_length(v) < 32)
		return pstrdup(json_string_value(v));
	return NULL;
}

/*
 * A delivery is a JSON array of events. A property change sets that one
 * column unless the row is newer; a deletion deletes unless the row is
 * newer (both by occurredAt against the modification stamp); a creation,
 * restore or merge carries no properties: the collection polls now.
 */
static List *
hs_webhook_changes(SyncSource *source, const SyncWebhookRequest *req, const char **malformed)
{
	json_t	   *events = json_loadb(req->body, req->body_len, 0, NULL);
	json_t	   *event;
	size_t		i;
	List	   *changes = NIL;

	if (!json_is_array(events) || json_array_size(events) == 0)
	{
		json_decref(events);
		*malformed = "the body is not a JSON array of HubSpot events";
		return NIL;
	}
	json_array_foreach(events, i, event)
	{
		const char *type = sync_json_string(event, "subscriptionType");
		char	   *event_id = hs_event_number(event, "eventId");
		char	   *object_id = hs_event_number(event, "objectId");
		json_t	   *occurred = json_object_get(event, "occurredAt");
		const char *dot = type ? strchr(type, '.') : NULL;
		SyncWebhookChange *change;
		const char *what;
		char	   *at;

		if (event_id == NULL || object_id == NULL || dot == NULL || dot == type || !json_is_number(occurred))
		{
			json_decref(events);
			*malformed = "a HubSpot event lacks eventId, objectId, subscriptionType or occurredAt";
			return NIL;
		}
		change = palloc0(sizeof(SyncWebhookChange));
		{
			char	   *subscription = hs_event_number(event, "subscriptionId");

			change->event_id = psprintf("%s:%s", subscription ? subscription : "0", event_id);
		}
		change->collection = hs_collection_of(type, dot - type);
		change->record_id = object_id;
		what = dot + 1;
		/* the stamp columns are timestamptz read from ISO text: the event's time in the same form */
		at = psprintf("%s.%03dZ", sync_format_utc(json_number_value(occurred) / 1000.0, "%Y-%m-%dT%H:%M:%S"),
					  (int) fmod(json_number_value(occurred), 1000.0));
		if (strcmp(what, "propertyChange") == 0 && sync_json_string(event, "propertyName"))
		{
			change->action = SYNC_WEBHOOK_SET_FIELD;
			change->field = pstrdup(sync_json_string(event, "propertyName"));
			change->value = json_incref(json_object_get(event, "propertyValue"));
			change->at = json_string(at);
		}
		else if (strcmp(what, "deletion") == 0 || strcmp(what, "privacyDeletion") == 0)
		{
			change->action = SYNC_WEBHOOK_DELETE;
			change->at = json_string(at);
		}
		else if (strcmp(what, "creation") == 0 || strcmp(what, "restore") == 0 ||
				 strcmp(what, "merge") == 0 || strcmp(what, "associationChange") == 0)
			change->action = SYNC_WEBHOOK_POLL;
		changes = lappend(changes, change);
	}
	json_decref(events);
	return changes;
}

const SyncProvider sync_hubspot_provider = {
	.kind = "hubspot",
	.required_credentials = NULL,
	.default_quota_fraction = 0.2,
	.limits = hs_limits,
	.observe_quota = hs_observe_quota,
	.rate_limit_wait = hs_rate_limit_wait,
	.is_search = hs_is_search,
	.validate_source = hs_validate_source,
	.describe = hs_describe,
	.refresh_token = hs_refresh_token,
	.step = hs_step,
	.verify_webhook = hs_verify_webhook,
	.webhook_changes = hs_webhook_changes,
};
