/*
 * webhook_listener.c: a background worker that serves webhook deliveries,
 * POST /webhooks/<source name>, over HTTP/1.1 (libmicrohttpd), and ingests
 * each one through webhook.c in a transaction of its own.
 *
 * Registered at server start only when sync.webhook_listen_address is set.
 * libmicrohttpd runs without threads of its own: this process drives it from
 * a select() loop capped at 100 ms, so every Postgres call happens on the
 * main thread and SIGTERM is answered within 100 ms. Connections are
 * bounded (in all and per client address), idle or slow ones time out, and
 * a body over sync.webhook_max_body is refused before it is read: a flood or
 * a slow client costs this process some sockets, never the sync worker's
 * polling, which runs in another process.
 */
#include "sync.h"

#include <netdb.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <microhttpd.h>

#include "access/xact.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/pmsignal.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#define WL_PATH_PREFIX "/webhooks/"
#define WL_POLL_CAP_MS 100

/* One request in progress: its body so far (malloc'd: it lives across MHD calls). */
typedef struct WlRequest
{
	char	   *body;
	size_t		len;
	size_t		cap;
	bool		answered;		/* a response was queued before the body was read */
	bool		too_large;		/* the body grew over the limit: the rest is read and dropped */
	size_t		dropped;
} WlRequest;

static MemoryContext wl_request_ctx = NULL;

static void
wl_detach(int code, Datum arg)
{
	LWLockAcquire(sync_shared_lock, LW_EXCLUSIVE);
	if (sync_shared->webhook_listener_pid == MyProcPid)
	{
		sync_shared->webhook_listener_pid = 0;
		sync_shared->webhook_listener_db = InvalidOid;
	}
	LWLockRelease(sync_shared_lock);
}

/*
 * DROP DATABASE (or a rename) of the listener's database would fail while
 * it is connected: stop it first. It is started again after 5 s; while its
 * database is gone it logs that, and serves nothing.
 */
void
sync_stop_webhook_listener(Oid dboid, int wait_ms)
{
	pid_t		pid = 0;

	if (sync_shared == NULL)
		return;
	LWLockAcquire(sync_shared_lock, LW_SHARED);
	if (sync_shared->webhook_listener_db == dboid)
		pid = sync_shared->webhook_listener_pid;
	LWLockRelease(sync_shared_lock);
	if (pid == 0)
		return;
	kill(pid, SIGTERM);
	for (int waited = 0; waited < wait_ms; waited += 20)
	{
		bool		gone;

		LWLockAcquire(sync_shared_lock, LW_SHARED);
		gone = sync_shared->webhook_listener_pid != pid;
		LWLockRelease(sync_shared_lock);
		if (gone)
			return;
		CHECK_FOR_INTERRUPTS();
		pg_usleep(20 * 1000L);
	}
	ereport(WARNING,
			(errmsg("sync webhook listener with PID %d did not exit within %d ms", (int) pid, wait_ms)));
}

void
sync_register_webhook_listener(void)
{
	BackgroundWorker worker;

	if (sync_webhook_listen_address == NULL || sync_webhook_listen_address[0] == '\0')
		return;
	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 5;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "sync");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "sync_webhook_listener_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "sync webhook listener");
	snprintf(worker.bgw_type, BGW_MAXLEN, "sync webhook listener");
	RegisterBackgroundWorker(&worker);
}

static enum MHD_Result
wl_answer_counts(struct MHD_Connection *conn, int status, const char *outcome, const char *reason,
				 const SyncWebhookResult *counts)
{
	json_t	   *o = json_pack("{s:s}", "outcome", outcome);
	char	   *text;
	struct MHD_Response *resp;
	enum MHD_Result ret;

	json_object_set_new(o, "reason", reason ? json_string(reason) : json_null());
	if (counts)
	{
		json_object_set_new(o, "events", json_integer(counts->events));
		json_object_set_new(o, "applied", json_integer(counts->applied));
		json_object_set_new(o, "ignored", json_integer(counts->ignored));
		json_object_set_new(o, "replayed", json_integer(counts->replayed));
	}
	text = json_dumps(o, JSON_COMPACT);
	json_decref(o);
	resp = MHD_create_response_from_buffer(strlen(text), text, MHD_RESPMEM_MUST_FREE);
	if (resp == NULL)
	{
		free(text);
		return MHD_NO;
	}
	MHD_add_response_header(resp, "Content-Type", "application/json");
	ret = MHD_queue_response(conn, (unsigned int) status, resp);
	MHD_destroy_response(resp);
	return ret;
}

static enum MHD_Result
wl_answer(struct MHD_Connection *conn, int status, const char *outcome, const char *reason)
{
	return wl_answer_counts(conn, status, outcome, reason, NULL);
}

static enum MHD_Result
wl_collect_header(void *cls, enum MHD_ValueKind kind, const char *key, const char *value)
{
	json_t	   *headers = cls;
	char		lower[256];
	size_t		i;

	if (key == NULL || value == NULL)
		return MHD_YES;
	for (i = 0; key[i] && i < sizeof(lower) - 1; i++)
		lower[i] = pg_tolower((unsigned char) key[i]);
	lower[i] = '\0';
	json_object_set_new(headers, lower, json_string(value));
	return MHD_YES;
}

static enum MHD_Result
wl_collect_query(void *cls, enum MHD_ValueKind kind, const char *key, const char *value)
{
	StringInfo	query = cls;

	appendStringInfo(query, "%c%s%s%s", query->len ? '&' : '?', key, value ? "=" : "", value ? value : "");
	return MHD_YES;
}

static bool wl_extension_ready(void);

/*
 * Record, in a transaction of its own, a delivery answered without being
 * ingested: refused before its body was read, or failed while applied.
 */
static void
wl_record(const char *source_name, int status, const char *outcome, const char *message)
{
	SyncWebhookResult r;

	memset(&r, 0, sizeof(r));
	r.http_status = status;
	r.outcome = outcome;
	r.reason = (char *) message;
	PG_TRY();
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		PushActiveSnapshot(GetTransactionSnapshot());
		if (wl_extension_ready())
		{
			Oid			type = TEXTOID;
			Datum		arg = CStringGetTextDatum(source_name);
			int32		source_id = 0;
			bool		isnull;

			if (SPI_connect() != SPI_OK_CONNECT)
				elog(ERROR, "SPI_connect failed");
			if (SPI_execute_with_args("SELECT id FROM sync.sources WHERE name = $1", 1, &type, &arg, NULL,
									  true, 1) == SPI_OK_SELECT && SPI_processed == 1)
				source_id = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
			SPI_finish();
			sync_webhook_record(source_id, source_name, "listener", NULL, &r);
		}
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		EmitErrorReport();
		FlushErrorState();
		AbortCurrentTransaction();
	}
	PG_END_TRY();
}

/* Whether the extension is installed in this database at the library's version. */
static bool
wl_extension_ready(void)
{
	Oid			ext = get_extension_oid(SYNC_EXTENSION_NAME, true);
	bool		ready = false;

	if (OidIsValid(ext) && SPI_connect() == SPI_OK_CONNECT)
	{
		Oid			type = OIDOID;
		Datum		arg = ObjectIdGetDatum(ext);

		ready = SPI_execute_with_args("SELECT 1 FROM pg_catalog.pg_extension WHERE oid = $1 AND extversion = '"
									  SYNC_VERSION "'", 1, &type, &arg, NULL, true, 1) == SPI_OK_SELECT &&
			SPI_processed == 1;
		SPI_finish();
	}
	return ready;
}

/*
 * Verify and apply a complete delivery in a transaction; never lets an
 * error out (it must not longjmp through libmicrohttpd).
 */
static enum MHD_Result
wl_process(struct MHD_Connection *conn, const char *path, WlRequest *r)
{
	MemoryContext old = MemoryContextSwitchTo(wl_request_ctx);
	const char *source_name = path + strlen(WL_PATH_PREFIX);
	SyncWebhookRequest req;
	SyncWebhookResult result;
	volatile bool ready = true;
	volatile int status = 0;
	char	   *volatile failure = NULL;
	char	   *volatile failure_reason = NULL;
	StringInfoData url;
	const char *host;
	enum MHD_Result ret;

	memset(&req, 0, sizeof(req));
	memset(&result, 0, sizeof(result));
	req.method = "POST";
	req.headers = json_object();
	MHD_get_connection_values(conn, MHD_HEADER_KIND, wl_collect_header, req.headers);
	host = sync_webhook_header(&req, "host");
	initStringInfo(&url);
	appendStringInfo(&url, "http://%s%s", host ? host : "localhost", path);
	{
		StringInfoData query;

		initStringInfo(&query);
		MHD_get_connection_values(conn, MHD_GET_ARGUMENT_KIND, wl_collect_query, &query);
		appendStringInfoString(&url, query.data);
	}
	req.url = url.data;
	req.body = r->body ? r->body : "";
	req.body_len = r->len;
	req.now = (double) GetCurrentTimestamp() / USECS_PER_SEC +
		((POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY);

	PG_TRY();
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		PushActiveSnapshot(GetTransactionSnapshot());
		pgstat_report_activity(STATE_RUNNING, "sync: ingesting a webhook delivery");
		ready = wl_extension_ready();
		if (ready)
		{
			sync_lock_extension();
			MemoryContextSwitchTo(wl_request_ctx);
			sync_webhook_ingest(source_name, &req, "listener", &result);
		}
		PopActiveSnapshot();
		CommitTransactionCommand();
		pgstat_report_activity(STATE_IDLE, NULL);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(wl_request_ctx);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		pgstat_report_activity(STATE_IDLE, NULL);
		/* a user's lock on the table: the API retries later */
		status = edata->sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE ? 503 : 500;
		failure = pstrdup(edata->message ? edata->message : "error");
		/* the message may quote the API's data: everyone reads sync.webhooks, so it stays in the log */
		failure_reason = psprintf("the delivery could not be applied (SQLSTATE %s); see the server log",
								  unpack_sql_state(edata->sqlerrcode));
		ereport(LOG,
				(errmsg("sync: a webhook delivery for source \"%.63s\" failed: %s", source_name, failure)));
	}
	PG_END_TRY();
	MemoryContextSwitchTo(wl_request_ctx);
	json_decref(req.headers);

	if (!ready)
		ret = wl_answer(conn, 503, "failed", "the sync extension is not installed in this database at this version");
	else if (failure)
	{
		wl_record(source_name, status, "failed", failure_reason);
		ret = wl_answer(conn, status, "failed", "the delivery could not be applied; see the server log");
	}
	else
		ret = wl_answer_counts(conn, result.http_status, result.outcome, result.reason, &result);
	MemoryContextSwitchTo(old);
	MemoryContextReset(wl_request_ctx);
	return ret;
}

/* 413 before the body is read (or read further), recorded. */
static enum MHD_Result
wl_too_large(struct MHD_Connection *conn, const char *url, WlRequest *r)
{
	const char *reason = "the body is larger than sync.webhook_max_body";

	r->answered = true;
	wl_record(url + strlen(WL_PATH_PREFIX), 413, "rejected", reason);
	MemoryContextReset(wl_request_ctx);
	return wl_answer(conn, 413, "rejected", reason);
}

static enum MHD_Result
wl_access(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
		  const char *version, const char *upload_data, size_t *upload_data_size, void **con_cls)
{
	WlRequest  *r = *con_cls;

	if (r == NULL)
	{
		const char *length;

		/* the headers are in: refuse what needs no body to be read */
		r = calloc(1, sizeof(WlRequest));
		if (r == NULL)
			return MHD_NO;
		*con_cls = r;
		if (strncmp(url, WL_PATH_PREFIX, strlen(WL_PATH_PREFIX)) != 0 || url[strlen(WL_PATH_PREFIX)] == '\0' ||
			strchr(url + strlen(WL_PATH_PREFIX), '/'))
		{
			r->answered = true;
			return wl_answer(conn, 404, "rejected", "deliveries go to /webhooks/<source name>");
		}
		if (strcmp(method, "POST") != 0)
		{
			r->answered = true;
			return wl_answer(conn, 405, "rejected", "webhook deliveries are POST requests");
		}
		length = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
		if (length && strtoull(length, NULL, 10) > (unsigned long long) sync_webhook_max_body)
			return wl_too_large(conn, url, r);
		return MHD_YES;
	}
	if (*upload_data_size > 0)
	{
		size_t		n = *upload_data_size;

		*upload_data_size = 0;
		if (r->answered)
			return MHD_YES;
		if (r->too_large || r->len + n > (size_t) sync_webhook_max_body)
		{
			/*
			 * Chunked: read on without keeping it, so the client gets its 413
			 * (closing on unread data would reset the connection and lose the
			 * answer); a body beyond 4 times the limit is cut off.
			 */
			r->too_large = true;
			r->dropped += n;
			return r->dropped > 4 * (size_t) sync_webhook_max_body ? MHD_NO : MHD_YES;
		}
		if (r->len + n + 1 > r->cap)
		{
			size_t		cap = Max(r->cap * 2, r->len + n + 1);
			char	   *grown = realloc(r->body, Max(cap, 1024));

			if (grown == NULL)
				return MHD_NO;
			r->body = grown;
			r->cap = Max(cap, 1024);
		}
		memcpy(r->body + r->len, upload_data, n);
		r->len += n;
		r->body[r->len] = '\0';
		return MHD_YES;
	}
	if (r->answered)
		return MHD_YES;
	if (r->too_large)
		return wl_too_large(conn, url, r);
	r->answered = true;
	return wl_process(conn, url, r);
}

static void
wl_completed(void *cls, struct MHD_Connection *conn, void **con_cls, enum MHD_RequestTerminationCode toe)
{
	WlRequest  *r = *con_cls;

	if (r)
	{
		free(r->body);
		free(r);
		*con_cls = NULL;
	}
}

/* host:port (IPv6 as [addr]:port) into an address to bind. */
static struct addrinfo *
wl_resolve(const char *address)
{
	char	   *copy = pstrdup(address);
	char	   *port = strrchr(copy, ':');
	char	   *host = copy;
	struct addrinfo hints;
	struct addrinfo *res = NULL;
	int			err;

	if (port == NULL)
		ereport(FATAL,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid sync.webhook_listen_address \"%s\"", address),
				 errhint("Give host:port, such as 127.0.0.1:8787 or [::1]:8787.")));
	*port++ = '\0';
	if (host[0] == '[' && host[strlen(host) - 1] == ']')
	{
		host[strlen(host) - 1] = '\0';
		host++;
	}
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_PASSIVE;
	err = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
	if (err != 0 || res == NULL)
		ereport(FATAL,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("could not resolve sync.webhook_listen_address \"%s\": %s", address, gai_strerror(err))));
	return res;
}

void
sync_webhook_listener_main(Datum arg)
{
	struct addrinfo *addr;
	struct MHD_Daemon *daemon;
	unsigned int flags = 0;
	unsigned int per_ip;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(sync_webhook_database, NULL, 0);
	pgstat_report_appname("sync webhook listener");
	LWLockAcquire(sync_shared_lock, LW_EXCLUSIVE);
	sync_shared->webhook_listener_pid = MyProcPid;
	sync_shared->webhook_listener_db = MyDatabaseId;
	LWLockRelease(sync_shared_lock);
	before_shmem_exit(wl_detach, 0);
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("TimeZone", "UTC", PGC_SUSET, PGC_S_OVERRIDE);
	{
		char		value[32];

		/* a user's lock on a synced table delays one delivery (answered 503), not the listener */
		snprintf(value, sizeof(value), "%d", sync_lock_timeout_ms);
		SetConfigOption("lock_timeout", value, PGC_SUSET, PGC_S_OVERRIDE);
	}
	wl_request_ctx = AllocSetContextCreate(TopMemoryContext, "sync webhook request", ALLOCSET_DEFAULT_SIZES);

	addr = wl_resolve(sync_webhook_listen_address);
	if (addr->ai_family == AF_INET6)
		flags |= MHD_USE_IPv6;
	/* one client address may take at most half the connections (all of them when there are few) */
	per_ip = sync_webhook_max_connections >= 4 ? (unsigned int) sync_webhook_max_connections / 2 :
		(unsigned int) sync_webhook_max_connections;
	daemon = MHD_start_daemon(flags, 0, NULL, NULL, wl_access, NULL,
							  MHD_OPTION_SOCK_ADDR, addr->ai_addr,
							  MHD_OPTION_CONNECTION_LIMIT, (unsigned int) sync_webhook_max_connections,
							  MHD_OPTION_PER_IP_CONNECTION_LIMIT, per_ip,
							  MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int) sync_webhook_timeout_s,
							  MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t) 64 * 1024,
							  MHD_OPTION_LISTENING_ADDRESS_REUSE, (unsigned int) 1,
							  MHD_OPTION_NOTIFY_COMPLETED, wl_completed, NULL,
							  MHD_OPTION_END);
	if (daemon == NULL)
		ereport(FATAL,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("sync webhook listener could not listen on \"%s\"", sync_webhook_listen_address),
				 errhint("Is the address in use, or not one of this host's?")));
	freeaddrinfo(addr);
	ereport(LOG,
			(errmsg("sync webhook listener listening on %s for database \"%s\"", sync_webhook_listen_address,
					sync_webhook_database)));

	for (;;)
	{
		fd_set		rs;
		fd_set		ws;
		fd_set		es;
		MHD_socket	max = 0;
		MHD_UNSIGNED_LONG_LONG mhd_timeout;
		long		wait_ms = WL_POLL_CAP_MS;
		struct timeval tv;

		CHECK_FOR_INTERRUPTS();
		if (!PostmasterIsAlive())
			proc_exit(1);
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		FD_ZERO(&rs);
		FD_ZERO(&ws);
		FD_ZERO(&es);
		if (MHD_get_fdset2(daemon, &rs, &ws, &es, &max, FD_SETSIZE) != MHD_YES)
			ereport(FATAL, (errmsg("sync webhook listener: could not get its sockets")));
		if (MHD_get_timeout(daemon, &mhd_timeout) == MHD_YES && mhd_timeout < (MHD_UNSIGNED_LONG_LONG) wait_ms)
			wait_ms = (long) mhd_timeout;
		tv.tv_sec = wait_ms / 1000;
		tv.tv_usec = (wait_ms % 1000) * 1000;
		/* EINTR (a signal) just ends the wait: interrupts are checked above */
		(void) select(max + 1, &rs, &ws, &es, &tv);
		MHD_run_from_select(daemon, &rs, &ws, &es);
	}
}
