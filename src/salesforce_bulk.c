/*
 * salesforce_bulk.c: Salesforce backfills through Bulk API 2.0 query jobs.
 *
 * A REST query returns at most 2,000 records a request; a Bulk API 2.0 query
 * job returns its results as CSV in sets of up to maxRecords rows, so a
 * million records take a few dozen requests instead of 500. salesforce.c
 * switches a backfill to a job when the first REST page's totalSize reaches
 * the option bulk_threshold. Each step makes one or two requests:
 *
 *   create   POST jobs/query {"operation":"query","query":...}: the response's
 *            Date is the backfill's start (the job snapshots the records
 *            later, when it turns InProgress, so nothing older is missed)
 *   poll     GET jobs/query/{id} until JobComplete (an empty page; polls
 *            are spaced 0.25 s, 0.5 s, ... up to 2 s, and by the budget)
 *   chunk    GET jobs/query/{id}/results?maxRecords=N&locator=L: one page,
 *            applied with the next locator in the same transaction
 *
 * The collection's cursor holds the job as {"bulk": {"job", "started",
 * "complete", "locator", "polls", "polled_at", "failed_jobs"}}, so a restart
 * resumes from the last committed locator (results stay for 7 days). A job
 * that is gone (404, invalid locator) is created again; a Failed or Aborted
 * job is reported as the step's error, and the retry creates a new job (after
 * three failed jobs, or when the API refuses to create one, the backfill goes
 * on with REST queries).
 *
 * CSV values are text: each becomes the JSON value the REST API would have
 * sent for the field's type, so the rest of the pipeline is unchanged.
 * Compound fields (address, location) cannot be selected in Bulk queries:
 * they are put together from their component fields.
 */
#include "sync.h"

#include <time.h>

#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/timestamp.h"

#define SF_BULK_MIN_API_VERSION 47
#define SF_BULK_DEFAULT_THRESHOLD 100000
#define SF_BULK_DEFAULT_CHUNK_RECORDS 25000
#define SF_BULK_MAX_FAILED_JOBS 3

/* ---------- options ---------- */

static int64
bulk_option(SyncSource *source, SyncCollection *c, const char *name, int64 dflt)
{
	return sync_json_int(c->options, name, sync_json_int(source->options, name, dflt));
}

/* ---------- compound fields ---------- */

/* Keys of a REST address value and the suffix of their component fields. */
static const char *const address_parts[][2] = {
	{"city", "City"}, {"country", "Country"}, {"geocodeAccuracy", "GeocodeAccuracy"},
	{"latitude", "Latitude"}, {"longitude", "Longitude"}, {"postalCode", "PostalCode"},
	{"state", "State"}, {"street", "Street"},
};

/*
 * Component field of compound field f for the key at index i (address) or
 * 0/1 (location: latitude, longitude); NULL when the name does not say.
 */
static char *
compound_component(SyncField *f, int i)
{
	size_t		len = strlen(f->api_field);

	if (strcmp(f->api_type, "address") == 0)
	{
		/* MailingAddress -> MailingCity ...; Address (Lead) -> City ... */
		if (len < 7 || strcmp(f->api_field + len - 7, "Address") != 0)
			return NULL;
		return psprintf("%.*s%s", (int) (len - 7), f->api_field, address_parts[i][1]);
	}
	if (strcmp(f->api_type, "location") == 0)
	{
		/* Place__c -> Place__Latitude__s, Place__Longitude__s */
		if (len > 3 && strcmp(f->api_field + len - 3, "__c") == 0)
			return psprintf("%.*s__%s__s", (int) (len - 3), f->api_field, i == 0 ? "Latitude" : "Longitude");
		return NULL;
	}
	return NULL;
}

static bool
is_compound(SyncField *f)
{
	return strcmp(f->api_type, "address") == 0 || strcmp(f->api_type, "location") == 0;
}

static int
compound_nparts(SyncField *f)
{
	return strcmp(f->api_type, "address") == 0 ? (int) lengthof(address_parts) : 2;
}

static const char *
compound_key(SyncField *f, int i)
{
	if (strcmp(f->api_type, "address") == 0)
		return address_parts[i][0];
	return i == 0 ? "latitude" : "longitude";
}

static bool
name_in_list(List *names, const char *name)
{
	ListCell   *lc;

	foreach(lc, names)
		if (pg_strcasecmp((char *) lfirst(lc), name) == 0)
		return true;
	return false;
}

/* The SELECT list of the job: every field but compounds, plus their components. */
static char *
bulk_field_list(SyncCollection *c)
{
	List	   *names = NIL;
	ListCell   *lc;
	StringInfoData buf;

	foreach(lc, c->fields)
	{
		SyncField  *f = lfirst(lc);

		if (!is_compound(f))
			names = lappend(names, f->api_field);
	}
	foreach(lc, c->fields)
	{
		SyncField  *f = lfirst(lc);

		if (!is_compound(f))
			continue;
		for (int i = 0; i < compound_nparts(f); i++)
		{
			char	   *part = compound_component(f, i);

			if (!name_in_list(names, part))
				names = lappend(names, part);
		}
	}
	initStringInfo(&buf);
	foreach(lc, names)
		appendStringInfo(&buf, "%s%s", buf.len ? "," : "", (char *) lfirst(lc));
	return buf.data;
}

bool
sync_sf_bulk_wanted(SyncSource *source, SyncCollection *c, int64 total)
{
	int64		threshold = bulk_option(source, c, "bulk_threshold", SF_BULK_DEFAULT_THRESHOLD);
	ListCell   *lc;

	if (threshold <= 0 || total < threshold)
		return false;
	if (atoi(sync_sf_api_version(source)) < SF_BULK_MIN_API_VERSION)
		return false;
	foreach(lc, c->fields)
	{
		SyncField  *f = lfirst(lc);

		if (is_compound(f) && compound_component(f, 0) == NULL)
		{
			ereport(LOG,
					(errmsg("backfill of collection \"%s\" stays with REST queries: compound field \"%s\" cannot be read with the Bulk API",
							c->name, f->api_field)));
			return false;
		}
	}
	return true;
}

/* ---------- CSV (RFC 4180) ---------- */

typedef struct CsvReader
{
	const char *p;
	const char *end;
	int64		row;			/* 1 = the header row */
} CsvReader;

#define CSV_END_OF_FIELD 0
#define CSV_END_OF_ROW 1
#define CSV_END_OF_DATA 2

/*
 * Read one field into out (quotes removed, "" unescaped); *quoted tells
 * whether it was quoted. Returns what ended it.
 */
static int
csv_field(CsvReader *r, StringInfo out, bool *quoted)
{
	const char *p = r->p;
	const char *end = r->end;

	resetStringInfo(out);
	*quoted = false;
	if (p < end && *p == '"')
	{
		*quoted = true;
		p++;
		for (;;)
		{
			const char *q = memchr(p, '"', end - p);

			if (q == NULL)
				ereport(ERROR,
						(errcode(ERRCODE_DATA_EXCEPTION),
						 errmsg("malformed CSV in Salesforce Bulk API results: unterminated quoted value"),
						 errdetail("Row %lld of the results set.", (long long) r->row)));
			appendBinaryStringInfo(out, p, q - p);
			p = q + 1;
			if (p < end && *p == '"')
			{
				appendStringInfoChar(out, '"');
				p++;
				continue;
			}
			break;
		}
	}
	else
	{
		const char *q = p;

		while (q < end && *q != ',' && *q != '\n' && *q != '\r')
			q++;
		appendBinaryStringInfo(out, p, q - p);
		p = q;
	}
	if (p >= end)
	{
		r->p = p;
		return CSV_END_OF_DATA;
	}
	if (*p == ',')
	{
		r->p = p + 1;
		return CSV_END_OF_FIELD;
	}
	if (*p == '\r' || *p == '\n')
	{
		if (*p == '\r')
			p++;
		if (p < end && *p == '\n')
			p++;
		r->p = p;
		return CSV_END_OF_ROW;
	}
	ereport(ERROR,
			(errcode(ERRCODE_DATA_EXCEPTION),
			 errmsg("malformed CSV in Salesforce Bulk API results: characters after a quoted value"),
			 errdetail("Row %lld of the results set.", (long long) r->row)));
	return CSV_END_OF_DATA;		/* keep the compiler quiet */
}

/*
 * A CSV value as text for SQL: each byte of invalid UTF-8 becomes U+FFFD and
 * NUL is dropped, as for JSON responses (one bad byte must not fail the set
 * for ever). Empty is null: the Bulk API writes nulls as empty values.
 */
static Datum
bulk_text(StringInfo value, StringInfo scratch)
{
	size_t		i = 0;
	size_t		len = value->len;
	const char *s = value->data;

	resetStringInfo(scratch);
	while (i < len)
	{
		const unsigned char *p = (const unsigned char *) s + i;
		int			n = (*p < 0x80) ? 1 : pg_utf_mblen(p);

		if (*p == '\0')
		{
			i++;
			continue;
		}
		if (*p >= 0x80 && !(n > 1 && i + n <= len && pg_utf8_islegal(p, n)))
		{
			appendBinaryStringInfo(scratch, "\xEF\xBF\xBD", 3);
			i++;
			continue;
		}
		appendBinaryStringInfo(scratch, (const char *) p, n);
		i += n;
	}
	return PointerGetDatum(cstring_to_text_with_len(scratch->data, scratch->len));
}

/* A compound part as the REST API sends it: latitude and longitude are numbers. */
static json_t *
compound_value(const char *key, StringInfo text, StringInfo scratch)
{
	if (text->len == 0)
		return json_null();
	if (strcmp(key, "latitude") == 0 || strcmp(key, "longitude") == 0)
	{
		char	   *endp;
		double		d = strtod(text->data, &endp);

		if (*endp == '\0' && endp != text->data)
			return json_real(d);
	}
	(void) bulk_text(text, scratch);
	return json_stringn(scratch->data, scratch->len);
}

static int
list_index_of_field(List *fields, SyncField *f)
{
	ListCell   *lc;

	foreach(lc, fields)
		if (lfirst(lc) == f)
			return foreach_current_index(lc);
	elog(ERROR, "field \"%s\" is not among the collection's fields", f->api_field);
	return -1;
}

typedef struct BulkColumn
{
	SyncField  *field;			/* the synced field of this column, or NULL */
	int			position;		/* the field's position in the collection's fields */
	char	   *name;
} BulkColumn;

/*
 * Parse one results set into page->batch, the values as text for their
 * columns (records.c): a set holds tens of thousands of rows, so no tree of
 * JSON values is built for them. Compound fields (addresses) are put back
 * together as the objects the REST API sends. Returns the number of rows.
 */
static int64
bulk_parse_csv(SyncCollection *c, const char *data, size_t len, SyncPage *page)
{
	CsvReader	r = {data, data + len, 1};
	StringInfoData value;
	List	   *columns = NIL;
	BulkColumn *cols;
	int			ncols;
	int			id_col = -1;
	int			stamp_col = -1;
	List	   *compounds = NIL;
	int		  **compound_cols;
	int64		rows = 0;
	ListCell   *lc;
	int			end;
	bool		quoted;
	StringInfoData *texts;
	StringInfoData scratch;

	initStringInfo(&value);
	/* header row */
	do
	{
		end = csv_field(&r, &value, &quoted);
		columns = lappend(columns, pstrdup(value.data));
	} while (end == CSV_END_OF_FIELD);
	ncols = list_length(columns);
	cols = palloc0(sizeof(BulkColumn) * ncols);
	foreach(lc, columns)
	{
		int			i = foreach_current_index(lc);
		ListCell   *fc;

		cols[i].name = lfirst(lc);
		foreach(fc, c->fields)
		{
			SyncField  *f = lfirst(fc);

			if (!is_compound(f) && pg_strcasecmp(f->api_field, cols[i].name) == 0)
			{
				cols[i].field = f;
				cols[i].position = foreach_current_index(fc);
			}
		}
		if (pg_strcasecmp(cols[i].name, "Id") == 0)
			id_col = i;
		if (pg_strcasecmp(cols[i].name, "SystemModstamp") == 0)
			stamp_col = i;
	}
	if (id_col < 0 || stamp_col < 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("Salesforce Bulk API results of \"%s\" lack the Id or SystemModstamp column", c->name)));

	/* for each compound field: the column of each of its parts (-1: none) */
	foreach(lc, c->fields)
		if (is_compound((SyncField *) lfirst(lc)))
		compounds = lappend(compounds, lfirst(lc));
	compound_cols = palloc0(sizeof(int *) * Max(1, list_length(compounds)));
	foreach(lc, compounds)
	{
		SyncField  *f = lfirst(lc);
		int		   *map = palloc(sizeof(int) * compound_nparts(f));

		for (int k = 0; k < compound_nparts(f); k++)
		{
			char	   *part = compound_component(f, k);

			map[k] = -1;
			for (int i = 0; i < ncols; i++)
				if (part && pg_strcasecmp(cols[i].name, part) == 0)
					map[k] = i;
		}
		compound_cols[foreach_current_index(lc)] = map;
	}

	texts = palloc(sizeof(StringInfoData) * ncols);
	for (int i = 0; i < ncols; i++)
		initStringInfo(&texts[i]);
	page->batch = sync_batch_new(c->fields, 1024);
	initStringInfo(&scratch);
	while (end != CSV_END_OF_DATA && r.p < r.end)
	{
		int			n = 0;
		int			row;

		r.row++;
		do
		{
			if (n >= ncols)
				ereport(ERROR,
						(errcode(ERRCODE_DATA_EXCEPTION),
						 errmsg("malformed CSV in Salesforce Bulk API results: a row has more than %d values", ncols),
						 errdetail("Row %lld of the results set.", (long long) r.row)));
			end = csv_field(&r, &texts[n], &quoted);
			n++;
		} while (end == CSV_END_OF_FIELD);
		if (n != ncols)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_EXCEPTION),
					 errmsg("malformed CSV in Salesforce Bulk API results: a row has %d values, the header %d", n, ncols),
					 errdetail("Row %lld of the results set.", (long long) r.row)));
		if (texts[id_col].len == 0 || sync_parse_iso8601(texts[stamp_col].data) < 0)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_EXCEPTION),
					 errmsg("Salesforce record without a valid Id and SystemModstamp"),
					 errdetail("Row %lld of the Bulk API results set.", (long long) r.row)));
		row = sync_batch_add(page->batch);
		for (int i = 0; i < ncols; i++)
			if (cols[i].field && texts[i].len > 0)
			{
				page->batch->values[cols[i].position][row] = bulk_text(&texts[i], &scratch);
				page->batch->nulls[cols[i].position][row] = false;
			}
		foreach(lc, compounds)
		{
			SyncField  *f = lfirst(lc);
			int		   *map = compound_cols[foreach_current_index(lc)];
			json_t	   *compound = json_object();
			bool		any = false;

			for (int k = 0; k < compound_nparts(f); k++)
			{
				json_t	   *v = map[k] >= 0 ? compound_value(compound_key(f, k), &texts[map[k]], &scratch)
					: json_null();

				any |= !json_is_null(v);
				json_object_set_new(compound, compound_key(f, k), v ? v : json_null());
			}
			if (any)
			{
				char	   *text = sync_json_dump(compound);
				int			position = list_index_of_field(c->fields, f);

				page->batch->values[position][row] = PointerGetDatum(cstring_to_text(text));
				page->batch->nulls[position][row] = false;
				pfree(text);
			}
			json_decref(compound);
		}
		rows++;
		if ((rows & 1023) == 0)
			CHECK_FOR_INTERRUPTS();
	}
	pfree(scratch.data);
	for (int i = 0; i < ncols; i++)
		pfree(texts[i].data);
	pfree(texts);
	return rows;
}

/* ---------- the job ---------- */

static double
now_s(void)
{
	return (double) GetCurrentTimestamp() / USECS_PER_SEC;
}

/* Wait, answering SIGTERM and query cancel. */
static void
bulk_pause(double seconds)
{
	TimestampTz until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), (long) (seconds * 1000));

	for (;;)
	{
		long		ms = (long) ((until - GetCurrentTimestamp()) / 1000);

		if (ms <= 0)
			break;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Min(ms, 100), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		if (sync_is_worker && sync_worker_extension_dropped())
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("Bulk API job poll given up: the sync extension was dropped")));
	}
}

static const char *
bulk_error_code(SyncHttpResponse *resp)
{
	json_t	   *body = resp->body ? json_loadb(resp->body, resp->body_len, 0, NULL) : NULL;
	const char *code = NULL;

	if (body && json_is_array(body) && json_array_size(body) > 0)
		code = sync_json_string(json_array_get(body, 0), "errorCode");
	code = pstrdup(code ? code : "UNKNOWN");
	json_decref(body);
	return code;
}

static bool
valid_job_id(const char *id)
{
	if (id == NULL || *id == '\0' || strlen(id) > 40)
		return false;
	for (const char *p = id; *p; p++)
		if (!isalnum((unsigned char) *p))
			return false;
	return true;
}

/*
 * Create the job (one request). Returns FALLBACK when the API refuses Bulk
 * queries of this object or this org is out of jobs; MORE otherwise.
 */
static SyncSfBulkResult
bulk_create(SyncSource *source, SyncCollection *c, SyncPage *page, json_t *bulk)
{
	char	   *soql = psprintf("SELECT %s FROM %s", bulk_field_list(c), c->name);
	json_t	   *spec = json_pack("{s:s, s:s, s:s, s:s, s:s}", "operation", "query", "query", soql,
								 "contentType", "CSV", "columnDelimiter", "COMMA", "lineEnding", "LF");
	char	   *text = sync_json_dump(spec);
	SyncHttpResponse resp = {0};
	json_t	   *info;
	const char *id;

	json_decref(spec);
	sync_sf_request(source, page, "POST", psprintf("/services/data/v%s/jobs/query", sync_sf_api_version(source)),
					text, &resp);
	if (resp.status >= 400 && resp.status < 500 && resp.status != 401 && resp.status != 429 &&
		!(resp.status == 403 && resp.body && strstr(resp.body, "REQUEST_LIMIT_EXCEEDED")))
	{
		/* not for this object (or not today): the REST query does the backfill */
		MemoryContext ctx = CurrentMemoryContext;
		ErrorData  *edata;

		PG_TRY();
		{
			sync_sf_raise(&resp, "Bulk API query job creation");
		}
		PG_CATCH();
		{
			MemoryContextSwitchTo(ctx);
			edata = CopyErrorData();
			FlushErrorState();
		}
		PG_END_TRY();
		ereport(LOG,
				(errmsg("backfill of collection \"%s\" goes on with REST queries: %s", c->name, edata->message)));
		return SYNC_SF_BULK_FALLBACK;
	}
	if (resp.status < 200 || resp.status >= 300)
		sync_sf_raise(&resp, "Bulk API query job creation");
	info = sync_json_parse(resp.body, resp.body_len, "Salesforce Bulk API job info");
	id = sync_json_string(info, "id");
	if (!valid_job_id(id))
	{
		json_decref(info);
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("Salesforce Bulk API job info has no valid id")));
	}
	json_object_set_new(bulk, "job", json_string(id));
	json_decref(info);
	json_object_set_new(bulk, "started", json_real(sync_http_server_time(&resp)));
	json_object_set_new(bulk, "polls", json_integer(0));
	json_object_set_new(bulk, "polled_at", json_real(now_s()));
	json_object_del(bulk, "complete");
	json_object_del(bulk, "locator");
	/* the job reads every record again: so does the backfill's count */
	page->backfill_restart = true;
	page->activity = "waiting for a Bulk API query job";
	return SYNC_SF_BULK_MORE;
}

/* The job is gone or unusable: forget it and create a new one. */
static SyncSfBulkResult
bulk_recreate(SyncSource *source, SyncCollection *c, SyncPage *page, json_t *bulk, const char *why)
{
	ereport(LOG,
			(errmsg("Bulk API query job %s of collection \"%s\" %s; creating a new job",
					sync_json_string(bulk, "job"), c->name, why)));
	json_object_clear(bulk);
	return bulk_create(source, c, page, bulk);
}

SyncSfBulkResult
sync_sf_bulk_step(SyncSource *source, SyncCollection *c, SyncPage *page, json_t *cursor, double *started)
{
	json_t	   *bulk = json_object_get(cursor, "bulk");
	const char *job;
	SyncHttpResponse resp = {0};
	StringInfoData path;
	const char *locator;
	char	   *next;
	int64		rows;
	int64		max_records;

	job = sync_json_string(bulk, "job");
	if (job == NULL)
		return bulk_create(source, c, page, bulk);
	if (!valid_job_id(job))
		return bulk_recreate(source, c, page, bulk, "has an invalid id");
	job = pstrdup(job);

	if (!sync_json_bool(bulk, "complete", false))
	{
		int64		polls = sync_json_int(bulk, "polls", 0);
		double		spacing = Min(0.25 * (double) (1 << Min(polls, 4)), 2.0);
		double		since = now_s() - sync_json_number(bulk, "polled_at", 0);
		json_t	   *info;
		const char *state;

		if (since >= 0 && since < spacing)
			bulk_pause(spacing - since);
		sync_sf_request(source, page, "GET",
						psprintf("/services/data/v%s/jobs/query/%s", sync_sf_api_version(source), job),
						NULL, &resp);
		if (resp.status == 404)
			return bulk_recreate(source, c, page, bulk, "is gone");
		if (resp.status < 200 || resp.status >= 300)
			sync_sf_raise(&resp, "Bulk API job state request");
		json_object_set_new(bulk, "polls", json_integer(polls + 1));
		json_object_set_new(bulk, "polled_at", json_real(now_s()));
		info = sync_json_parse(resp.body, resp.body_len, "Salesforce Bulk API job info");
		state = pstrdup(sync_json_string(info, "state") ? sync_json_string(info, "state") : "");
		if (strcmp(state, "JobComplete") == 0)
		{
			page->total = sync_json_int(info, "numberRecordsProcessed", -1);
			json_decref(info);
			json_object_set_new(bulk, "complete", json_true());
			/* the first results set comes in this step too */
		}
		else if (strcmp(state, "Failed") == 0 || strcmp(state, "Aborted") == 0)
		{
			const char *message = sync_json_string(info, "errorMessage");
			char	   *why = psprintf("ended %s%s%s", state, message ? ": " : "", message ? message : "");

			json_decref(info);
			if (!page->retry)
				ereport(ERROR,
						(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
						 errmsg("Salesforce Bulk API query job %s of \"%s\" %s", job, c->name, why),
						 errhint("sync creates a new job; after %d failed jobs the backfill goes on with REST queries.",
								 SF_BULK_MAX_FAILED_JOBS)));
			/* the error was reported by the previous step: try again */
			{
				int64		failed = sync_json_int(bulk, "failed_jobs", 0) + 1;
				SyncSfBulkResult result;

				if (failed >= SF_BULK_MAX_FAILED_JOBS)
				{
					ereport(LOG,
							(errmsg("Bulk API query job %s of collection \"%s\" %s; after %lld failed jobs the backfill goes on with REST queries",
									job, c->name, why, (long long) failed)));
					return SYNC_SF_BULK_FALLBACK;
				}
				result = bulk_recreate(source, c, page, bulk, why);
				json_object_set_new(bulk, "failed_jobs", json_integer(failed));
				return result;
			}
		}
		else
		{
			json_decref(info);
			page->activity = psprintf("waiting for Bulk API query job (%s)", state);
			return SYNC_SF_BULK_MORE;
		}
	}

	/*
	 * One set of results: one page. A set larger than sync.max_response_bytes
	 * is asked again with half as many records (remembered for the next sets).
	 */
	locator = sync_json_string(bulk, "locator");
	max_records = sync_json_int(bulk, "max_records",
								Max(1, bulk_option(source, c, "bulk_chunk_records", SF_BULK_DEFAULT_CHUNK_RECORDS)));
	for (;;)
	{
		MemoryContext ctx = CurrentMemoryContext;
		volatile bool too_large = false;

		initStringInfo(&path);
		appendStringInfo(&path, "/services/data/v%s/jobs/query/%s/results?maxRecords=%lld",
						 sync_sf_api_version(source), job, (long long) max_records);
		if (locator)
			appendStringInfo(&path, "&locator=%s", sync_http_urlencode(locator));
		PG_TRY();
		{
			sync_sf_request(source, page, "GET", path.data, NULL, &resp);
		}
		PG_CATCH();
		{
			ErrorData  *edata;

			MemoryContextSwitchTo(ctx);
			edata = CopyErrorData();
			if (edata->sqlerrcode != ERRCODE_PROGRAM_LIMIT_EXCEEDED || max_records <= 1)
				PG_RE_THROW();
			FlushErrorState();
			too_large = true;
		}
		PG_END_TRY();
		if (!too_large)
			break;
		max_records = Max(1, max_records / 2);
		json_object_set_new(bulk, "max_records", json_integer(max_records));
		ereport(LOG,
				(errmsg("Bulk API results of collection \"%s\" exceed sync.max_response_bytes; asking for %lld records a set",
						c->name, (long long) max_records)));
	}
	if (resp.status == 404)
		return bulk_recreate(source, c, page, bulk, "is gone");
	if (resp.status == 400 && strcmp(bulk_error_code(&resp), "INVALIDLOCATOR") == 0)
		return bulk_recreate(source, c, page, bulk, "does not know its locator any more");
	if (resp.status < 200 || resp.status >= 300)
		sync_sf_raise(&resp, "Bulk API results request");

	rows = bulk_parse_csv(c, resp.body ? resp.body : "", resp.body ? resp.body_len : 0, page);
	next = sync_http_header(&resp, "Sforce-Locator");
	page->activity = "backfilling (Bulk API)";
	ereport(DEBUG1,
			(errmsg("Bulk API job %s of \"%s\": %lld records from locator %s, next %s",
					job, c->name, (long long) rows, locator ? locator : "(start)", next ? next : "(none)")));
	if (next == NULL || next[0] == '\0' || strcmp(next, "null") == 0)
	{
		*started = sync_json_number(bulk, "started", (double) time(NULL));
		return SYNC_SF_BULK_DONE;
	}
	json_object_set_new(bulk, "locator", json_string(next));
	return SYNC_SF_BULK_MORE;
}
