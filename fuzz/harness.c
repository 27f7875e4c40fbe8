/*
 * harness.c: runs a provider's describe() and step() over responses carved
 * out of a fuzz input (see harness.h for the input format), standing in for
 * request.c (sync_api_request), token.c (sync_refresh_token) and catalog.c
 * (saving tokens, loading cursors) the way they behave in a sync worker.
 *
 * Besides crashes and sanitizer reports, these invariants are checked; a
 * violation aborts with "fuzz invariant <name>". FUZZ_SKIP_CHECKS (a list of
 * names) turns some off while the bug behind them is being fixed.
 *
 *   page     a step's page has records and deletions arrays of objects, a
 *            cursor object, sweep ids that are strings, a known phase
 *   json     what the store receives (sync_json_dump) loads, and dumps the same again
 *   reload   a saved cursor or token reads back (through jsonb) as JSON jansson loads
 *   describe fields have every attribute; column names are unique, valid
 *            UTF-8, at most 63 bytes, not _synced_at; a canonical name is returned
 *   host     requests go only to the source's own hosts (base_url, login_url,
 *            token_url, the token's instance_url): never where a response points
 *   header   request header values hold no CR or LF
 *   secret   no error, log message or URL holds one of the source's
 *            credentials (they all contain "CANARY") unless the input holds
 *            it as such (then it may be data), nor "CANARY" at all unless
 *            the input does; no error body holds one after request.c scrubbed it
 *   error    an error raised to the worker is an ERROR with a message
 *   limits   what the provider reads from usage headers, and the limits it
 *            derives, are finite and positive (ratelimit.c divides by them
 *            and casts the results to integers)
 *
 * Record mode (used by make_seeds.py): FUZZ_RECORD_OUT=<file> with
 * FUZZ_RECORD_BASE=<fake's URL> and FUZZ_RECORD_HEADER=<two bytes as hex>
 * runs one input's scenario against a live fake and writes the responses it
 * got as a fuzz input; see record_main().
 */
#include "harness.h"

#include <curl/curl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "mb/pg_wchar.h"
#include "pgshim.h"
#include "utils/timestamp.h"

#define SEPARATOR "\n--\n"
#define SEPARATOR_LEN 4
#define MAX_RESPONSES 64
#define MAX_RECORD_BYTES (48 * 1024)

typedef struct Response
{
	const char *data;
	size_t		len;
} Response;

static const FuzzTarget *target;
static Response responses[MAX_RESPONSES];
static int	nresponses;
static int	next_response;
static char *last_body;			/* malloc'd: freed by the next request */
static double clock_now = FUZZ_NOW;
static bool input_has_canary;
static const uint8_t *input_data;
static size_t input_size;
static const char *skip_checks = "";

/* record mode */
static bool recording;
static const char *record_base;
static StringInfoData record_buf;	/* in the top arena: the input being written */
static int	record_count;
static bool recording_ended;

time_t
fuzz_time(time_t *t)
{
	time_t		now = (time_t) clock_now;

	if (t)
		*t = now;
	return now;
}

/* ---------- invariants ---------- */

static void fail(const char *check, const char *fmt,...) pg_attribute_printf(2, 3);

static void
fail(const char *check, const char *fmt,...)
{
	va_list		args;

	if (strstr(skip_checks, check))
		return;
	fprintf(stderr, "\n==== fuzz invariant \"%s\" violated: ", check);
	va_start(args, fmt);
	vfprintf(stderr, fmt, args);
	va_end(args);
	fprintf(stderr, "\n");
	abort();
}

/* the source's credentials as the scenario set them (all hold "CANARY") */
static char *secrets[8];
static int	nsecrets;

static void
check_secret(const char *what, const char *text)
{
	if (text == NULL)
		return;
	/* a credential the input itself holds may come back as data (an echoed id) */
	for (int i = 0; i < nsecrets; i++)
		if (strstr(text, secrets[i]) && !memmem(input_data, input_size, secrets[i], strlen(secrets[i])))
			fail("secret", "the credential %s appears in %s: %s", secrets[i], what, text);
	if (!input_has_canary && strstr(text, "CANARY"))
		fail("secret", "a credential appears in %s: %s", what, text);
}

/*
 * request.c cuts the source's credentials and tokens out of error bodies
 * before providers quote them: those the scenario set (a rotated one is the
 * input's own choice) must be gone.
 */
static void
check_error_body(SyncSource *source, SyncHttpResponse *resp)
{
	const char *key;
	json_t	   *value;

	if (resp->status >= 200 && resp->status < 300)
		return;
	json_object_foreach(source->credentials, key, value)
	{
		const char *secret = json_string_value(value);

		if (secret && strstr(secret, "CANARY") && memmem(resp->body, resp->body_len, secret, strlen(secret)))
			fail("secret", "the credential %s is still in an error body after scrubbing", secret);
	}
}

static void
check_log(ErrorData *edata)
{
	check_secret("a log message", edata->message);
	check_secret("a log detail", edata->detail);
}

static void
remember_secrets(SyncSource *source)
{
	const char *key;
	json_t	   *value;

	nsecrets = 0;
	json_object_foreach(source->credentials, key, value)
		if (json_is_string(value) && strlen(json_string_value(value)) >= 6 && nsecrets < lengthof(secrets))
		secrets[nsecrets++] = pstrdup(json_string_value(value));
}

static bool
utf8_valid(const char *s)
{
	const unsigned char *p = (const unsigned char *) s;

	while (*p)
	{
		int			n;

		if (*p < 0x80)
			n = 1;
		else if ((*p & 0xe0) == 0xc0 && *p >= 0xc2)
			n = 2;
		else if ((*p & 0xf0) == 0xe0)
			n = 3;
		else if ((*p & 0xf8) == 0xf0 && *p <= 0xf4)
			n = 4;
		else
			return false;
		for (int i = 1; i < n; i++)
			if ((p[i] & 0xc0) != 0x80)
				return false;
		p += n;
	}
	return true;
}

/*
 * What a saved cursor or token looks like when the worker loads it again: the
 * store casts the dump to jsonb (numeric), and jsonb prints a number without
 * an exponent, so 1e+19 comes back as 10000000000000000000, an integer
 * jansson cannot hold.
 */
static void
check_jsonb_numbers(const char *what, json_t *value)
{
	const char *key;
	json_t	   *item;
	size_t		i;

	switch (json_typeof(value))
	{
		case JSON_OBJECT:
			json_object_foreach(value, key, item)
				check_jsonb_numbers(what, item);
			break;
		case JSON_ARRAY:
			json_array_foreach(value, i, item)
				check_jsonb_numbers(what, item);
			break;
		case JSON_REAL:
			if (fabs(json_real_value(value)) >= 9223372036854775807.0)
				fail("reload", "%s holds %g: jsonb prints it as an integer jansson cannot load", what,
					 json_real_value(value));
			break;
		default:
			break;
	}
}

/*
 * Dump a value as the store does, and read it back: the text must load, and
 * dumping what loaded must give the same text (numbers keep their value;
 * NUL characters, which text cannot hold, are dropped the first time).
 * Returns the reloaded copy.
 */
static json_t *
round_trip(const char *what, json_t *value, bool saved)
{
	char	   *text = sync_json_dump(value);
	json_error_t err;
	json_t	   *back = json_loads(text, JSON_ALLOW_NUL, &err);

	if (back == NULL)
		fail(saved ? "reload" : "json", "%s dumps as JSON that does not load: %s (%s)", what, err.text, text);
	else
	{
		char	   *again = sync_json_dump(back);

		if (strcmp(text, again) != 0)
			fail("json", "%s changes when dumped and loaded: %s became %s", what, text, again);
		pfree(again);
		if (saved)
			check_jsonb_numbers(what, back);
	}
	pfree(text);
	return back;
}

/* Every value the store would read: text Postgres accepts (valid UTF-8, no NUL). */
static void
check_batch(SyncCollection *c, SyncBatch *b)
{
	if (b->fields != c->fields || b->nfields != list_length(c->fields))
		fail("batch", "the batch is for other fields than the collection's");
	for (int f = 0; f < b->nfields; f++)
		for (int i = 0; i < b->nrecords; i++)
		{
			text	   *t;

			if (b->nulls[f][i])
				continue;
			t = (text *) DatumGetPointer(b->values[f][i]);
			if (memchr(VARDATA_ANY(t), '\0', VARSIZE_ANY_EXHDR(t)))
				fail("batch", "value %d of record %d holds a NUL byte", f, i);
			if (pg_encoding_verifymbstr(PG_UTF8, VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t)) != VARSIZE_ANY_EXHDR(t))
				fail("batch", "value %d of record %d is not valid UTF-8", f, i);
		}
}

static void
check_page(SyncCollection *c, SyncPage *page)
{
	json_t	   *item;
	size_t		i;

	if (!json_is_array(page->records))
		fail("page", "records is not an array");
	if (!json_is_array(page->deletions))
		fail("page", "deletions is not an array");
	if (!json_is_object(page->cursor))
		fail("page", "the cursor is not an object");
	if (page->phase && strcmp(page->phase, "backfill") != 0 && strcmp(page->phase, "incremental") != 0)
		fail("page", "unknown phase \"%s\"", page->phase);
	json_array_foreach(page->records, i, item)
		if (!json_is_object(item))
		fail("page", "record %zu is not an object", i);
	json_array_foreach(page->deletions, i, item)
		if (!json_is_object(item))
		fail("page", "deletion %zu is not an object", i);
	if (page->sweep_ids)
	{
		if (!json_is_array(page->sweep_ids))
			fail("page", "sweep_ids is not an array");
		json_array_foreach(page->sweep_ids, i, item)
			if (!json_is_string(item))
			fail("page", "sweep id %zu is not a string", i);
	}
	json_decref(round_trip("the page's records", page->records, false));
	check_batch(c, page->batch ? page->batch : sync_batch_from_json(page->records, c->fields));
	json_decref(round_trip("the page's deletions", page->deletions, false));
	if (page->sweep_ids)
		json_decref(round_trip("the page's sweep ids", page->sweep_ids, false));
	check_secret("the page's activity", page->activity);
}

static void
check_describe(List *fields, const char *canonical)
{
	ListCell   *lc;
	List	   *seen = NIL;

	if (canonical == NULL)
		fail("describe", "no canonical collection name");
	foreach(lc, fields)
	{
		SyncField  *f = lfirst(lc);
		ListCell   *lc2;

		if (f == NULL || f->api_field == NULL || f->api_type == NULL || f->column_name == NULL ||
			f->column_type == NULL || f->wire_type == NULL)
			fail("describe", "a field lacks a name or type");
		if (f->column_name[0] == '\0' || strlen(f->column_name) >= NAMEDATALEN)
			fail("describe", "column name \"%s\" is empty or longer than %d bytes", f->column_name,
				 NAMEDATALEN - 1);
		if (!utf8_valid(f->column_name))
			fail("describe", "column name \"%s\" is not valid UTF-8", f->column_name);
		if (strcmp(f->column_name, "_synced_at") == 0)
			fail("describe", "a field's column is named _synced_at");
		foreach(lc2, seen)
			if (strcmp(lfirst(lc2), f->column_name) == 0)
			fail("describe", "two fields have the column name \"%s\"", f->column_name);
		seen = lappend(seen, f->column_name);
		if (f->convert_sql && f->convert_sql[0] && strstr(f->convert_sql, "%s") == NULL)
			fail("describe", "convert_sql of \"%s\" has no placeholder", f->api_field);
	}
}

static char *
host_of(const char *url)
{
	CURLU	   *u = curl_url();
	char	   *host = NULL;
	char	   *port = NULL;
	char	   *result = NULL;

	if (u && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
		curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK)
	{
		curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT);
		result = psprintf("%s:%s", host, port ? port : "");
	}
	if (host)
		curl_free(host);
	if (port)
		curl_free(port);
	if (u)
		curl_url_cleanup(u);
	return result;
}

static void
check_request(SyncSource *source, const char *method, const char *url,
			  const SyncHttpHeader *headers, int nheaders)
{
	char	   *host = host_of(url);
	const char *allowed[4];
	bool		ok = false;

	allowed[0] = source->base_url;
	allowed[1] = sync_json_string(source->options, "login_url");
	allowed[2] = sync_json_string(source->options, "token_url");
	allowed[3] = sync_json_string(source->token, "instance_url");
	if (host)
	{
		for (int i = 0; i < 4 && !ok; i++)
		{
			char	   *h = allowed[i] ? host_of(allowed[i]) : NULL;

			ok = h && strcmp(h, host) == 0;
		}
		if (!ok)
			fail("host", "%s request to host %s, not one of the source's hosts (%s)", method, host,
				 url);
	}
	for (int i = 0; i < nheaders; i++)
		if (headers[i].value && strpbrk(headers[i].value, "\r\n"))
			fail("header", "header %s has a line break in its value", headers[i].name);
	check_secret("a request URL", url);
}

/* ---------- responses ---------- */

static void
split_input(const uint8_t *data, size_t size)
{
	const char *p = (const char *) data;
	const char *end = p + size;

	nresponses = 0;
	while (nresponses < MAX_RESPONSES)
	{
		const char *sep = memmem(p, end - p, SEPARATOR, SEPARATOR_LEN);

		responses[nresponses].data = p;
		responses[nresponses].len = (sep ? sep : end) - p;
		nresponses++;
		if (sep == NULL)
			break;
		p = sep + SEPARATOR_LEN;
	}
	/* "...body" with nothing at all is no response */
	if (nresponses == 1 && responses[0].len == 0)
		nresponses = 0;
}

/* Fill resp from one response of the input: optional status line and headers, then the body. */
static void
parse_response(const Response *r, SyncHttpResponse *resp, const char **body, size_t *body_len)
{
	const char *p = r->data;
	const char *end = p + r->len;

	resp->status = 200;
	*body = p;
	*body_len = r->len;
	if (r->len >= 5 && memcmp(p, "HTTP/", 5) == 0)
	{
		const char *eol = memchr(p, '\n', end - p);
		const char *q = p + 5;
		const char *headers_start;
		const char *headers_end = NULL;

		while (q < end && *q != ' ' && *q != '\n')
			q++;
		resp->status = 0;
		while (q < end && *q == ' ')
			q++;
		for (int i = 0; i < 3 && q < end && *q >= '0' && *q <= '9'; i++, q++)
			resp->status = resp->status * 10 + (*q - '0');
		if (eol == NULL)
		{
			*body = end;
			*body_len = 0;
			return;
		}
		headers_start = eol + 1;
		for (const char *line = headers_start; line < end;)
		{
			const char *nl = memchr(line, '\n', end - line);
			size_t		len = (nl ? nl : end) - line;

			if (len == 0 || (len == 1 && line[0] == '\r'))
			{
				headers_end = line;
				*body = nl ? nl + 1 : end;
				break;
			}
			if (nl == NULL)
			{
				headers_end = end;
				*body = end;
				break;
			}
			line = nl + 1;
		}
		if (headers_end == NULL)
		{
			headers_end = end;
			*body = end;
		}
		*body_len = end - *body;
		if (headers_end > headers_start)
			resp->headers = pnstrdup(headers_start, headers_end - headers_start);
	}
}

/* ---------- record mode: a real request to a fake ---------- */

typedef struct Buffer
{
	char	   *data;
	size_t		len;
} Buffer;

static size_t
buffer_write(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	Buffer	   *b = userdata;
	size_t		n = size * nmemb;

	b->data = realloc(b->data, b->len + n + 1);
	memcpy(b->data + b->len, ptr, n);
	b->len += n;
	b->data[b->len] = '\0';
	return n;
}

static long
http_call(const char *method, const char *url, const SyncHttpHeader *headers, int nheaders,
		  const char *body, const char *content_type, Buffer *out_body, Buffer *out_headers)
{
	CURL	   *easy = curl_easy_init();
	struct curl_slist *list = NULL;
	long		status = 0;
	CURLcode	rc;

	for (int i = 0; i < nheaders; i++)
		list = curl_slist_append(list, psprintf("%s: %s", headers[i].name, headers[i].value));
	if (content_type)
		list = curl_slist_append(list, psprintf("Content-Type: %s", content_type));
	list = curl_slist_append(list, "Accept: application/json");
	list = curl_slist_append(list, "Expect:");
	curl_easy_setopt(easy, CURLOPT_URL, url);
	curl_easy_setopt(easy, CURLOPT_HTTPHEADER, list);
	curl_easy_setopt(easy, CURLOPT_ACCEPT_ENCODING, "");
	curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, 30000L);
	curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, buffer_write);
	curl_easy_setopt(easy, CURLOPT_WRITEDATA, out_body);
	if (out_headers)
	{
		curl_easy_setopt(easy, CURLOPT_HEADERFUNCTION, buffer_write);
		curl_easy_setopt(easy, CURLOPT_HEADERDATA, out_headers);
	}
	if (strcmp(method, "GET") != 0)
		curl_easy_setopt(easy, CURLOPT_CUSTOMREQUEST, method);
	if (body)
	{
		curl_easy_setopt(easy, CURLOPT_POSTFIELDS, body);
		curl_easy_setopt(easy, CURLOPT_POSTFIELDSIZE, (long) strlen(body));
	}
	rc = curl_easy_perform(easy);
	if (rc != CURLE_OK)
		fprintf(stderr, "record: %s %s failed: %s\n", method, url, curl_easy_strerror(rc));
	else
		curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
	curl_slist_free_all(list);
	curl_easy_cleanup(easy);
	return status;
}

/* Keep only the headers providers read, so seeds stay small. */
static bool
interesting_header(const char *line, size_t len)
{
	static const char *const names[] = {
		"date:", "retry-after:", "sforce-limit-info:", "x-hubspot-ratelimit-",
	};

	for (size_t i = 0; i < lengthof(names); i++)
		if (len >= strlen(names[i]) && pg_strncasecmp(line, names[i], strlen(names[i])) == 0)
			return true;
	return false;
}

/*
 * A big page is cut so that seeds stay small while the paging fields stay
 * real: lists of typed things (describe's fields, properties, events) keep
 * the first of each type and the key and stamp fields; other lists (records)
 * keep their first three elements and the last one (it sets cursors).
 */
static bool
important_name(const char *name)
{
	static const char *const names[] = {
		"Id", "SystemModstamp", "IsDeleted", "lastmodifieddate", "hs_lastmodifieddate", "hs_object_id",
		"hs_merged_object_ids", "email", "Email",
	};

	for (size_t i = 0; name && i < lengthof(names); i++)
		if (strcmp(name, names[i]) == 0)
			return true;
	return false;
}

static void
trim_list(json_t *a)
{
	size_t		n = json_array_size(a);
	bool		typed = n > 0 && json_is_string(json_object_get(json_array_get(a, 0), "type"));
	json_t	   *kept = json_array();
	json_t	   *types = json_object();
	json_t	   *item;
	size_t		i;

	json_array_foreach(a, i, item)
	{
		const char *type = sync_json_string(item, "type");
		bool		keep;

		if (typed)
			keep = (type && !json_object_get(types, type)) ||
				important_name(sync_json_string(item, "name")) || i == n - 1;
		else
			keep = i < 3 || i == n - 1;
		if (type)
			json_object_set_new(types, type, json_true());
		if (json_is_object(item))
		{
			/* tables hold their own field lists */
			json_t	   *nested = json_object_get(item, "fields");

			if (json_is_array(nested))
				trim_list(nested);
		}
		if (keep)
			json_array_append(kept, item);
	}
	json_array_clear(a);
	json_array_extend(a, kept);
	json_decref(kept);
	json_decref(types);
}

static char *
trim_body(const char *body, size_t len, size_t *out_len)
{
	static const char *const arrays[] = {"records", "data", "results", "deletedRecords", "fields", "tables"};
	json_t	   *doc;
	char	   *text;
	char	   *copy;

	*out_len = len;
	if (len <= MAX_RECORD_BYTES || (doc = json_loadb(body, len, 0, NULL)) == NULL)
		return pnstrdup(body, len);
	for (size_t i = 0; i < lengthof(arrays); i++)
	{
		json_t	   *a = json_object_get(doc, arrays[i]);

		if (json_is_array(a))
			trim_list(a);
	}
	text = json_dumps(doc, JSON_COMPACT);
	json_decref(doc);
	copy = pstrdup(text);
	free(text);
	*out_len = strlen(copy);
	return copy;
}

static void
record_request(const char *method, const char *url, const SyncHttpHeader *headers, int nheaders,
			   const char *body, const char *content_type, SyncHttpResponse *resp,
			   const char **resp_body, size_t *resp_len)
{
	Buffer		b = {0};
	Buffer		h = {0};
	StringInfoData kept;
	char	   *trimmed;
	size_t		trimmed_len;

	resp->status = http_call(method, url, headers, nheaders, body, content_type, &b, &h);
	if (resp->status == 0)
	{
		/* a failed transfer: the input ends here, as a replay's would */
		recording_ended = true;
		free(b.data);
		free(h.data);
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("request to \"%s\" failed while recording", sync_http_host_of(url))));
	}
	initStringInfo(&kept);
	for (const char *line = h.data; line && *line;)
	{
		const char *nl = strchr(line, '\n');
		size_t		len = nl ? (size_t) (nl - line) : strlen(line);

		if (len > 0 && line[len - 1] == '\r')
			len--;
		if (interesting_header(line, len))
		{
			appendBinaryStringInfo(&kept, line, len);
			appendStringInfoChar(&kept, '\n');
		}
		line = nl ? nl + 1 : NULL;
	}
	trimmed = trim_body(b.data ? b.data : "", b.len, &trimmed_len);
	if (memmem(trimmed, trimmed_len, SEPARATOR, SEPARATOR_LEN))
		fprintf(stderr, "record: a response holds the separator; the seed will split it\n");

	if (record_count++ > 0)
		appendStringInfoString(&record_buf, SEPARATOR);
	if (resp->status != 200 || kept.len > 0)
		appendStringInfo(&record_buf, "HTTP/1.1 %ld\n%s\n", resp->status, kept.data);
	appendBinaryStringInfo(&record_buf, trimmed, trimmed_len);
	resp->headers = kept.len ? pstrdup(kept.data) : NULL;
	*resp_body = trimmed;
	*resp_len = trimmed_len;
	free(b.data);
	free(h.data);
	fprintf(stderr, "record: %s %s -> %ld (%zu bytes)\n", method, url, resp->status, trimmed_len);
}

/*
 * Before each step of a recording: the fake's clock is set to the harness's,
 * then the admin calls listed for this step in FUZZ_RECORD_ADMIN (lines of
 * "<step> <METHOD> <path> [<JSON body>]") are made.
 */
static void
record_before_step(int step)
{
	const char *admin = getenv("FUZZ_RECORD_ADMIN");
	Buffer		b = {0};
	SyncHttpHeader none[1];

	http_call("POST", psprintf("%s/__admin/clock", record_base), none, 0,
			  psprintf("{\"now\": \"%s\"}", sync_format_utc(clock_now, "%Y-%m-%dT%H:%M:%SZ")),
			  "application/json", &b, NULL);
	free(b.data);
	for (const char *line = admin; line && *line;)
	{
		const char *nl = strchr(line, '\n');
		char	   *copy = pnstrdup(line, nl ? (size_t) (nl - line) : strlen(line));
		int			at;
		char		method[16];
		char		path[1024];
		int			n = 0;

		if (sscanf(copy, "%d %15s %1023s %n", &at, method, path, &n) >= 3 && at == step)
		{
			Buffer		out = {0};
			const char *body = (n > 0 && copy[n]) ? copy + n : NULL;
			long		status = http_call(method, psprintf("%s%s", record_base, path), none, 0, body,
										   body ? "application/json" : NULL, &out, NULL);

			fprintf(stderr, "record: admin %s %s -> %ld\n", method, path, status);
			free(out.data);
		}
		line = nl ? nl + 1 : NULL;
	}
}

/* ---------- what the worker's request.c, token.c and catalog.c do ---------- */

/* ratelimit.c's reading of Retry-After (a copy: ratelimit.c needs shared memory). */
static double
retry_after_seconds(SyncHttpResponse *resp)
{
	char	   *value = sync_http_header(resp, "Retry-After");
	char	   *end;
	double		seconds;

	if (value == NULL)
		return -1;
	seconds = strtod(value, &end);
	if (end == value || *end != '\0')
	{
		double		at = sync_parse_http_date(value);

		seconds = at > 0 ? at - (double) time(NULL) : -1;
	}
	pfree(value);
	if (seconds < 0)
		return -1;
	return Min(seconds, 86400.0);
}

/* The provider's view of a response's limits, as sync_budget_note_response() asks for it. */
static bool
note_response(SyncSource *source, SyncHttpResponse *resp)
{
	const SyncProvider *provider = source->provider;
	SyncQuota	seen;
	SyncLimits	limits;
	const char *reason = NULL;
	double		wait_s = 0;

	check_error_body(source, resp);
	memset(&seen, 0, sizeof(seen));
	seen.daily_remaining = -1;
	if (provider->observe_quota)
		provider->observe_quota(resp, &seen);
	if (provider->rate_limit_wait)
		wait_s = provider->rate_limit_wait(resp, &reason);
	if (wait_s > 0)
	{
		double		told = retry_after_seconds(resp);

		if (told >= 0)
			wait_s = Max(told, 0.5);
		if (!(wait_s > 0 && wait_s <= 86400.0 * 31))
			fail("page", "rate-limit wait of %g s", wait_s);
	}
	memset(&limits, 0, sizeof(limits));
	provider->limits(source, &seen, &limits);
	if (!isfinite(seen.daily_limit) || !isfinite(seen.daily_remaining) || !isfinite(seen.burst_limit) ||
		!isfinite(seen.burst_window_s))
		fail("limits", "usage headers read as daily %g, remaining %g, burst %g per %g s",
			 seen.daily_limit, seen.daily_remaining, seen.burst_limit, seen.burst_window_s);
	if (!isfinite(limits.rate) || !(limits.rate > 1e-6) || !isfinite(limits.search_rate) ||
		!isfinite(limits.daily_limit))
		fail("limits", "the API's limits read as rate %g, search rate %g, daily %g",
			 limits.rate, limits.search_rate, limits.daily_limit);
	check_secret("the limits' basis", limits.basis);
	return wait_s > 0;
}

/* ---------- what request.c needs from ratelimit.c, http.c and token.c ---------- */

bool		sync_is_worker = true;
static SyncSource *current_source;

bool
sync_budget_acquire(SyncSource *source, bool search)
{
	return true;
}

/* Waits (a Bulk API job's polls) pass on the harness's clock at once. */
struct Latch *MyLatch = NULL;
volatile sig_atomic_t InterruptPending = false;

void
ProcessInterrupts(void)
{
}

int
WaitLatch(Latch *latch, int wakeEvents, long timeout, uint32 wait_event_info)
{
	clock_now += timeout / 1000.0;
	return WL_TIMEOUT;
}

void
ResetLatch(Latch *latch)
{
}

bool
sync_worker_extension_dropped(void)
{
	return false;
}

bool
sync_budget_try_acquire(SyncSource *source, bool search)
{
	return true;
}

bool
sync_budget_note_response(SyncSource *source, SyncHttpResponse *resp, bool attributed)
{
	return note_response(source, resp);
}

void
sync_budget_note_transport_error(SyncSource *source)
{
}

TimestampTz
sync_budget_penalty_until(int32 source_id)
{
	return 0;
}

TimestampTz
GetCurrentTimestamp(void)
{
	return (TimestampTz) ((clock_now - ((double) POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY) *
						  USECS_PER_SEC);
}

/*
 * http.c's prefetch: checked like any request (it carries the same token),
 * never sent: the request that would adopt it is answered by the input.
 */
void
sync_http_prefetch(const char *url, const SyncHttpHeader *headers, int nheaders, bool verify_tls)
{
	char	   *why;

	if (sync_url_is_valid(url, &why))
		check_request(current_source, "GET", url, headers, nheaders);
}

bool
sync_http_prefetch_claim(const char *url, const SyncHttpHeader *headers, int nheaders, bool verify_tls)
{
	return false;
}

void
sync_http_pump(void)
{
}

/*
 * http.c: the transfer. The response is the input's next one (or, recording,
 * the fake's answer); a request with none left fails as a transfer would.
 */
void
sync_http_request(const char *method, const char *url, const SyncHttpHeader *headers, int nheaders,
				  const char *body, const char *content_type, bool verify_tls, SyncHttpResponse *resp)
{
	char	   *why;
	const char *resp_body;
	size_t		resp_len;

	memset(resp, 0, sizeof(*resp));
	if (!sync_url_is_valid(url, &why))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("refusing to request URL on host \"%s\": %s", sync_http_host_of(url), why)));
	check_request(current_source, method, url, headers, nheaders);
	if (current_source->provider->is_search)
		(void) current_source->provider->is_search(method, url);
	free(last_body);
	last_body = NULL;

	if (recording && recording_ended)
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("request to \"%s\" failed: the recording has ended", sync_http_host_of(url))));
	if (recording)
		record_request(method, url, headers, nheaders, body, content_type, resp, &resp_body, &resp_len);
	else
	{
		if (next_response >= nresponses)
			ereport(ERROR,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("request to \"%s\" failed: the fuzz input has no more responses",
							sync_http_host_of(url))));
		parse_response(&responses[next_response++], resp, &resp_body, &resp_len);
	}
	/* a malloc'd NUL-terminated body, valid until the next request */
	last_body = malloc(resp_len + 1);
	memcpy(last_body, resp_body, resp_len);
	last_body[resp_len] = '\0';
	resp->body = last_body;
	resp->body_len = resp_len;
	resp->date = sync_http_header(resp, "Date");
	if (fuzz_verbose)
		fprintf(stderr, "fuzz: %s %s -> %ld (%zu bytes)\n", method, url, resp->status, resp->body_len);
}

/* token.c in a worker: the provider refreshes, and saves the token itself. */
void
sync_refresh_token(SyncSource *source, SyncPage *page)
{
	if (source->provider->refresh_token)
		source->provider->refresh_token(source, page);
}

/* catalog.c: the token (and rotated credentials) are saved as jsonb and kept. */
void
sync_save_token(SyncSource *source, json_t *token, json_t *rotated_credentials)
{
	json_decref(round_trip("the saved token", token, true));
	if (rotated_credentials)
		json_decref(round_trip("the saved credentials", rotated_credentials, true));
	json_decref(source->token);
	source->token = json_incref(token);
	if (rotated_credentials)
	{
		json_decref(source->credentials);
		source->credentials = json_incref(rotated_credentials);
	}
}

/* webhook.c: the secret of a webhook the provider made (Airtable) is kept; here, checked only. */
void
sync_save_webhook_secret(SyncSource *source, const char *webhook_id, const char *secret)
{
	if (webhook_id == NULL || secret == NULL)
		fail("page", "a webhook secret saved without its id or value");
}

void
sync_save_refreshed_token(SyncSource *source, json_t *token, const char *new_refresh_token)
{
	json_t	   *volatile rotated = NULL;
	const char *current = sync_json_string(source->credentials, "refresh_token");

	if (token == NULL)
		fail("page", "a refreshed token is NULL");
	if (new_refresh_token && (current == NULL || strcmp(new_refresh_token, current) != 0))
	{
		rotated = json_deep_copy(source->credentials);
		json_object_set_new(rotated, "refresh_token", json_string(new_refresh_token));
	}
	PG_TRY();
	{
		sync_save_token(source, token, rotated);
	}
	PG_FINALLY();
	{
		json_decref(token);
		json_decref(rotated);
	}
	PG_END_TRY();
}

/* ---------- helpers for targets ---------- */

json_t *
fuzz_json(const char *fmt,...)
{
	StringInfoData buf;
	json_error_t err;
	json_t	   *value;

	initStringInfo(&buf);
	for (;;)
	{
		va_list		args;
		int			needed;

		va_start(args, fmt);
		needed = appendStringInfoVA(&buf, fmt, args);
		va_end(args);
		if (needed == 0)
			break;
		enlargeStringInfo(&buf, needed);
	}
	value = json_loads(buf.data, 0, &err);
	if (value == NULL)
	{
		fprintf(stderr, "fuzz target: bad JSON %s: %s\n", buf.data, err.text);
		abort();
	}
	return value;
}

SyncField *
fuzz_field(const char *api_field, const char *api_type, const char *column_type, bool is_key, bool is_version)
{
	SyncField  *f = palloc0(sizeof(SyncField));

	f->api_field = pstrdup(api_field);
	f->api_type = pstrdup(api_type);
	f->column_name = sync_identifier_from_api_name(api_field);
	f->column_type = pstrdup(column_type);
	f->wire_type = pstrdup(column_type);
	f->is_key = is_key;
	f->is_version = is_version;
	return f;
}

char *
fuzz_iso(double epoch)
{
	return sync_format_utc(epoch, "%Y-%m-%dT%H:%M:%S.000+0000");
}

/* ---------- one input ---------- */

static void
caught_error(const char *where)
{
	ErrorData  *edata;

	MemoryContextSwitchTo(fuzz_step_arena());
	edata = CopyErrorData();
	FlushErrorState();
	if (edata->elevel != ERROR)
		fail("error", "%s raised elevel %d", where, edata->elevel);
	if (edata->message == NULL)
		fail("error", "%s raised an error without a message", where);
	check_secret("an error message", edata->message);
	check_secret("an error detail", edata->detail);
	check_secret("an error hint", edata->hint);
	if (fuzz_verbose)
		fprintf(stderr, "fuzz: %s: ERROR %s%s%s\n", where, edata->message,
				edata->detail ? " DETAIL: " : "", edata->detail ? edata->detail : "");
}

/* The cursor as the worker loads it for the next step: from its saved (jsonb) text. */
static json_t *
reload_cursor(json_t *cursor)
{
	json_t	   *back;

	if (cursor == NULL)
		return NULL;
	back = round_trip("the saved cursor", cursor, true);
	return back ? back : json_object();
}

/*
 * The input's last response read as a webhook delivery too: the provider's
 * signature check (which must refuse it: the signatures are made up) and its
 * parsing of the body into changes (which must not crash or raise).
 */
static void
fuzz_webhook(const FuzzTarget *t, SyncSource *source)
{
	SyncWebhookRequest req;
	const Response *r;
	char	   *body;

	if (t->provider->webhook_changes == NULL || nresponses == 0)
		return;
	r = &responses[nresponses - 1];
	MemoryContextSwitchTo(fuzz_step_arena());
	body = palloc(r->len + 1);
	memcpy(body, r->data, r->len);
	body[r->len] = '\0';
	memset(&req, 0, sizeof(req));
	req.method = "POST";
	req.url = "http://127.0.0.1:8787/webhooks/fuzz";
	req.body = body;
	req.body_len = r->len;
	req.now = clock_now;
	req.headers = json_pack("{s:s, s:s, s:s, s:s}",
							"stripe-signature", "t=1767225600,v1=00ff,v1=,v0=1",
							"x-hubspot-signature-v3", "AAAA", "x-hubspot-request-timestamp", "1767225600000",
							"x-airtable-content-mac", "hmac-sha256=00");
	json_object_set_new(source->credentials, "webhook_secret", json_string("whsec_fuzz"));
	source->webhook_secrets = json_pack("{s:s, s:s}", "achFUZZ", "c2VjcmV0", "achBAD", "not base64!");
	PG_TRY();
	{
		const char *malformed = NULL;
		List	   *changes;
		ListCell   *lc;

		if (t->provider->verify_webhook(source, &req) == NULL)
			fail("webhook", "a delivery with a made-up signature was accepted");
		changes = t->provider->webhook_changes(source, &req, &malformed);
		if (changes == NIL && malformed == NULL)
			fail("webhook", "no changes and no reason why");
		foreach(lc, changes)
		{
			SyncWebhookChange *ch = lfirst(lc);

			if (ch->event_id == NULL)
				fail("webhook", "a change without an event id");
			if ((ch->action == SYNC_WEBHOOK_DELETE || ch->action == SYNC_WEBHOOK_SET_FIELD) && ch->record_id == NULL)
				fail("webhook", "a delete or field change without a record id");
			if (ch->action == SYNC_WEBHOOK_UPSERT && !json_is_object(ch->record))
				fail("webhook", "an upsert without a record");
			json_decref(ch->record);
			json_decref(ch->at);
			json_decref(ch->value);
		}
	}
	PG_CATCH();
	{
		caught_error("webhook");
	}
	PG_END_TRY();
	json_decref(req.headers);
	json_decref(source->webhook_secrets);
	source->webhook_secrets = NULL;
	MemoryContextSwitchTo(fuzz_top_arena());
	fuzz_arena_reset(fuzz_step_arena());
}

static void
run_input(const FuzzTarget *t, const uint8_t *data, size_t size)
{
	FuzzCase	fc;
	SyncSource *source;
	SyncCollection *c;
	unsigned	flags = data[1];
	int			scenario = data[0] % t->nscenarios;
	static const double clock_steps[] = {0, 61, 400, 16 * 86400};
	static const int max_steps[] = {1, 2, 4, 8};
	double		clock_step = clock_steps[(flags >> 4) & 3];
	int			steps = max_steps[(flags >> 6) & 3];

	MemoryContextSwitchTo(fuzz_top_arena());
	source = palloc0(sizeof(SyncSource));
	c = palloc0(sizeof(SyncCollection));
	source->id = 1;
	source->name = "fuzz";
	source->kind = (char *) t->kind;
	source->provider = t->provider;
	source->verify_tls = true;
	source->base_url = recording ? (char *) record_base : psprintf("https://api.%s.fuzz", t->kind);
	source->options = json_object();
	source->credentials = json_object();
	current_source = source;
	c->id = 1;
	c->source_id = 1;
	c->name = "collection";
	c->options = json_object();
	c->phase = "backfill";
	c->schema_checked_ago_s = 0;
	fc.source = source;
	fc.collection = c;
	fc.flags = flags;
	fc.now = clock_now;
	t->setup(&fc, scenario);
	remember_secrets(source);
	if (recording && getenv("FUZZ_RECORD_OPTIONS"))
	{
		json_t	   *extra = fuzz_json("%s", getenv("FUZZ_RECORD_OPTIONS"));

		json_object_update(source->options, extra);
		json_decref(extra);
	}
	c->reconcile_requested = (flags & FUZZ_FLAG_RECONCILE) != 0;

	if (recording)
		record_before_step(0);
	if (flags & FUZZ_FLAG_DESCRIBE)
	{
		char	   *volatile canonical = NULL;

		PG_TRY();
		{
			List	   *fields;

			fields = t->provider->describe(source, c->name, (char **) &canonical);
			check_describe(fields, canonical);
			c->fields = fields;
			c->name = canonical;
		}
		PG_CATCH();
		{
			caught_error("describe");
		}
		PG_END_TRY();
		MemoryContextSwitchTo(fuzz_top_arena());
	}

	for (int step = 0; step < steps; step++)
	{
		SyncPage	page;
		int			before = record_count;

		if (!recording && step > 0 && next_response >= nresponses)
			break;
		if (recording && step > 0)
			record_before_step(step);
		memset(&page, 0, sizeof(page));
		page.total = -1;
		MemoryContextSwitchTo(fuzz_step_arena());
		PG_TRY();
		{
			json_t	   *saved;

			t->provider->step(source, c, &page);
			check_page(c, &page);
			if (fuzz_verbose)
				fprintf(stderr, "fuzz: step %d: %zu records, %zu deletions, %zd sweep ids, phase %s%s%s, cursor %s\n",
						step, json_array_size(page.records), json_array_size(page.deletions),
						page.sweep_ids ? (ssize_t) json_array_size(page.sweep_ids) : -1,
						page.phase ? page.phase : "-", page.more ? ", more" : "",
						page.backfill_done ? ", backfill done" : "", sync_json_dump(page.cursor));
			/* commit: the cursor and phase as the worker saves them */
			saved = reload_cursor(page.cursor);
			json_decref(c->cursor);
			c->cursor = saved;
			if (page.phase)
				c->phase = MemoryContextStrdup(fuzz_top_arena(), page.phase);
			c->reconcile_requested = false;
		}
		PG_CATCH();
		{
			caught_error("step");
		}
		PG_END_TRY();
		json_decref(page.records);
		json_decref(page.deletions);
		json_decref(page.cursor);
		json_decref(page.sweep_ids);
		MemoryContextSwitchTo(fuzz_top_arena());
		fuzz_arena_reset(fuzz_step_arena());
		clock_now += clock_step;
		if (recording && (record_count == before || recording_ended))
			break;				/* the step asked nothing of the fake */
	}

	fuzz_webhook(t, source);
	json_decref(source->credentials);
	json_decref(source->options);
	json_decref(source->token);
	json_decref(c->options);
	json_decref(c->cursor);
	json_decref(c->column_backfill);
}

int
fuzz_test_one_input(const FuzzTarget *t, const uint8_t *data, size_t size)
{
	if (size < 2)
		return 0;
	target = t;
	fuzz_set_stack_base();
	clock_now = FUZZ_NOW;
	srandom(1);
	input_has_canary = memmem(data, size, "CANARY", 6) != NULL;
	input_data = data;
	input_size = size;
	next_response = 0;
	split_input(data + 2, size - 2);

	PG_TRY();
	{
		run_input(t, data, size);
	}
	PG_CATCH();
	{
		/* the harness's own setup failed: report it, it is no provider bug */
		ErrorData  *edata = fuzz_current_error();

		fprintf(stderr, "fuzz harness error: %s\n", edata && edata->message ? edata->message : "?");
		abort();
	}
	PG_END_TRY();

	free(last_body);
	last_body = NULL;
	FlushErrorState();
	fuzz_arena_reset(fuzz_step_arena());
	if (!recording)
		fuzz_arena_reset(fuzz_top_arena());
	MemoryContextSwitchTo(fuzz_top_arena());
	return 0;
}

/* ---------- record mode ---------- */

static int
record_main(const FuzzTarget *t)
{
	const char *out = getenv("FUZZ_RECORD_OUT");
	const char *header = getenv("FUZZ_RECORD_HEADER");
	unsigned	b0,
				b1;
	uint8_t		hdr[2];
	FILE	   *f;

	record_base = getenv("FUZZ_RECORD_BASE");
	if (record_base == NULL || header == NULL || sscanf(header, "%2x%2x", &b0, &b1) != 2)
	{
		fprintf(stderr, "record mode needs FUZZ_RECORD_BASE and FUZZ_RECORD_HEADER (4 hex digits)\n");
		return 2;
	}
	recording = true;
	hdr[0] = (uint8_t) b0;
	hdr[1] = (uint8_t) b1;
	MemoryContextSwitchTo(fuzz_top_arena());
	initStringInfo(&record_buf);
	fuzz_test_one_input(t, hdr, 2);
	f = fopen(out, "wb");
	if (f == NULL)
	{
		perror(out);
		return 2;
	}
	fwrite(hdr, 1, 2, f);
	fwrite(record_buf.data, 1, record_buf.len, f);
	fclose(f);
	fprintf(stderr, "record: wrote %s (%d responses, %d bytes)\n", out, record_count, record_buf.len + 2);
	return 0;
}

int
fuzz_initialize(const FuzzTarget *t, int *argc, char ***argv)
{
	json_object_seed(1);
	fuzz_log_hook = check_log;
	/* the worker allows prefetches when it runs one collection: check what they would send */
	sync_prefetch_allowed = true;
	fuzz_verbose = getenv("FUZZ_VERBOSE") != NULL;
	if (getenv("FUZZ_SKIP_CHECKS"))
		skip_checks = getenv("FUZZ_SKIP_CHECKS");
	if (getenv("FUZZ_RECORD_OUT"))
	{
		curl_global_init(CURL_GLOBAL_ALL);
		exit(record_main(t));
	}
	return 0;
}
