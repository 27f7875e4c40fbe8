/*
 * notify.c: delivering the e-mails and webhook calls queued in
 * sync.notification_outbox. An event's deliveries are queued in the
 * transaction that made the event happen (see sync._emit), so none is lost;
 * the worker sends each and records it as sent in one stretch during which
 * it does not answer SIGTERM (bounded by short timeouts), so a restart never
 * sends one twice. A failed delivery is retried with backoff and never stops
 * the sync.
 */
#include "sync.h"

#include <math.h>
#include <unistd.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "common/base64.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "pgtime.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#define DELIVERY_BATCH 20
#define WEBHOOK_TIMEOUT_MS 10000
#define RETRY_BASE_S 5

typedef struct Delivery
{
	int64		id;
	int32		target_id;
	char	   *name;
	char	   *kind;
	char	   *target;
	json_t	   *options;
	char	   *event;
	char	   *payload;		/* JSON text */
	char	   *created_at;
	int			attempts;
} Delivery;

static void
begin(void)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	sync_lock_extension();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
}

static void
commit(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
}

pg_noinline static List *
due_deliveries(MemoryContext ctx)
{
	List	   *result = NIL;
	int			ret;

	begin();
	ret = SPI_execute("SELECT o.id, t.name, t.kind, t.target, t.options::text, o.event, o.payload::text, "
					  "       to_char(o.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), o.attempts, "
					  "       t.id "
					  "FROM sync.notification_outbox o JOIN sync.notification_targets t ON t.id = o.target_id "
					  "WHERE o.sent_at IS NULL AND o.next_attempt_at <= now() "
					  "ORDER BY o.id LIMIT " CppAsString2(DELIVERY_BATCH), true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read sync.notification_outbox: %s", SPI_result_code_string(ret));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		MemoryContext old = MemoryContextSwitchTo(ctx);
		Delivery   *d = palloc0(sizeof(Delivery));
		bool		isnull;
		char	   *options = SPI_getvalue(tup, desc, 5);

		d->id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		d->name = SPI_getvalue(tup, desc, 2);
		d->kind = SPI_getvalue(tup, desc, 3);
		d->target = SPI_getvalue(tup, desc, 4);
		d->options = sync_json_parse(options, strlen(options), "notification options");
		d->event = SPI_getvalue(tup, desc, 6);
		d->payload = SPI_getvalue(tup, desc, 7);
		d->created_at = SPI_getvalue(tup, desc, 8);
		d->attempts = DatumGetInt32(SPI_getbinval(tup, desc, 9, &isnull));
		d->target_id = DatumGetInt32(SPI_getbinval(tup, desc, 10, &isnull));
		result = lappend(result, d);
		MemoryContextSwitchTo(old);
	}
	commit();
	return result;
}

/* The body a webhook receives: the event, its delivery id (to spot retries) and its data. */
static char *
webhook_body(Delivery *d)
{
	return psprintf("{\"id\": %lld, \"event\": \"%s\", \"created_at\": \"%s\", \"data\": %s}",
					(long long) d->id, d->event, d->created_at, d->payload);
}

static bool
deliver_webhook(Delivery *d, char **error)
{
	SyncHttpHeader headers[2];
	SyncHttpResponse resp;
	char	   *body = webhook_body(d);
	MemoryContext ctx = CurrentMemoryContext;
	volatile bool ok = false;
	uint32		holdoff = InterruptHoldoffCount;

	headers[0].name = "X-Sync-Event";
	headers[0].value = d->event;
	headers[1].name = "X-Sync-Delivery";
	headers[1].value = psprintf("%lld", (long long) d->id);
	PG_TRY();
	{
		sync_http_request_timeout("POST", d->target, headers, 2, body, "application/json",
								  sync_json_bool(d->options, "verify_tls", true), WEBHOOK_TIMEOUT_MS, &resp);
		if (resp.status >= 200 && resp.status < 300)
			ok = true;
		else
			*error = psprintf("the webhook answered HTTP %ld", resp.status);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		/* raising an error reset the holdoff count: we still hold interrupts */
		InterruptHoldoffCount = holdoff;
		MemoryContextSwitchTo(ctx);
		edata = CopyErrorData();
		FlushErrorState();
		*error = pstrdup(edata->message);
	}
	PG_END_TRY();
	return ok;
}

static const char *
payload_field(json_t *payload, const char *key)
{
	const char *v = sync_json_string(payload, key);

	return v ? v : "?";
}

/* Quoted-printable (RFC 2045): the body is 7-bit whatever the payload holds. */
static char *
quoted_printable(const char *text)
{
	StringInfoData out;
	int			line = 0;

	initStringInfo(&out);
	for (const unsigned char *p = (const unsigned char *) text; *p; p++)
	{
		bool		crlf = (p[0] == '\r' && p[1] == '\n');
		bool		at_line_end = (p[1] == '\0' || (p[1] == '\r' && p[2] == '\n'));
		char		piece[4];

		if (crlf)
		{
			appendStringInfoString(&out, "\r\n");
			p++;
			line = 0;
			continue;
		}
		if ((*p >= 33 && *p <= 126 && *p != '=') || ((*p == ' ' || *p == '\t') && !at_line_end))
			snprintf(piece, sizeof(piece), "%c", *p);
		else
			snprintf(piece, sizeof(piece), "=%02X", *p);
		if (line + strlen(piece) > 75)
		{
			appendStringInfoString(&out, "=\r\n");
			line = 0;
		}
		appendStringInfoString(&out, piece);
		line += strlen(piece);
	}
	return out.data;
}

/* A header value as an RFC 2047 encoded word when it is not plain ASCII. */
static char *
header_text(const char *text)
{
	int			len = strlen(text);
	char	   *b64;
	int			n;

	for (const unsigned char *p = (const unsigned char *) text; *p; p++)
		if (*p >= 128 || *p < 32)
		{
			b64 = palloc0(pg_b64_enc_len(len) + 1);
			n = pg_b64_encode(text, len, b64, pg_b64_enc_len(len));
			b64[Max(n, 0)] = '\0';
			return psprintf("=?UTF-8?B?%s?=", b64);
		}
	return pstrdup(text);
}

/* An RFC 5322 message: headers, blank line, a short text and the event's JSON. */
static char *
email_message(Delivery *d, const char *from)
{
	json_t	   *payload = sync_json_parse(d->payload, strlen(d->payload), "notification payload");
	StringInfoData msg;
	char		host[256];
	const char *subject;
	pg_time_t	now = (pg_time_t) time(NULL);
	char		date[128];
	int			body_start;
	char	   *body;

	if (gethostname(host, sizeof(host)) != 0)
		strlcpy(host, "localhost", sizeof(host));
	host[sizeof(host) - 1] = '\0';
	pg_strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S +0000", pg_gmtime(&now));
	if (strcmp(d->event, "backfill_completed") == 0)
		subject = psprintf("[sync] %s.%s: backfill completed (%lld records)",
						   payload_field(payload, "source"), payload_field(payload, "collection"),
						   (long long) sync_json_int(payload, "records", 0));
	else
		subject = psprintf("[sync] %s.%s is failing", payload_field(payload, "source"),
						   payload_field(payload, "collection"));

	initStringInfo(&msg);
	appendStringInfo(&msg, "Date: %s\r\n", date);
	appendStringInfo(&msg, "From: %s\r\n", from);
	appendStringInfo(&msg, "To: %s\r\n", d->target);
	appendStringInfo(&msg, "Subject: %s\r\n", header_text(subject));
	appendStringInfo(&msg, "Message-ID: <sync-%lld@%s>\r\n", (long long) d->id, host);
	appendStringInfo(&msg, "X-Sync-Event: %s\r\n", d->event);
	appendStringInfo(&msg, "X-Sync-Delivery: %lld\r\n", (long long) d->id);
	appendStringInfoString(&msg, "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
						   "Content-Transfer-Encoding: quoted-printable\r\n\r\n");
	body_start = msg.len;
	if (strcmp(d->event, "backfill_completed") == 0)
		appendStringInfo(&msg, "The backfill of %s (source %s) into %s completed: %lld records.\r\n",
						 payload_field(payload, "collection"), payload_field(payload, "source"),
						 payload_field(payload, "table"), (long long) sync_json_int(payload, "records", 0));
	else
		appendStringInfo(&msg, "Syncing %s (source %s) has failed %lld times in a row: %s\r\n",
						 payload_field(payload, "collection"), payload_field(payload, "source"),
						 (long long) sync_json_int(payload, "consecutive_failures", 0),
						 payload_field(payload, "error"));
	appendStringInfo(&msg, "\r\n%s\r\n", d->payload);
	json_decref(payload);
	body = quoted_printable(msg.data + body_start);
	msg.len = body_start;
	msg.data[body_start] = '\0';
	appendStringInfoString(&msg, body);
	return msg.data;
}

static bool
deliver_email(Delivery *d, char **error)
{
	const char *from = sync_json_string(d->options, "from");
	char		host[256];

	if (from == NULL)
	{
		if (gethostname(host, sizeof(host)) != 0)
			strlcpy(host, "localhost", sizeof(host));
		host[sizeof(host) - 1] = '\0';
		from = psprintf("sync@%s", host);
	}
	return sync_smtp_send(sync_json_string(d->options, "smtp_url"), d->options, from, d->target,
						  email_message(d, from), error);
}

static void
record_attempt(Delivery *d, bool ok, const char *error)
{
	Oid			types[4] = {INT8OID, BOOLOID, TEXTOID, INT4OID};
	Datum		args[4];
	char		nulls[4] = "    ";
	int			ret;

	args[0] = Int64GetDatum(d->id);
	args[1] = BoolGetDatum(ok);
	args[2] = CStringGetTextDatum(error ? error : "");
	nulls[2] = error ? ' ' : 'n';
	args[3] = Int32GetDatum(Min((int) (RETRY_BASE_S * pow(2.0, Min(d->attempts, 16))), sync_max_backoff_s));
	begin();
	ret = SPI_execute_with_args("UPDATE sync.notification_outbox SET attempts = attempts + 1, "
								"  sent_at = CASE WHEN $2 THEN now() END, last_error = $3, "
								"  next_attempt_at = now() + make_interval(secs => $4) "
								"WHERE id = $1",
								4, types, args, nulls, false, 0);
	if (ret != SPI_OK_UPDATE)
		elog(ERROR, "could not update sync.notification_outbox: %s", SPI_result_code_string(ret));
	if (!ok)
	{
		/* the target's other deliveries wait as long: a dead receiver must not hold up the sync */
		Oid			ttypes[2] = {INT4OID, INT8OID};
		Datum		targs[2] = {Int32GetDatum(d->target_id), Int64GetDatum(d->id)};

		ret = SPI_execute_with_args("UPDATE sync.notification_outbox o SET next_attempt_at = f.next_attempt_at "
									"FROM sync.notification_outbox f "
									"WHERE f.id = $2 AND o.target_id = $1 AND o.sent_at IS NULL "
									"  AND o.next_attempt_at < f.next_attempt_at",
									2, ttypes, targs, NULL, false, 0);
		if (ret != SPI_OK_UPDATE)
			elog(ERROR, "could not update sync.notification_outbox: %s", SPI_result_code_string(ret));
	}
	commit();
	if (!ok)
		ereport(LOG,
				(errmsg("sync could not deliver notification %lld (\"%s\", %s): %s",
						(long long) d->id, d->name, d->event, error ? error : "unknown error"),
				 errhint("It is retried; see sync.notifications.")));
}

/* Send what is due. Called by the worker between steps, with no transaction open. */
void
sync_deliver_notifications(void)
{
	MemoryContext ctx = AllocSetContextCreate(CurrentMemoryContext, "sync notifications", ALLOCSET_DEFAULT_SIZES);
	MemoryContext old = MemoryContextSwitchTo(ctx);
	List	   *due = due_deliveries(ctx);
	ListCell   *lc;

	List	   *failed_targets = NIL;

	foreach(lc, due)
	{
		Delivery   *d = lfirst(lc);
		char	   *error = NULL;
		bool		ok;
		uint32		holdoff = InterruptHoldoffCount;

		/* a target that just failed is not tried again in this round: it would hold up the sync */
		if (list_member_int(failed_targets, d->target_id))
			continue;

		pgstat_report_activity(STATE_RUNNING, "sync: delivering a notification");
		/* sending and recording it sent happen together: a SIGTERM waits (timeouts bound it) */
		HOLD_INTERRUPTS();
		PG_TRY();
		{
			if (strcmp(d->kind, "webhook") == 0)
				ok = deliver_webhook(d, &error);
			else
				ok = deliver_email(d, &error);
			record_attempt(d, ok, error);
			if (!ok)
				failed_targets = lappend_int(failed_targets, d->target_id);
		}
		PG_CATCH();
		{
			InterruptHoldoffCount = holdoff;
			PG_RE_THROW();
		}
		PG_END_TRY();
		RESUME_INTERRUPTS();
		CHECK_FOR_INTERRUPTS();
	}
	MemoryContextSwitchTo(old);
	foreach(lc, due)
		json_decref(((Delivery *) lfirst(lc))->options);
	MemoryContextDelete(ctx);
}
