/*
 * salesforce.c: the Salesforce provider (REST API).
 *
 * Backfill: one SOQL query over every field, ordered by SystemModstamp, Id,
 * following nextRecordsUrl. Incremental: queryAll from a (SystemModstamp, Id)
 * keyset, so records sharing one timestamp across a page boundary are neither
 * missed nor repeated; queryAll also returns soft-deleted records. Each poll
 * re-reads an overlap window, because a record's SystemModstamp is set when
 * its transaction starts writing but becomes visible only at commit. Hard
 * deletes come from the getDeleted resource, checked periodically.
 *
 * The cursor is a JSON object stored with each page:
 *   mode          backfill | incremental
 *   next_url      continuation of the query in progress
 *   ts, id        keyset of the newest record applied (ts is a SOQL literal)
 *   started       server time the backfill query or current poll began
 *   safe_from     lower bound of the next poll: started - overlap
 *   deleted_until getDeleted has been read up to here
 *   deleted_at    local time of the last getDeleted call
 */
#include "sync.h"

#include <time.h>

#include "utils/builtins.h"

#define SF_DEFAULT_API_VERSION "66.0"
#define SF_DEFAULT_BATCH_SIZE 2000
#define SF_DEFAULT_OVERLAP_S 60
#define SF_DEFAULT_DELETED_INTERVAL_S 300
#define SF_DELETED_RETENTION_S (15 * 86400)
#define SF_ASSUMED_DAILY_ALLOCATION 100000.0
#define SF_MAX_URL_BYTES 16000

static const char *const sf_required_credentials[] = {"client_id", "client_secret", "refresh_token", NULL};

/* ---------- options ---------- */

const char *
sync_sf_api_version(SyncSource *source)
{
	const char *v = sync_json_string(source->options, "api_version");

	if (v == NULL)
		return SF_DEFAULT_API_VERSION;
	return (v[0] == 'v' || v[0] == 'V') ? v + 1 : v;
}

static const char *
sf_login_url(SyncSource *source)
{
	const char *v = sync_json_string(source->options, "login_url");

	return v ? v : source->base_url;
}

static void
sf_validate_source(SyncSource *source)
{
	const char *version = sync_json_string(source->options, "api_version");
	const char *login = sync_json_string(source->options, "login_url");
	int64		batch = sync_json_int(source->options, "batch_size", SF_DEFAULT_BATCH_SIZE);
	char	   *why;

	if (version)
	{
		const char *v = (version[0] == 'v' || version[0] == 'V') ? version + 1 : version;
		int			major,
					minor;
		char		extra;

		if (sscanf(v, "%d.%d%c", &major, &minor, &extra) != 2 || major < 31 || minor != 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid Salesforce api_version \"%s\"", version),
					 errhint("Give a REST API version such as \"%s\" (31.0 or later).", SF_DEFAULT_API_VERSION)));
	}
	if (login && !sync_url_is_valid(login, &why))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid login_url \"%s\": %s", login, why),
				 errhint("Use https://login.salesforce.com, https://test.salesforce.com or the org's My Domain URL.")));
	if (batch < 200 || batch > 2000)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("option \"batch_size\" must be between 200 and 2000"),
				 errdetail("Salesforce returns at most 2,000 records per query page.")));
}

/* ---------- time ---------- */

/* SOQL datetime literal (whole seconds, UTC). */
static char *
sf_soql_datetime(double epoch)
{
	return sync_format_utc(epoch, "%Y-%m-%dT%H:%M:%SZ");
}

/* ---------- requests ---------- */

void
sync_sf_raise(SyncHttpResponse *resp, const char *what)
{
	json_t	   *body = json_loadb(resp->body, resp->body_len, 0, NULL);
	const char *code = NULL;
	const char *message = NULL;
	int			sqlstate;

	if (body && json_is_array(body) && json_array_size(body) > 0)
	{
		code = sync_json_string(json_array_get(body, 0), "errorCode");
		message = sync_json_string(json_array_get(body, 0), "message");
	}
	else if (body && json_is_object(body))
	{
		code = sync_json_string(body, "error");
		message = sync_json_string(body, "error_description");
	}
	code = pstrdup(code ? code : "UNKNOWN");
	message = pstrdup(message ? message : (resp->body_len ? "unexpected response body" : "empty response body"));
	json_decref(body);

	if (resp->status == 401)
		sqlstate = ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION;
	else if (strcmp(code, "REQUEST_LIMIT_EXCEEDED") == 0)
		sqlstate = ERRCODE_CONFIGURATION_LIMIT_EXCEEDED;
	else if (resp->status == 404 || strcmp(code, "INVALID_TYPE") == 0)
		sqlstate = ERRCODE_UNDEFINED_OBJECT;
	else if (strcmp(code, "INVALID_FIELD") == 0)
		sqlstate = ERRCODE_UNDEFINED_COLUMN;
	else if (resp->status >= 500)
		sqlstate = ERRCODE_CONNECTION_FAILURE;
	else
		sqlstate = ERRCODE_DATA_EXCEPTION;

	ereport(ERROR,
			(errcode(sqlstate),
			 errmsg("Salesforce %s failed with HTTP %ld %s: %s", what, resp->status, code, message),
			 strcmp(code, "REQUEST_LIMIT_EXCEEDED") == 0 ?
			 errhint("The org's API allocation is spent; sync retries with backoff. Lower the source's quota_fraction or requests_per_second to leave room for other integrations.") :
			 strcmp(code, "invalid_grant") == 0 ?
			 errhint("The refresh token was revoked or expired: authorize again and call sync.alter_source() with new credentials.") : 0));
}

/* Trade the refresh token for an access token and save it (with a rotated refresh token). */
static void
sf_refresh_token(SyncSource *source, SyncPage *page)
{
	char	   *url = psprintf("%s/services/oauth2/token", sf_login_url(source));
	StringInfoData form;
	SyncHttpResponse resp = {0};
	json_t	   *body;
	json_t	   *token;
	const char *access;
	const char *instance;
	char	   *new_refresh;

	initStringInfo(&form);
	appendStringInfo(&form, "grant_type=refresh_token&client_id=%s&client_secret=%s&refresh_token=%s&format=json",
					 sync_http_urlencode(sync_json_string(source->credentials, "client_id")),
					 sync_http_urlencode(sync_json_string(source->credentials, "client_secret")),
					 sync_http_urlencode(sync_json_string(source->credentials, "refresh_token")));
	sync_api_request(source, page, "POST", url, NULL, 0, form.data, "application/x-www-form-urlencoded",
					  &resp);
	memset(form.data, 0, form.len);	/* holds secrets */
	if (resp.status != 200)
		sync_sf_raise(&resp, "token refresh");

	body = sync_json_parse(resp.body, resp.body_len, "Salesforce token response");
	access = sync_json_string(body, "access_token");
	instance = sync_json_string(body, "instance_url");
	if (access == NULL || instance == NULL)
	{
		json_decref(body);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
				 errmsg("Salesforce token response lacks access_token or instance_url")));
	}
	token = json_pack("{s:s, s:s}", "access_token", access, "instance_url", instance);
	new_refresh = sync_json_string(body, "refresh_token") ? pstrdup(sync_json_string(body, "refresh_token")) : NULL;
	json_decref(body);
	sync_save_refreshed_token(source, token, new_refresh);
}

static bool
sf_session_expired(SyncHttpResponse *resp)
{
	return resp->status == 401;
}

/*
 * One request to an API path with the session's token, refreshing the session
 * once on 401. Any HTTP status is returned in resp (for salesforce_bulk.c).
 */
void
sync_sf_request(SyncSource *source, SyncPage *page, const char *method, const char *path,
				const char *body, SyncHttpResponse *resp)
{
	for (int attempt = 0;; attempt++)
	{
		SyncHttpHeader headers[1];
		char	   *url;

		if (source->token == NULL || sync_json_string(source->token, "access_token") == NULL)
			sync_refresh_token(source, page);
		url = psprintf("%s%s", sync_json_string(source->token, "instance_url"), path);
		headers[0].name = "Authorization";
		headers[0].value = psprintf("Bearer %s", sync_json_string(source->token, "access_token"));
		sync_api_request(source, page, method, url, headers, 1, body,
						 body ? "application/json; charset=UTF-8" : NULL, resp);
		memset((char *) headers[0].value, 0, strlen(headers[0].value));
		if (sf_session_expired(resp) && attempt == 0)
		{
			json_decref(source->token);
			source->token = NULL;
			continue;
		}
		return;
	}
}

/* The headers of a GET of the API (headers has room for 2); returns how many. */
static int
sf_get_headers(SyncSource *source, int batch_size, SyncHttpHeader *headers)
{
	int			nheaders = 0;

	headers[nheaders].name = "Authorization";
	headers[nheaders++].value = psprintf("Bearer %s", sync_json_string(source->token, "access_token"));
	if (batch_size > 0)
	{
		headers[nheaders].name = "Sforce-Query-Options";
		headers[nheaders++].value = psprintf("batchSize=%d", batch_size);
	}
	return nheaders;
}

/*
 * Ask for the next page of a query now, while this one is applied: the next
 * step's sf_get() of the same path adopts the answer (see request.c).
 */
static void
sf_prefetch(SyncSource *source, SyncPage *page, const char *path, int batch_size)
{
	SyncHttpHeader headers[2];
	int			nheaders;

	if (path == NULL || path[0] != '/' || path[1] == '/' ||
		source->token == NULL || sync_json_string(source->token, "access_token") == NULL)
		return;
	nheaders = sf_get_headers(source, batch_size, headers);
	sync_api_prefetch(source, page, psprintf("%s%s", sync_json_string(source->token, "instance_url"), path),
					  headers, nheaders);
	memset((char *) headers[0].value, 0, strlen(headers[0].value));
}

/*
 * GET an API path (or a nextRecordsUrl), refreshing the session once on 401.
 * Returns the parsed body; the caller owns it. With scan (a query page to be
 * stored), its records are read straight into *scan->batch where the page
 * allows (jsonscan.c): the body returned then lacks them.
 */
typedef struct SfScan
{
	List	   *fields;
	SyncBatch  *batch;			/* set when the records were read into it */
} SfScan;

static json_t *
sf_get(SyncSource *source, SyncPage *page, const char *path, const char *what,
	   int batch_size, SyncHttpResponse *resp, SfScan *scan)
{
	for (int attempt = 0;; attempt++)
	{
		SyncHttpHeader headers[2];
		int			nheaders = 0;
		char	   *url;

		if (source->token == NULL || sync_json_string(source->token, "access_token") == NULL)
			sync_refresh_token(source, page);
		/* a nextRecordsUrl is a path of the instance: never send the token elsewhere */
		if (path[0] != '/' || path[1] == '/')
			ereport(ERROR,
					(errcode(ERRCODE_DATA_EXCEPTION),
					 errmsg("Salesforce %s response points to a URL outside the instance", what),
					 errdetail("Only paths of the instance are followed.")));
		url = psprintf("%s%s", sync_json_string(source->token, "instance_url"), path);
		nheaders = sf_get_headers(source, batch_size, headers);
		sync_api_request(source, page, "GET", url, headers, nheaders, NULL, NULL, resp);
		memset((char *) headers[0].value, 0, strlen(headers[0].value));
		if (sf_session_expired(resp) && attempt == 0)
		{
			json_decref(source->token);
			source->token = NULL;
			continue;
		}
		if (resp->status < 200 || resp->status >= 300)
			sync_sf_raise(resp, what);
		if (scan)
		{
			json_t	   *envelope;

			scan->batch = NULL;
			/* records marked IsDeleted are deletions: such pages take the tree */
			if (sync_json_scan_page(resp->body, resp->body_len, "records", scan->fields, "IsDeleted",
									&envelope, &scan->batch))
				return envelope;
		}
		return sync_json_parse(resp->body, resp->body_len, psprintf("Salesforce %s response", what));
	}
}

/* ---------- describe ---------- */

typedef struct SfTypeMap
{
	const char *sf_type;
	const char *column_type;	/* NULL: numeric(precision, scale) */
	const char *wire_type;
	const char *convert_sql;
} SfTypeMap;

static const SfTypeMap sf_types[] = {
	{"id", "text", "text", NULL},
	{"reference", "text", "text", NULL},
	{"string", "text", "text", NULL},
	{"textarea", "text", "text", NULL},
	{"email", "text", "text", NULL},
	{"phone", "text", "text", NULL},
	{"url", "text", "text", NULL},
	{"picklist", "text", "text", NULL},
	{"combobox", "text", "text", NULL},
	{"encryptedstring", "text", "text", NULL},
	{"multipicklist", "text[]", "text", "string_to_array(%s, ';')"},
	{"boolean", "boolean", "boolean", NULL},
	{"int", "integer", "numeric", "%s::integer"},
	{"long", "bigint", "numeric", "%s::bigint"},
	{"double", NULL, "numeric", NULL},
	{"currency", NULL, "numeric", NULL},
	{"percent", NULL, "numeric", NULL},
	{"date", "date", "date", NULL},
	{"datetime", "timestamptz", "timestamptz", NULL},
	{"time", "time", "time", NULL},
	{"address", "jsonb", "jsonb", NULL},
	{"location", "jsonb", "jsonb", NULL},
	{"complexvalue", "jsonb", "jsonb", NULL},
	{"json", "jsonb", "jsonb", NULL},
	{"anyType", "text", "text", NULL},
};

static const SfTypeMap *
sf_type_map(const char *sf_type)
{
	for (size_t i = 0; i < lengthof(sf_types); i++)
		if (strcmp(sf_types[i].sf_type, sf_type) == 0)
			return &sf_types[i];
	return NULL;
}

static List *
sf_describe(SyncSource *source, const char *collection, char **canonical_name)
{
	char	   *path;
	json_t	   *volatile body = NULL;
	List	   *volatile fields = NIL;
	List	   *volatile taken = list_make1(pstrdup("_synced_at"));
	SyncHttpResponse resp = {0};
	volatile bool has_modstamp = false;

	for (const char *p = collection; *p; p++)
		if (!isalnum((unsigned char) *p) && *p != '_')
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid Salesforce object name \"%s\"", collection),
					 errhint("Object names are API names such as Contact or Invoice__c.")));

	path = psprintf("/services/data/v%s/sobjects/%s/describe", sync_sf_api_version(source), collection);
	PG_TRY();
	{
		json_t	   *list;
		size_t		i;
		json_t	   *f;

		PG_TRY();
		{
			body = sf_get(source, NULL, path, "describe", 0, &resp, NULL);
		}
		PG_CATCH();
		{
			if (resp.status == 404)
			{
				FlushErrorState();
				ereport(ERROR,
						(errcode(ERRCODE_UNDEFINED_OBJECT),
						 errmsg("Salesforce has no object \"%s\"", collection),
						 errhint("Use the object's API name, such as Contact or Invoice__c; custom objects end in __c.")));
			}
			PG_RE_THROW();
		}
		PG_END_TRY();

		if (!sync_json_bool(body, "queryable", false) || !sync_json_bool(body, "replicateable", false))
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("Salesforce object \"%s\" cannot be synced", collection),
					 errdetail("Only objects that are queryable and replicateable can be synced.")));
		*canonical_name = pstrdup(sync_json_string(body, "name") ? sync_json_string(body, "name") : collection);

		list = json_object_get(body, "fields");
		if (!json_is_array(list))
			ereport(ERROR,
					(errcode(ERRCODE_DATA_EXCEPTION),
					 errmsg("Salesforce describe of \"%s\" has no field list", collection)));
		json_array_foreach(list, i, f)
		{
			const char *name = sync_json_string(f, "name");
			const char *type = sync_json_string(f, "type");
			const SfTypeMap *map;
			SyncField  *field;

			if (name == NULL || type == NULL || sync_json_bool(f, "deprecatedAndHidden", false))
				continue;
			if (strcmp(name, "IsDeleted") == 0 || strcmp(type, "base64") == 0)
				continue;		/* deletes remove rows; base64 bodies are separate downloads */
			map = sf_type_map(type);
			field = palloc0(sizeof(SyncField));
			field->api_field = pstrdup(name);
			field->api_type = pstrdup(type);
			field->column_name = sync_unique_identifier(sync_identifier_from_api_name(name), taken);
			taken = lappend(taken, field->column_name);
			if (map == NULL)
			{
				field->column_type = "text";
				field->wire_type = "text";
			}
			else if (map->column_type == NULL)
			{
				int64		precision = sync_json_int(f, "precision", 0);
				int64		scale = sync_json_int(f, "scale", 0);

				field->column_type = (precision > 0 && precision <= 1000 && scale >= 0 && scale <= precision) ?
					psprintf("numeric(%d,%d)", (int) precision, (int) scale) : "numeric";
				field->wire_type = "numeric";
			}
			else
			{
				field->column_type = (char *) map->column_type;
				field->wire_type = (char *) map->wire_type;
				field->convert_sql = (char *) map->convert_sql;
			}
			field->is_key = strcmp(name, "Id") == 0;
			field->is_version = strcmp(name, "SystemModstamp") == 0;
			has_modstamp |= field->is_version;
			fields = lappend(fields, field);
		}
		if (!has_modstamp)
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("Salesforce object \"%s\" has no SystemModstamp field", collection),
					 errdetail("sync detects changes by SystemModstamp.")));
	}
	PG_FINALLY();
	{
		json_decref(body);
	}
	PG_END_TRY();
	return fields;
}

/* ---------- sync steps ---------- */

static char *
sf_field_list(SyncCollection *c, bool with_is_deleted)
{
	StringInfoData buf;
	ListCell   *lc;

	initStringInfo(&buf);
	foreach(lc, c->fields)
		appendStringInfo(&buf, "%s%s", buf.len ? "," : "", ((SyncField *) lfirst(lc))->api_field);
	if (with_is_deleted)
		appendStringInfoString(&buf, ",IsDeleted");
	return buf.data;
}

static char *
sf_soql_string(const char *s)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoChar(&buf, '\'');
	for (; *s; s++)
	{
		if (*s == '\'' || *s == '\\')
			appendStringInfoChar(&buf, '\\');
		appendStringInfoChar(&buf, *s);
	}
	appendStringInfoChar(&buf, '\'');
	return buf.data;
}

/* The query path for SOQL, checked against the URL length limit. */
static char *
sf_query_path(SyncSource *source, SyncCollection *c, const char *resource, const char *soql)
{
	char	   *path = psprintf("/services/data/v%s/%s/?q=%s", sync_sf_api_version(source), resource,
								sync_http_urlencode(soql));

	if (strlen(path) > SF_MAX_URL_BYTES)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("the query of \"%s\" is longer than Salesforce accepts", c->name),
				 errhint("Sync fewer fields with the collection option \"fields\".")));
	return path;
}

static int
sf_batch_size(SyncSource *source)
{
	return (int) sync_json_int(source->options, "batch_size", SF_DEFAULT_BATCH_SIZE);
}

static void
cursor_set_str(json_t *cursor, const char *key, const char *value)
{
	if (value)
		json_object_set_new(cursor, key, json_string(value));
	else
		json_object_del(cursor, key);
}

/* (ts, id) keyset order; ts compared as time. */
static int
keyset_cmp(double ts_a, const char *id_a, double ts_b, const char *id_b)
{
	if (ts_a != ts_b)
		return ts_a < ts_b ? -1 : 1;
	return strcmp(id_a ? id_a : "", id_b ? id_b : "");
}

/*
 * One record of a query page: its Id and SystemModstamp must be valid; the
 * greatest (SystemModstamp, Id) not after max_ts so far is kept in *best_ts,
 * *best_id (a copy).
 */
static void
keyset_note(const char *id, const char *stamp, int position, double max_ts, double *best_ts, char **best_id)
{
	double		ts = sync_parse_iso8601(stamp);

	if (id == NULL || ts < 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("Salesforce record without a valid Id and SystemModstamp"),
				 errdetail("Record %d of the page.", position)));
	if ((max_ts < 0 || ts <= max_ts) && keyset_cmp(ts, id, *best_ts, *best_id) > 0)
	{
		*best_ts = ts;
		*best_id = pstrdup(id);
	}
}

/* The keyset of the last record noted: where the next query starts. */
static void
keyset_save(json_t *cursor, double best_ts, const char *best_id)
{
	if (best_id && best_ts >= 0)
	{
		cursor_set_str(cursor, "ts", sf_soql_datetime(best_ts));
		cursor_set_str(cursor, "id", best_id);
	}
}

/*
 * Split a page of records into upserts and deletions, and find the newest
 * keyset among them (only records stamped no later than max_ts count, when
 * given: records changed after the query began sit out of order).
 */
static void
sf_take_records(json_t *records, SyncPage *page, json_t *cursor, double max_ts)
{
	size_t		i;
	json_t	   *r;
	double		best_ts = sync_parse_iso8601(sync_json_string(cursor, "ts"));
	const char *best_id = sync_json_string(cursor, "id");
	char	   *best_id_copy = best_id ? pstrdup(best_id) : NULL;

	if (!json_is_array(records))
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("Salesforce query response has no records array")));
	json_array_foreach(records, i, r)
	{
		const char *id = sync_json_string(r, "Id");
		const char *stamp = sync_json_string(r, "SystemModstamp");

		keyset_note(id, stamp, (int) i, max_ts, &best_ts, &best_id_copy);
		if (sync_json_bool(r, "IsDeleted", false))
			json_array_append_new(page->deletions, json_pack("{s:s, s:s}", "id", id, "at", stamp));
		else
			json_array_append(page->records, r);
	}
	keyset_save(cursor, best_ts, best_id_copy);
}

/* Record i's value of field f as a C string, in buf when it fits (NULL: none). */
static char *
batch_cstring(SyncBatch *batch, int f, int i, char *buf, size_t size)
{
	text	   *t;
	size_t		len;

	if (f < 0 || batch->nulls[f][i])
		return NULL;
	t = DatumGetTextPP(batch->values[f][i]);
	len = VARSIZE_ANY_EXHDR(t);
	if (len >= size)
		return sync_batch_text(batch, f, i);
	memcpy(buf, VARDATA_ANY(t), len);
	buf[len] = '\0';
	return buf;
}

/*
 * sf_take_records() for a page read straight into a batch (jsonscan.c): the
 * same checks and keyset; the scanner gave up on pages with deletions.
 */
static void
sf_take_batch(SyncCollection *c, SyncBatch *batch, SyncPage *page, json_t *cursor, double max_ts)
{
	double		best_ts = sync_parse_iso8601(sync_json_string(cursor, "ts"));
	const char *best_id = sync_json_string(cursor, "id");
	char	   *best_id_copy = best_id ? pstrdup(best_id) : NULL;
	int			id_field = -1;
	int			stamp_field = -1;
	ListCell   *lc;

	foreach(lc, c->fields)
	{
		SyncField  *f = lfirst(lc);

		if (strcmp(f->api_field, "Id") == 0)
			id_field = foreach_current_index(lc);
		if (strcmp(f->api_field, "SystemModstamp") == 0)
			stamp_field = foreach_current_index(lc);
	}
	for (int i = 0; i < batch->nrecords; i++)
	{
		char		id_buf[64];
		char		stamp_buf[64];
		char	   *id = batch_cstring(batch, id_field, i, id_buf, sizeof(id_buf));
		char	   *stamp = batch_cstring(batch, stamp_field, i, stamp_buf, sizeof(stamp_buf));

		keyset_note(id, stamp, i, max_ts, &best_ts, &best_id_copy);
		if (id != id_buf)
			pfree(id);
		if (stamp != stamp_buf)
			pfree(stamp);
	}
	keyset_save(cursor, best_ts, best_id_copy);
	page->batch = batch;
}

/*
 * Fetch one page of a query: its continuation (holder's "next_url"), or a new
 * query. Leaves the next continuation in holder.
 */
static json_t *
sf_query_page(SyncSource *source, SyncCollection *c, SyncPage *page, json_t *holder,
			  const char *resource, const char *soql, SyncHttpResponse *resp, bool *is_new_query,
			  SfScan *scan)
{
	const char *next = sync_json_string(holder, "next_url");
	json_t	   *body = NULL;

	*is_new_query = false;
	if (next)
	{
		MemoryContext ctx = CurrentMemoryContext;

		PG_TRY();
		{
			body = sf_get(source, page, next, "query", sf_batch_size(source), resp, scan);
		}
		PG_CATCH();
		{
			ErrorData  *edata;

			MemoryContextSwitchTo(ctx);
			edata = CopyErrorData();
			/* Query locators expire: start the query again from the keyset. */
			if (resp->status != 400 || edata->message == NULL ||
				strstr(edata->message, "INVALID_QUERY_LOCATOR") == NULL)
				PG_RE_THROW();
			FlushErrorState();
			ereport(LOG,
					(errmsg("query locator of collection \"%s\" expired; querying again from the cursor", c->name)));
			body = NULL;
		}
		PG_END_TRY();
	}
	if (body == NULL)
	{
		body = sf_get(source, page, sf_query_path(source, c, resource, soql), "query", sf_batch_size(source), resp,
					  scan);
		*is_new_query = true;
	}
	cursor_set_str(holder, "next_url",
				   sync_json_bool(body, "done", true) ? NULL : sync_json_string(body, "nextRecordsUrl"));
	return body;
}

static char *
sf_keyset_where(const char *ts, const char *id)
{
	return psprintf("(SystemModstamp > %s OR (SystemModstamp = %s AND Id > %s))", ts, ts, sf_soql_string(id));
}

static double
sf_deleted_interval(SyncSource *source, SyncCollection *c)
{
	return sync_json_number(c->options, "deleted_interval",
							sync_json_number(source->options, "deleted_interval", SF_DEFAULT_DELETED_INTERVAL_S));
}

/*
 * The backfill is over: changes made while it ran are re-read by the first
 * poll (from started - overlap).
 */
static void
sf_backfill_finish(SyncSource *source, SyncCollection *c, SyncPage *page, json_t *cursor, double started)
{
	page->backfill_done = true;
	page->more = true;
	page->phase = "incremental";
	json_object_set_new(cursor, "mode", json_string("incremental"));
	json_object_set_new(cursor, "safe_from",
						json_real(started - sync_json_int(source->options, "overlap", SF_DEFAULT_OVERLAP_S)));
	json_object_del(cursor, "started");
	if (!json_object_get(cursor, "deleted_until"))
		json_object_set_new(cursor, "deleted_until", json_real(started));
	/*
	 * The first delete check comes at a random point of an interval starting
	 * when the delete log can first be read (a minute after deleted_until), so
	 * that collections backfilled together do not all check in the same cycle.
	 */
	{
		double		interval = sf_deleted_interval(source, c);
		double		earliest = Max((double) time(NULL), sync_json_number(cursor, "deleted_until", 0) + 60);

		json_object_set_new(cursor, "deleted_at",
							json_real(earliest - interval +
									  interval * ((double) random() / (double) PG_INT32_MAX)));
	}
}

static void
sf_backfill_step(SyncSource *source, SyncCollection *c, SyncPage *page, json_t *cursor)
{
	const char *ts;
	const char *id;
	char	   *soql;
	SyncHttpResponse resp = {0};
	json_t	   *body;
	bool		is_new;
	double		started;
	SfScan		scan;

	/* A Bulk API 2.0 query job in progress (see salesforce_bulk.c). */
	if (json_is_object(json_object_get(cursor, "bulk")))
	{
		double		bulk_started = -1;

		switch (sync_sf_bulk_step(source, c, page, cursor, &bulk_started))
		{
			case SYNC_SF_BULK_MORE:
				page->phase = "backfill";
				page->more = true;
				return;
			case SYNC_SF_BULK_DONE:
				json_object_del(cursor, "bulk");
				json_object_del(cursor, "ts");
				json_object_del(cursor, "id");
				json_object_del(cursor, "next_url");
				sf_backfill_finish(source, c, page, cursor, bulk_started);
				return;
			case SYNC_SF_BULK_FALLBACK:
				/* the REST query starts over (records already applied are upserted again) */
				json_object_del(cursor, "bulk");
				json_object_del(cursor, "ts");
				json_object_del(cursor, "id");
				json_object_del(cursor, "next_url");
				json_object_del(cursor, "started");
				json_object_set_new(cursor, "bulk_declined", json_true());
				page->backfill_restart = true;
				break;
		}
	}

	ts = sync_json_string(cursor, "ts");
	id = sync_json_string(cursor, "id");
	soql = psprintf("SELECT %s FROM %s%s%s ORDER BY SystemModstamp, Id",
					sf_field_list(c, false), c->name,
					ts && id ? " WHERE " : "", ts && id ? sf_keyset_where(ts, id) : "");
	started = sync_json_number(cursor, "started", -1);

	scan.fields = c->fields;
	scan.batch = NULL;
	body = sf_query_page(source, c, page, cursor, "query", soql, &resp, &is_new, &scan);
	if (started < 0)
	{
		started = sync_http_server_time(&resp);
		json_object_set_new(cursor, "started", json_real(started));
	}
	if (is_new && ts == NULL)
		page->total = sync_json_int(body, "totalSize", -1);
	PG_TRY();
	{
		if (scan.batch)
			sf_take_batch(c, scan.batch, page, cursor, started);
		else
			sf_take_records(json_object_get(body, "records"), page, cursor, started);
	}
	PG_FINALLY();
	{
		json_decref(body);
	}
	PG_END_TRY();

	page->activity = "backfilling";
	if (sync_json_string(cursor, "next_url"))
	{
		page->more = true;
		page->phase = "backfill";
		/*
		 * A large object: the first page told its size; the rest comes from a
		 * Bulk API 2.0 query job, in a few large CSV chunks instead of a page
		 * of 2,000 records per request. This page's records stay applied.
		 */
		if (is_new && ts == NULL && page->total >= 0 && !sync_json_bool(cursor, "bulk_declined", false) &&
			sync_sf_bulk_wanted(source, c, page->total))
		{
			ereport(LOG,
					(errmsg("backfill of collection \"%s\" (%lld records) continues with a Bulk API 2.0 query job",
							c->name, (long long) page->total)));
			json_object_set_new(cursor, "bulk", json_object());
			/* deletes of records this page applied are read from the delete log from here on */
			if (!json_object_get(cursor, "deleted_until"))
				json_object_set_new(cursor, "deleted_until", json_real(started));
			json_object_del(cursor, "next_url");
			json_object_del(cursor, "ts");
			json_object_del(cursor, "id");
			json_object_del(cursor, "started");
		}
		else
			sf_prefetch(source, page, sync_json_string(cursor, "next_url"), sf_batch_size(source));
		return;
	}
	json_object_del(cursor, "bulk_declined");
	sf_backfill_finish(source, c, page, cursor, started);
}

static void
sf_poll_step(SyncSource *source, SyncCollection *c, SyncPage *page, json_t *cursor)
{
	const char *ts = sync_json_string(cursor, "ts");
	const char *id = sync_json_string(cursor, "id");
	double		safe_from = sync_json_number(cursor, "safe_from", -1);
	double		ts_epoch = sync_parse_iso8601(ts);
	char	   *where;
	char	   *soql;
	SyncHttpResponse resp = {0};
	json_t	   *body;
	bool		is_new;

	if (safe_from >= 0 && (ts == NULL || ts_epoch >= safe_from))
		where = psprintf("SystemModstamp >= %s", sf_soql_datetime(safe_from));
	else if (ts && id)
		where = sf_keyset_where(ts, id);
	else
		where = NULL;
	soql = psprintf("SELECT %s FROM %s%s%s ORDER BY SystemModstamp, Id",
					sf_field_list(c, true), c->name, where ? " WHERE " : "", where ? where : "");

	body = sf_query_page(source, c, page, cursor, "queryAll", soql, &resp, &is_new, NULL);
	if (is_new && !json_object_get(cursor, "started"))
		json_object_set_new(cursor, "started", json_real(sync_http_server_time(&resp)));
	PG_TRY();
	{
		sf_take_records(json_object_get(body, "records"), page, cursor, -1);
	}
	PG_FINALLY();
	{
		json_decref(body);
	}
	PG_END_TRY();

	page->phase = "incremental";
	page->activity = "polling for changes";
	if (sync_json_string(cursor, "next_url"))
	{
		page->more = true;
		return;
	}
	json_object_set_new(cursor, "safe_from",
						json_real(sync_json_number(cursor, "started", (double) time(NULL)) -
								  sync_json_int(source->options, "overlap", SF_DEFAULT_OVERLAP_S)));
	json_object_del(cursor, "started");
	page->caught_up = true;
	/* A sweep in progress alternates with polls, so changes keep arriving meanwhile. */
	if (json_object_get(cursor, "sweep"))
	{
		json_object_set_new(cursor, "sweep_turn", json_true());
		page->more = true;
	}
}

/* getDeleted's start and end: ISO 8601 with an explicit offset, URL-encoded ('+'). */
static char *
sf_iso_param(double epoch)
{
	return sync_http_urlencode(sync_format_utc(epoch, "%Y-%m-%dT%H:%M:%S+00:00"));
}

/*
 * Ask for a delete sweep: every id is listed and rows whose record is gone are
 * deleted. Needed when the delete log cannot cover the time since the last check.
 */
static void
sf_start_sweep(SyncCollection *c, json_t *cursor, const char *why)
{
	if (json_object_get(cursor, "sweep"))
		return;
	ereport(LOG,
			(errmsg("collection \"%s\" needs a delete sweep: %s", c->name, why)));
	json_object_set_new(cursor, "sweep", json_object());
}

/* getDeleted; NULL when Salesforce says the start lies before its purged log. */
static json_t *
sf_get_deleted(SyncSource *source, SyncCollection *c, SyncPage *page, double start, double end,
			   SyncHttpResponse *resp)
{
	MemoryContext ctx = CurrentMemoryContext;
	json_t	   *volatile body = NULL;

	PG_TRY();
	{
		body = sf_get(source, page,
					  psprintf("/services/data/v%s/sobjects/%s/deleted/?start=%s&end=%s", sync_sf_api_version(source),
							   c->name, sf_iso_param(start), sf_iso_param(end)),
					  "getDeleted", 0, resp, NULL);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(ctx);
		edata = CopyErrorData();
		if (resp->status != 400 || edata->message == NULL ||
			strstr(edata->message, "INVALID_REPLICATION_DATE") == NULL)
			PG_RE_THROW();
		FlushErrorState();
		body = NULL;
	}
	PG_END_TRY();
	return body;
}

/* One page of a delete sweep: SELECT Id ... ORDER BY Id, every id listed. */
static void
sf_sweep_step(SyncSource *source, SyncCollection *c, SyncPage *page, json_t *cursor)
{
	json_t	   *sweep = json_object_get(cursor, "sweep");
	SyncHttpResponse resp = {0};
	json_t	   *body;
	json_t	   *records;
	json_t	   *r;
	size_t		i;
	bool		is_new;

	body = sf_query_page(source, c, page, sweep, "query",
						 psprintf("SELECT Id FROM %s ORDER BY Id", c->name), &resp, &is_new, NULL);
	page->sweep_begin = is_new;
	page->sweep_ids = json_array();
	records = json_object_get(body, "records");
	json_array_foreach(records, i, r)
	{
		const char *id = sync_json_string(r, "Id");

		if (id)
			json_array_append_new(page->sweep_ids, json_string(id));
	}
	json_decref(body);
	page->phase = "incremental";
	page->activity = "sweeping ids for deletes";
	page->more = true;
	if (sync_json_string(sweep, "next_url") == NULL)
	{
		page->sweep_end = true;
		json_object_del(cursor, "sweep");
	}
	else
		json_object_set_new(cursor, "sweep_turn", json_false());
}

/* Deletes the recycle bin no longer shows (hard deletes, emptied bin) from the delete log. */
static void
sf_deleted_step(SyncSource *source, SyncCollection *c, SyncPage *page, json_t *cursor)
{
	double		start = sync_json_number(cursor, "deleted_until", 0);
	double		now = (double) time(NULL);
	SyncHttpResponse resp = {0};
	json_t	   *body;
	json_t	   *list;
	json_t	   *r;
	size_t		i;
	volatile double covered = -1;
	double		earliest;

	if (start < now - SF_DELETED_RETENTION_S + 3600)
	{
		sf_start_sweep(c, cursor, "the delete log keeps 15 days only");
		start = now - SF_DELETED_RETENTION_S + 3600;
	}
	body = sf_get_deleted(source, c, page, start, now, &resp);
	if (body == NULL)
	{
		/* The log was purged past our checkpoint: only a sweep finds those deletes. */
		sf_start_sweep(c, cursor, "the delete log was purged");
		json_object_set_new(cursor, "deleted_until", json_real(now - 60));
		json_object_set_new(cursor, "deleted_at", json_real(now));
		page->phase = "incremental";
		page->activity = "delete log purged: sweeping ids";
		page->more = true;
		return;
	}
	PG_TRY();
	{
		list = json_object_get(body, "deletedRecords");
		if (!json_is_array(list))
			ereport(ERROR,
					(errcode(ERRCODE_DATA_EXCEPTION),
					 errmsg("Salesforce getDeleted response has no deletedRecords array")));
		json_array_foreach(list, i, r)
		{
			const char *id = sync_json_string(r, "id");
			const char *at = sync_json_string(r, "deletedDate");

			if (id)
				json_array_append_new(page->deletions,
									  json_pack("{s:s, s:s?}", "id", id, "at", at));
		}
		covered = sync_parse_iso8601(sync_json_string(body, "latestDateCovered"));
		earliest = sync_parse_iso8601(sync_json_string(body, "earliestDateAvailable"));
		if (earliest > start)
			sf_start_sweep(c, cursor, "the delete log starts after the last check");
	}
	PG_FINALLY();
	{
		json_decref(body);
	}
	PG_END_TRY();
	if (covered > start)
		json_object_set_new(cursor, "deleted_until", json_real(covered));
	json_object_set_new(cursor, "deleted_at", json_real(now));
	page->phase = "incremental";
	page->activity = "checking for deletes";
	page->more = true;			/* the poll is next */
}

static void
sf_step(SyncSource *source, SyncCollection *c, SyncPage *page)
{
	json_t	   *cursor = json_is_object(c->cursor) ? json_deep_copy(c->cursor) : json_object();
	const char *mode = sync_json_string(cursor, "mode");
	double		interval = sf_deleted_interval(source, c);

	page->records = json_array();
	page->deletions = json_array();
	page->cursor = cursor;
	if (c->reconcile_requested && mode && strcmp(mode, "incremental") == 0)
		sf_start_sweep(c, cursor, "sync.reconcile() was called");
	if (mode == NULL || strcmp(mode, "backfill") == 0)
	{
		json_object_set_new(cursor, "mode", json_string("backfill"));
		sf_backfill_step(source, c, page, cursor);
	}
	else if (sync_json_string(cursor, "next_url") == NULL &&
			 json_object_get(cursor, "sweep") && sync_json_bool(cursor, "sweep_turn", true))
		sf_sweep_step(source, c, page, cursor);
	else if (sync_json_string(cursor, "next_url") == NULL &&
			 (double) time(NULL) - sync_json_number(cursor, "deleted_at", 0) >= interval &&
			 (double) time(NULL) - sync_json_number(cursor, "deleted_until", 0) >= 60)
		sf_deleted_step(source, c, page, cursor);
	else
		sf_poll_step(source, c, page, cursor);
}

/* ---------- limits ---------- */

/*
 * The org's daily allocation, spread over the day, is Salesforce's only rate
 * limit. Until Sforce-Limit-Info has told it, assume the smallest production
 * allocation.
 */
static void
sf_limits(SyncSource *source, const SyncQuota *seen, SyncLimits *limits)
{
	double		daily = seen->daily_limit > 0 ? seen->daily_limit : SF_ASSUMED_DAILY_ALLOCATION;

	limits->daily_limit = daily;
	limits->rate = daily / 86400.0;
	limits->basis = seen->daily_limit > 0 ?
		psprintf("the org's %.0f API requests a day", daily) :
		psprintf("%.0f API requests a day (assumed until Salesforce reports the org's allocation)", daily);
}

/* Sforce-Limit-Info: api-usage=10018/100000 */
static bool
sf_observe_quota(SyncHttpResponse *resp, SyncQuota *seen)
{
	char	   *info = sync_http_header(resp, "Sforce-Limit-Info");
	char	   *usage = info ? strstr(info, "api-usage=") : NULL;
	double		used;
	double		max;

	if (usage == NULL || sscanf(usage, "api-usage=%lf/%lf", &used, &max) != 2 ||
		!(max > 0 && max <= 1e10 && used >= 0 && used <= 1e10))
		return false;			/* also "inf" and "nan", which %lf reads */
	seen->daily_limit = max;
	seen->daily_remaining = Max(max - used, 0);
	return true;
}

/* Over its allocation Salesforce answers 403 REQUEST_LIMIT_EXCEEDED, without Retry-After. */
static double
sf_rate_limit_wait(SyncHttpResponse *resp, const char **reason)
{
	if (resp->status != 403 || resp->body == NULL || strstr(resp->body, "REQUEST_LIMIT_EXCEEDED") == NULL)
		return 0;
	if (strstr(resp->body, "ConcurrentRequests"))
	{
		*reason = "Salesforce's limit of concurrent long requests";
		return 10;
	}
	*reason = "the org's daily API allocation is spent";
	return 300;
}

const SyncProvider sync_salesforce_provider = {
	.kind = "salesforce",
	.required_credentials = sf_required_credentials,
	.default_quota_fraction = 0.3,
	.limits = sf_limits,
	.observe_quota = sf_observe_quota,
	.rate_limit_wait = sf_rate_limit_wait,
	.validate_source = sf_validate_source,
	.describe = sf_describe,
	.refresh_token = sf_refresh_token,
	.step = sf_step,
};
