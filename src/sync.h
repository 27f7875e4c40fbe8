/*
 * sync.h: declarations shared by the parts of the sync extension.
 *
 * The extension is split into small files with one job each:
 *   sync.c        module load: GUCs, hooks, shared memory, launcher registration
 *   launcher.c    the launcher background worker: one sync worker per database
 *   worker.c      a database's sync worker: scheduling, transactions, errors
 *   catalog.c     reading and writing the sync.* catalog tables through SPI
 *   store.c       creating synced tables and applying pages of records
 *   records.c     a page's records as SQL arguments (a text array per field)
 *   copyload.c    new records of a page written through COPY's machinery
 *   jsonscan.c    a page's records read straight into a batch (no JSON tree)
 *   reject.c      values that do not fit their columns: set aside, recorded
 *   http.c        interruptible libcurl requests
 *   httpmsg.c     URLs and response headers (no transfers)
 *   ratelimit.c   per-source request budgets in shared memory
 *   request.c     every API request: budget, counters, rate-limit answers
 *   provider.c    the registry of providers (one file per API)
 *   salesforce.c  the Salesforce provider (salesforce_bulk.c: Bulk API 2.0 backfills)
 *   notify.c      delivering queued notifications: webhooks, and e-mail via smtp.c
 *   smtp.c        sending one e-mail through an SMTP server
 *   api.c         SQL-callable functions
 *   naming.c      API names to Postgres identifiers
 *   webhook.c     ingesting one webhook delivery (provider-neutral)
 *   webhook_verify.c  HMAC-SHA256, hex, base64, constant-time comparison
 *   webhook_listener.c  the background worker serving webhook deliveries over HTTP
 */
#ifndef PG_SYNC_EXTENSION_H
#define PG_SYNC_EXTENSION_H

#include "postgres.h"

/*
 * Postgres declares a SQL function json_object() that clashes with jansson's:
 * hide Postgres's name before anyone includes fmgrprotos.h.
 */
#define json_object pg_sql_json_object
#include "utils/builtins.h"
#undef json_object
#include <jansson.h>

/*
 * The postgres executable exports its own json_object symbol, and the dynamic
 * linker binds our calls to it, not to jansson's: never call json_object().
 */
extern json_t *sync_json_new_object(void);
#define json_object() sync_json_new_object()

#include "access/attnum.h"
#include "datatype/timestamp.h"
#include "lib/stringinfo.h"
#include "nodes/pg_list.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "utils/relcache.h"
#include "utils/wait_event.h"

#define SYNC_EXTENSION_NAME "sync"
#define SYNC_SCHEMA "sync"

/* ---------- GUCs (sync.c) ---------- */
extern bool sync_enabled;
extern int	sync_max_databases;
extern int	sync_launcher_naptime_s;
extern int	sync_http_timeout_ms;
extern int	sync_http_connect_timeout_ms;
extern int	sync_max_response_bytes;
extern int	sync_max_backoff_s;
extern int	sync_lock_timeout_ms;
extern int	sync_max_sources;
extern int	sync_notify_after_failures;
extern char *sync_user_agent;
extern bool sync_allow_insecure_tls;
extern char *sync_webhook_listen_address;
extern char *sync_webhook_database;
extern int	sync_webhook_max_body;
extern int	sync_webhook_max_connections;
extern int	sync_webhook_timeout_s;

/* ---------- shared memory (shmem.c) ---------- */
typedef enum SyncSlotState
{
	SYNC_SLOT_FREE = 0,
	SYNC_SLOT_WANTED,			/* a worker should run here */
	SYNC_SLOT_RUNNING,			/* a worker was started */
	SYNC_SLOT_NO_EXTENSION		/* probed: extension not installed */
} SyncSlotState;

typedef struct SyncDatabaseSlot
{
	Oid			dboid;
	SyncSlotState state;
	pid_t		worker_pid;
	Latch	   *worker_latch;
	TimestampTz not_before;		/* do not (re)start before this time */
	bool		requested;		/* CREATE EXTENSION committed since the worker started */
	bool		extension_dropped;	/* DROP EXTENSION committed: give up any request in flight */

	/* a backend's request that the worker refresh a source's token (see token.c) */
	int32		refresh_source_id;
	uint64		refresh_requested;
	uint64		refresh_done;
	int			refresh_sqlstate;
	char		refresh_error[256];
} SyncDatabaseSlot;

typedef struct SyncShared
{
	pid_t		launcher_pid;
	Latch	   *launcher_latch;
	pid_t		webhook_listener_pid;	/* the webhook listener, connected to webhook_listener_db */
	Oid			webhook_listener_db;
	int			nslots;
	SyncDatabaseSlot slots[FLEXIBLE_ARRAY_MEMBER];
} SyncShared;

extern SyncShared *sync_shared;
extern LWLock *sync_shared_lock;

extern Size sync_shmem_size(void);
extern void sync_shmem_request(void);
extern void sync_shmem_startup(void);
extern SyncDatabaseSlot *sync_slot_find(Oid dboid);
extern SyncDatabaseSlot *sync_slot_find_or_add(Oid dboid);
extern void sync_wake_launcher(void);
extern void sync_wake_database_worker(Oid dboid);
extern void sync_request_worker_at_commit(void);
extern void sync_wake_worker_at_commit(void);
extern void sync_extension_dropped_at_commit(void);
extern bool sync_worker_extension_dropped(void);
extern bool sync_stop_database_worker(Oid dboid, int wait_ms);

/* ---------- background worker entry points ---------- */
extern PGDLLEXPORT void sync_launcher_main(Datum arg) pg_attribute_noreturn();
extern PGDLLEXPORT void sync_worker_main(Datum arg) pg_attribute_noreturn();
extern void sync_register_launcher(void);

/* ---------- HTTP (http.c) ---------- */
typedef struct SyncHttpResponse
{
	long		status;
	char	   *body;			/* NUL-terminated, malloc'd, owned by the client */
	size_t		body_len;
	char	   *date;			/* Date header, or NULL */
	char	   *headers;		/* raw header lines of the response, palloc'd */
} SyncHttpResponse;

typedef struct SyncHttpHeader
{
	const char *name;
	const char *value;
} SyncHttpHeader;

extern void sync_http_init(void);
extern void sync_http_cleanup(void);
extern void sync_http_request(const char *method, const char *url,
							  const SyncHttpHeader *headers, int nheaders,
							  const char *body, const char *content_type,
							  bool verify_tls, SyncHttpResponse *resp);
extern void sync_http_request_timeout(const char *method, const char *url,
									  const SyncHttpHeader *headers, int nheaders,
									  const char *body, const char *content_type,
									  bool verify_tls, int timeout_ms, SyncHttpResponse *resp);

/*
 * A GET sent ahead (at most one; any other request discards it), adopted by
 * the sync_http_request() of that very GET within 30 s; see http.c.
 */
extern void sync_http_prefetch(const char *url, const SyncHttpHeader *headers, int nheaders,
							   bool verify_tls);
extern bool sync_http_prefetch_claim(const char *url, const SyncHttpHeader *headers, int nheaders,
									 bool verify_tls);
extern void sync_http_pump(void);
extern char *sync_http_urlencode(const char *s);
extern double sync_http_server_time(SyncHttpResponse *resp);
extern char *sync_http_header(SyncHttpResponse *resp, const char *name);
extern double sync_parse_http_date(const char *value);
extern char *sync_http_host_of(const char *url);
extern bool sync_url_is_valid(const char *url, char **why);

/* ---------- time (timeutil.c) ---------- */
extern double sync_parse_iso8601(const char *s);
extern char *sync_format_utc(double epoch, const char *format);

/* ---------- naming (naming.c) ---------- */
extern char *sync_identifier_from_api_name(const char *api_name);
extern char *sync_unique_identifier(const char *wanted, List *taken);

/* ---------- providers (provider.c and one file per API) ---------- */

/* One API field and the column that holds it. */
typedef struct SyncField
{
	char	   *api_field;		/* name in the API's records */
	char	   *api_type;		/* the API's own type name */
	char	   *column_name;	/* Postgres column */
	char	   *column_type;	/* Postgres type, e.g. numeric(18,2) */
	char	   *wire_type;		/* type jsonb_to_recordset reads the value as */
	char	   *convert_sql;	/* expression turning %s (wire value) into column_type, or NULL */
	bool		is_key;
	bool		is_version;		/* the API's modification stamp: no row goes backwards */
} SyncField;

/* A source as the worker and the SQL functions see it. */
typedef struct SyncSource
{
	int32		id;
	char	   *name;
	char	   *kind;
	char	   *base_url;
	json_t	   *credentials;	/* owned; never logged */
	json_t	   *options;		/* owned */
	json_t	   *token;			/* owned; provider-defined (access token, instance url) */
	bool		verify_tls;
	const struct SyncProvider *provider;
	json_t	   *webhook_secrets;	/* owned; webhook id -> secret, loaded by webhook.c only */
} SyncSource;

typedef struct SyncCollection
{
	int32		id;
	int32		source_id;
	char	   *name;
	Oid			relid;
	json_t	   *options;		/* owned */
	json_t	   *cursor;			/* owned; provider-defined */
	char	   *phase;			/* backfill | incremental */
	bool		reconcile_requested;	/* sync.reconcile() asked for a delete sweep */
	json_t	   *column_backfill;	/* owned; a backfill of some columns in progress, or NULL */
	double		schema_checked_ago_s;	/* since the API's fields were last described */
	List	   *fields;			/* SyncField * */
} SyncCollection;

/* What one step of a provider produced: applied and committed together. */
typedef struct SyncPage
{
	json_t	   *records;		/* array of objects keyed by api field: upserts */
	struct SyncBatch *batch;	/* or the upserts already in column form (records.c), or NULL */
	json_t	   *deletions;		/* array of {"id": text, "at": timestamp or null} */
	json_t	   *cursor;			/* the collection's cursor after this page */
	const char *phase;			/* phase after this page */
	bool		backfill_done;	/* this page completed the backfill */
	bool		backfill_restart;	/* the backfill walk starts over: so does its count */
	bool		more;			/* more pages are ready now: run again soon */
	bool		caught_up;		/* the change feed was read to its end (implied by incremental && !more) */
	int64		total;			/* backfill total when the API tells, else -1 */

	/*
	 * A delete sweep lists every id the API has; rows whose id was not
	 * listed by the sweep's end (and not written since it began) are deleted.
	 */
	bool		sweep_begin;	/* this page starts a sweep (forget earlier ids) */
	json_t	   *sweep_ids;		/* array of ids this page listed */
	bool		sweep_end;		/* this page ends the sweep */
	const char *activity;		/* what this step did, for the status */

	/* set by the worker */
	TimestampTz caught_up_as_of;	/* when the walk this step ends began */
	bool		retry;			/* the collection's previous step failed */

	/* counted by sync_api_request() */
	int			requests;		/* API requests this step made */
	int64		bytes;			/* response bytes received */
	int			errors;			/* error answers and failed transfers */
	int			rate_limited;	/* rate-limit answers */
	bool		penalized;		/* gave up: the source is waiting out a penalty */
} SyncPage;

/* What the API's usage headers said (see SyncProvider.observe_quota). */
typedef struct SyncQuota
{
	double		daily_limit;	/* requests a day the account may make; 0: unknown */
	double		daily_remaining;	/* of those, still left; -1: unknown */
	double		burst_limit;	/* requests per burst window; 0: unknown */
	double		burst_window_s;
} SyncQuota;

/* The API's own limits for a source, before the user's fraction. */
typedef struct SyncLimits
{
	double		rate;			/* requests per second the API allows in all */
	double		search_rate;	/* a lower limit for search requests, or 0 */
	double		daily_limit;	/* requests a day, or 0 when the API has no daily quota */
	const char *basis;			/* e.g. "5 requests/s per base", for sync.budgets */
} SyncLimits;

/* One webhook delivery as received: what a provider verifies and reads. */
typedef struct SyncWebhookRequest
{
	const char *method;
	const char *url;			/* the URL the API called (scheme://host/path?query) */
	json_t	   *headers;		/* lower-case header names -> string values */
	const char *body;			/* the raw body, NUL-terminated */
	size_t		body_len;
	double		now;			/* unix time of receipt */
} SyncWebhookRequest;

typedef enum SyncWebhookAction
{
	SYNC_WEBHOOK_NONE,			/* nothing for sync (an event type it does not store) */
	SYNC_WEBHOOK_UPSERT,		/* record: the whole record, with its version field */
	SYNC_WEBHOOK_DELETE,		/* record_id deleted at `at` */
	SYNC_WEBHOOK_SET_FIELD,		/* field of record_id set to value at `at` */
	SYNC_WEBHOOK_POLL			/* the event lacks the data: the collection polls now */
} SyncWebhookAction;

/* What one event of a delivery asks of one collection. */
typedef struct SyncWebhookChange
{
	char	   *event_id;		/* the API's id of the event: a replay is recognised by it */
	char	   *collection;		/* the collection it concerns, as the API names it; NULL: all of the source's */
	SyncWebhookAction action;
	json_t	   *record;			/* UPSERT: keyed by api field (owned) */
	char	   *record_id;		/* DELETE, SET_FIELD */
	json_t	   *at;				/* DELETE, SET_FIELD: the event's time as the version field's wire value (owned) */
	char	   *field;			/* SET_FIELD: api field */
	json_t	   *value;			/* SET_FIELD: its value (owned; null: SQL NULL) */
} SyncWebhookChange;

typedef struct SyncProvider
{
	const char *kind;
	const char *const *required_credentials;	/* NULL-terminated; NULL: validate_source checks */

	/* The share of the API's limits a source uses unless told otherwise. */
	double		default_quota_fraction;

	/* The API's limits for this source; seen holds what usage headers said. */
	void		(*limits) (SyncSource *source, const SyncQuota *seen, SyncLimits *limits);

	/* Read usage headers into *seen; false when the response has none. May be NULL. */
	bool		(*observe_quota) (SyncHttpResponse *resp, SyncQuota *seen);

	/*
	 * Seconds the source must wait when resp says it went over a limit, else
	 * 0; *reason names the limit. A Retry-After header overrides the wait.
	 */
	double		(*rate_limit_wait) (SyncHttpResponse *resp, const char **reason);

	/* True for requests that also draw on SyncLimits.search_rate. May be NULL. */
	bool		(*is_search) (const char *method, const char *url);

	/* Check options at create_source/alter_source time; ereport on error. */
	void		(*validate_source) (SyncSource *source);

	/*
	 * Fields of a collection, or ereport(ERROR) if the API does not know it.
	 * Returns the API's canonical collection name in *canonical_name.
	 */
	List	   *(*describe) (SyncSource *source, const char *collection,
							 char **canonical_name);

	/*
	 * Obtain a new access token and save it with sync_save_token(); NULL when
	 * the credentials are the token. Only sync workers call it: see token.c.
	 */
	void		(*refresh_token) (SyncSource *source, SyncPage *page);

	/*
	 * One step of syncing: at most a few API requests, no transaction open.
	 * Fills page; the caller commits it with the new cursor.
	 */
	void		(*step) (SyncSource *source, SyncCollection *collection,
						 SyncPage *page);

	/*
	 * Webhooks; NULL when the provider takes none (its sources reject every
	 * delivery). verify_webhook: NULL when the delivery's signature and
	 * timestamp prove it genuine and fresh, else why not (never quoting a
	 * secret). webhook_changes: the changes (SyncWebhookChange *) a verified
	 * delivery carries, or NULL with *malformed saying what is wrong with it.
	 * Neither makes requests or raises errors for bad input.
	 */
	const char *(*verify_webhook) (SyncSource *source, const SyncWebhookRequest *req);
	List	   *(*webhook_changes) (SyncSource *source, const SyncWebhookRequest *req,
									const char **malformed);
} SyncProvider;

extern const SyncProvider *sync_find_provider(const char *kind);
extern const char *sync_provider_kinds(void);
extern const SyncProvider sync_salesforce_provider;
extern const SyncProvider sync_stripe_provider;
extern const SyncProvider sync_hubspot_provider;
extern const SyncProvider sync_airtable_provider;

/*
 * Salesforce (salesforce.c): requests shared with salesforce_bulk.c, whose
 * Bulk API 2.0 query jobs carry large backfills.
 */
typedef enum SyncSfBulkResult
{
	SYNC_SF_BULK_MORE,			/* page filled (maybe empty: the job runs); run again */
	SYNC_SF_BULK_DONE,			/* the last chunk is in page; *started = the job's creation */
	SYNC_SF_BULK_FALLBACK		/* Bulk API unusable for this object: query with REST */
} SyncSfBulkResult;

extern const char *sync_sf_api_version(SyncSource *source);
extern void sync_sf_request(SyncSource *source, SyncPage *page, const char *method, const char *path,
							const char *body, SyncHttpResponse *resp);
extern void sync_sf_raise(SyncHttpResponse *resp, const char *what) pg_attribute_noreturn();
extern bool sync_sf_bulk_wanted(SyncSource *source, SyncCollection *c, int64 total);
extern SyncSfBulkResult sync_sf_bulk_step(SyncSource *source, SyncCollection *c, SyncPage *page,
										  json_t *cursor, double *started);

/* Saves a source's token (and a rotated refresh token) in its own transaction if none is open. */
extern void sync_save_token(SyncSource *source, json_t *token, json_t *rotated_credentials);
extern void sync_save_refreshed_token(SyncSource *source, json_t *token, const char *new_refresh_token);

/* token.c: refresh a source's token where the result commits on its own. */
extern bool sync_is_worker;
extern void sync_refresh_token(SyncSource *source, SyncPage *page);
extern void sync_worker_serve_token_refresh(void);

/* ---------- budgets (ratelimit.c) and requests (request.c) ---------- */
extern Size sync_budget_shmem_size(void);
extern void sync_budget_shmem_startup(LWLock *lock);
extern bool sync_budget_acquire(SyncSource *source, bool search);
extern bool sync_budget_try_acquire(SyncSource *source, bool search);
extern long sync_budget_wait_ms(int32 source_id);
extern bool sync_budget_note_response(SyncSource *source, SyncHttpResponse *resp, bool attributed);
extern void sync_budget_note_transport_error(SyncSource *source);
extern TimestampTz sync_budget_penalty_until(int32 source_id);
extern void sync_budget_forget(int32 source_id);
extern void sync_budget_reset_stats(int32 source_id);
extern void sync_budget_clear_penalty(int32 source_id);

/*
 * Make one API request for a source within its budget and count it in page
 * (NULL outside a worker's step). HTTP statuses are returned, not raised.
 */
extern void sync_api_request(SyncSource *source, SyncPage *page, const char *method, const char *url,
							 const SyncHttpHeader *headers, int nheaders, const char *body,
							 const char *content_type, SyncHttpResponse *resp);

/*
 * Send the GET the provider will make next now, if the budget has a token to
 * spare at once; the sync_api_request() of that GET adopts the answer
 * without paying again. Call sync_http_pump() between statements meanwhile.
 */
extern bool sync_prefetch_allowed;
extern void sync_api_prefetch(SyncSource *source, SyncPage *page, const char *url,
							  const SyncHttpHeader *headers, int nheaders);

/* ---------- notifications (notify.c, smtp.c) ---------- */
extern void sync_deliver_notifications(void);
extern bool sync_smtp_send(const char *smtp_url, json_t *options, const char *from, const char *recipients,
						   const char *message, char **error);

/* ---------- catalog (catalog.c) ---------- */
extern SyncSource *sync_load_source_by_name(const char *name, bool missing_ok);
extern SyncSource *sync_load_source(int32 id);
extern void sync_free_source(SyncSource *source);
extern SyncCollection *sync_load_collection(int32 id);
extern void sync_free_collection(SyncCollection *collection);
extern void sync_refresh_fields(SyncCollection *collection, List *asked);
extern void sync_lock_extension(void);
extern void sync_catalog_write_begin(bool own_xact);
extern void sync_catalog_write_end(bool own_xact);

/* ---------- records as SQL arguments (records.c) ---------- */
extern char *sync_records_from(List *fields, int first_param);
extern char *sync_record_value(List *fields, const SyncField *f);

/*
 * A page's records column by column, ready for SQL: values[f][i] is record
 * i's value of field f as text (as records.c turns API values into text),
 * nulls[f][i] where it has none. Allocated in the page's memory context.
 */
typedef struct SyncBatch
{
	List	   *fields;			/* SyncField *, in column order */
	int			nfields;
	int			nrecords;
	int			capacity;
	Datum	  **values;
	bool	  **nulls;
	MemoryContext context;		/* where the batch and its values live */
	char	   *arena;			/* room for more values (sync_batch_make_text) */
	Size		arena_left;
} SyncBatch;

extern SyncBatch *sync_batch_new(List *fields, int capacity);
extern int	sync_batch_add(SyncBatch *b);
extern Datum sync_batch_make_text(SyncBatch *b, const char *data, int len);
extern char *sync_batch_text(SyncBatch *b, int f, int i);
extern void sync_batch_remove(SyncBatch *b, int i);
extern SyncBatch *sync_batch_one(SyncBatch *b, int f, int i);
extern SyncBatch *sync_batch_column(SyncBatch *b, int f);
extern SyncBatch *sync_batch_from_json(json_t *records, List *fields);
extern SyncBatch *sync_batch_for_fields(SyncBatch *b, List *fields);
extern Datum sync_json_value_datum(json_t *v, const SyncField *f, bool *isnull);
extern bool sync_json_scan_page(const char *body, size_t len, const char *array_key, List *fields,
								const char *deleted_key, json_t **envelope, SyncBatch **batch);
extern void sync_batch_arrays(SyncBatch *b, Datum *values);
extern Oid *sync_records_argtypes(int n);

/* ---------- store (store.c) ---------- */
extern void sync_apply_page(SyncCollection *collection, SyncPage *page);
extern int64 sync_reject_unfit_values(SyncCollection *collection, SyncBatch *batch);
struct _SPI_plan;
extern ErrorData *sync_try_with_records(struct _SPI_plan *plan, const char *sql, SyncBatch *batch,
										int expected, int64 *processed);
extern bool sync_apply_column_page(SyncCollection *collection, SyncCollection *columns, SyncPage *page);
extern int64 sync_apply_webhook_changes(SyncCollection *collection, SyncPage *page);
extern int64 sync_apply_webhook_field(SyncCollection *collection, const char *record_id, const char *api_field,
									  json_t *value, json_t *at, bool *known_field);

/* ---------- the COPY path of new records (copyload.c) ---------- */
extern char *sync_existing_keys_sql(SyncCollection *c, const char *table);
/* tupleload.c: the same rows straight to the heap, for plain tables (no triggers, defaults) */
extern bool sync_tuple_load_possible(Relation rel, List *fields, AttrNumber *attnums,
									 AttrNumber *synced_at);
extern void sync_append_split_literal(StringInfo buf, const char *s, int len);
extern uint64 sync_tuple_load(Relation rel, SyncBatch *b, const int *rows, int nrows,
							  const bool *split, const AttrNumber *attnums, AttrNumber synced_at);
extern int64 sync_copy_new_records(SyncCollection *c, SyncBatch *batch, struct _SPI_plan *existing,
								   bool *optimistic, SyncBatch **rest);
extern void sync_save_api_fields(SyncCollection *collection, List *fields);

/* ---------- webhooks (webhook.c, webhook_verify.c, webhook_listener.c) ---------- */
#define SYNC_HMAC_SHA256_LEN 32

typedef struct SyncWebhookResult
{
	int			http_status;	/* the answer to the API */
	const char *outcome;		/* applied | ignored | replayed | rejected | failed */
	char	   *reason;			/* why rejected or ignored, or NULL */
	int			events;			/* events in the delivery */
	int			applied;		/* rows written or deleted, and polls asked for */
	int			ignored;		/* events older than the row, or for no synced collection */
	int			replayed;		/* events seen before */
} SyncWebhookResult;

extern void sync_webhook_ingest(const char *source_name, const SyncWebhookRequest *req, const char *via,
								SyncWebhookResult *result);
extern void sync_webhook_record(int32 source_id, const char *source_name, const char *via,
								const char *event_id, const SyncWebhookResult *result);
extern void sync_save_webhook_secret(SyncSource *source, const char *webhook_id, const char *secret);
extern void sync_register_webhook_listener(void);
extern void sync_stop_webhook_listener(Oid dboid, int wait_ms);
extern PGDLLEXPORT void sync_webhook_listener_main(Datum arg) pg_attribute_noreturn();

extern bool sync_hmac_sha256(const void *key, size_t key_len, const void *msg, size_t msg_len,
							 uint8 *digest);
extern char *sync_hex(const uint8 *bytes, size_t len);
extern char *sync_base64_encode(const uint8 *bytes, size_t len);
extern uint8 *sync_base64_decode(const char *text, size_t len, size_t *out_len);
extern bool sync_equal_secret(const char *a, const char *b);
extern const char *sync_webhook_header(const SyncWebhookRequest *req, const char *name);

/* ---------- json helpers (jsonutil.c) ---------- */
extern json_t *sync_json_parse(const char *text, size_t len, const char *what);
extern char *sync_json_dump(json_t *value);
extern void sync_json_append(StringInfo buf, json_t *value);
/* The pieces of it: a string (NUL dropped) and a real, as sync_json_append writes them. */
extern void sync_json_append_string(StringInfo buf, const char *s, size_t len);
extern void sync_json_append_real(StringInfo buf, double value);
extern int64 sync_token_lifetime(json_t *body, int64 dflt);
extern const char *sync_record_key(int i);
extern const char *sync_json_string(json_t *object, const char *key);
extern int64 sync_json_int(json_t *object, const char *key, int64 dflt);
extern double sync_json_number(json_t *object, const char *key, double dflt);
extern bool sync_json_bool(json_t *object, const char *key, bool dflt);

#endif							/* PG_SYNC_EXTENSION_H */
