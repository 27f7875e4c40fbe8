/*
 * api.c: SQL-callable C functions behind the sync.* API: argument checks
 * that need a provider, schema discovery for add_collection, wakes, and
 * waiting for a backfill.
 */
#include "sync.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "parser/parse_coerce.h"
#include "parser/parse_type.h"
#include "miscadmin.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(sync_validate_source);
PG_FUNCTION_INFO_V1(sync_describe);
PG_FUNCTION_INFO_V1(sync_identifier);
PG_FUNCTION_INFO_V1(sync_wake);
PG_FUNCTION_INFO_V1(sync_wake_trigger);
PG_FUNCTION_INFO_V1(sync_register_database);
PG_FUNCTION_INFO_V1(sync_wait_for_backfill);
PG_FUNCTION_INFO_V1(sync_worker_pid);
PG_FUNCTION_INFO_V1(sync_assignable);

static json_t *
jsonb_arg_to_json(FunctionCallInfo fcinfo, int argno, const char *what)
{
	Jsonb	   *jb = PG_GETARG_JSONB_P(argno);
	char	   *text = JsonbToCString(NULL, &jb->root, VARSIZE(jb));

	return sync_json_parse(text, strlen(text), what);
}

static void
check_positive_number_option(json_t *options, const char *key, double min)
{
	json_t	   *v = json_object_get(options, key);

	if (v == NULL || json_is_null(v))
		return;
	if (!json_is_number(v) || json_number_value(v) < min)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("option \"%s\" must be a number of at least %g", key, min)));
}

static void
check_fraction_option(json_t *options, const char *key)
{
	json_t	   *v = json_object_get(options, key);

	if (v == NULL || json_is_null(v))
		return;
	if (!json_is_number(v) || json_number_value(v) <= 0 || json_number_value(v) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("option \"%s\" must be a number greater than 0 and at most 1", key),
				 errdetail("It is the share of the API's rate limit and daily quota the source may use."),
				 errhint("For example {\"%s\": 0.2} uses a fifth of the API's limits.", key)));
}

/* Checks shared by every provider; the provider checks its own options. */
static void
validate_common(SyncSource *source)
{
	char	   *why;
	json_t	   *verify;

	if (!sync_url_is_valid(source->base_url, &why))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid base_url \"%s\": %s", source->base_url, why),
				 errhint("Give the API's address, such as https://acme.my.salesforce.com.")));

	if (!json_is_object(source->credentials))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("credentials must be a JSON object")));
	for (const char *const *key = source->provider->required_credentials; key && *key; key++)
	{
		const char *v = sync_json_string(source->credentials, *key);

		if (v == NULL || v[0] == '\0')
		{
			StringInfoData all;

			initStringInfo(&all);
			for (const char *const *k = source->provider->required_credentials; *k; k++)
				appendStringInfo(&all, "%s\"%s\"", all.len ? ", " : "", *k);
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("credentials of a %s source lack \"%s\"", source->kind, *key),
					 errdetail("Credentials of a %s source need the keys %s, each a non-empty string.",
							   source->kind, all.data)));
		}
	}

	if (!json_is_object(source->options))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("options must be a JSON object")));
	check_positive_number_option(source->options, "requests_per_second", 0.0001);
	check_fraction_option(source->options, "quota_fraction");
	check_positive_number_option(source->options, "burst", 1);
	check_positive_number_option(source->options, "poll_interval", 0);
	verify = json_object_get(source->options, "verify_tls");
	if (verify && !json_is_boolean(verify))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("option \"verify_tls\" must be true or false")));
	if (verify && json_is_false(verify) && !sync_allow_insecure_tls)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("turning TLS verification off is not allowed"),
				 errhint("A superuser can allow it with sync.allow_insecure_tls = on.")));
}

Datum
sync_validate_source(PG_FUNCTION_ARGS)
{
	SyncSource	source;

	memset(&source, 0, sizeof(source));
	source.kind = text_to_cstring(PG_GETARG_TEXT_PP(0));
	source.base_url = text_to_cstring(PG_GETARG_TEXT_PP(1));
	source.provider = sync_find_provider(source.kind);
	if (source.provider == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown source kind \"%s\"", source.kind),
				 errhint("Known kinds are: %s.", sync_provider_kinds())));
	source.credentials = jsonb_arg_to_json(fcinfo, 2, "credentials");
	PG_TRY();
	{
		source.options = jsonb_arg_to_json(fcinfo, 3, "options");
		validate_common(&source);
		if (source.provider->validate_source)
			source.provider->validate_source(&source);
	}
	PG_FINALLY();
	{
		json_decref(source.credentials);
		json_decref(source.options);
	}
	PG_END_TRY();
	PG_RETURN_VOID();
}

/*
 * Ask the API for a collection's fields. Runs in the caller's backend: an
 * unknown collection is an error of sync.add_collection, not a log line later.
 */
Datum
sync_describe(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	char	   *source_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *collection = text_to_cstring(PG_GETARG_TEXT_PP(1));
	SyncSource *volatile source;
	List	   *volatile fields = NIL;
	char	   *volatile canonical = NULL;
	ListCell   *lc;
	int			position = 0;

	InitMaterializedSRF(fcinfo, 0);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	source = sync_load_source_by_name(source_name, false);
	SPI_finish();

	PG_TRY();
	{
		if (source->provider == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("source \"%s\" has unknown kind \"%s\"", source->name, source->kind)));
		fields = source->provider->describe(source, collection, (char **) &canonical);
	}
	PG_FINALLY();
	{
		sync_free_source(source);
	}
	PG_END_TRY();

	foreach(lc, fields)
	{
		SyncField  *f = lfirst(lc);
		Datum		values[10];
		bool		nulls[10] = {false};

		values[0] = CStringGetTextDatum(canonical);
		values[1] = Int32GetDatum(++position);
		values[2] = CStringGetTextDatum(f->api_field);
		values[3] = CStringGetTextDatum(f->api_type);
		values[4] = CStringGetTextDatum(f->column_name);
		values[5] = CStringGetTextDatum(f->column_type);
		values[6] = CStringGetTextDatum(f->wire_type);
		if (f->convert_sql)
			values[7] = CStringGetTextDatum(f->convert_sql);
		else
			nulls[7] = true;
		values[8] = BoolGetDatum(f->is_key);
		values[9] = BoolGetDatum(f->is_version);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

Datum
sync_identifier(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(sync_identifier_from_api_name(text_to_cstring(PG_GETARG_TEXT_PP(0)))));
}

Datum
sync_wake(PG_FUNCTION_ARGS)
{
	sync_wake_worker_at_commit();
	PG_RETURN_VOID();
}

Datum
sync_wake_trigger(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("sync._wake_trigger() must be called as a trigger")));
	sync_wake_worker_at_commit();
	return PointerGetDatum(NULL);
}

Datum
sync_register_database(PG_FUNCTION_ARGS)
{
	sync_request_worker_at_commit();
	PG_RETURN_VOID();
}

static bool
backfill_completed(int32 collection_id)
{
	Oid			argtype = INT4OID;
	Datum		arg = Int32GetDatum(collection_id);
	bool		done = false;
	int			ret;

	ret = SPI_execute_with_args("SELECT backfill_completed_at IS NOT NULL FROM sync.collection_state "
								"WHERE collection_id = $1", 1, &argtype, &arg, NULL, false, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read sync.collection_state: %s", SPI_result_code_string(ret));
	if (SPI_processed == 1)
	{
		bool		isnull;

		done = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	}
	else
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("collection was removed while waiting for its backfill")));
	return done;
}

Datum
sync_wait_for_backfill(PG_FUNCTION_ARGS)
{
	int32		collection_id = PG_GETARG_INT32(0);
	Interval   *timeout = PG_GETARG_INTERVAL_P(1);
	TimestampTz deadline;
	bool		done;

	if (IsolationUsesXactSnapshot())
		ereport(ERROR,
				(errcode(ERRCODE_ACTIVE_SQL_TRANSACTION),
				 errmsg("sync.wait_for_backfill() cannot see progress in a REPEATABLE READ or SERIALIZABLE transaction"),
				 errhint("Call it in a READ COMMITTED transaction, or outside a transaction block.")));

	deadline = DatumGetTimestampTz(DirectFunctionCall2(timestamptz_pl_interval,
													   TimestampTzGetDatum(GetCurrentTimestamp()),
													   IntervalPGetDatum(timeout)));
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	for (;;)
	{
		TimestampTz now;
		long		wait_ms;

		done = backfill_completed(collection_id);
		now = GetCurrentTimestamp();
		if (done || now >= deadline)
			break;
		wait_ms = Min(200, (deadline - now) / 1000 + 1);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, wait_ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
	SPI_finish();
	PG_RETURN_BOOL(done);
}

Datum
sync_worker_pid(PG_FUNCTION_ARGS)
{
	SyncDatabaseSlot *slot;
	pid_t		pid = 0;

	LWLockAcquire(sync_shared_lock, LW_SHARED);
	slot = sync_slot_find(MyDatabaseId);
	if (slot)
		pid = slot->worker_pid;
	LWLockRelease(sync_shared_lock);
	if (pid == 0)
		PG_RETURN_NULL();
	PG_RETURN_INT32((int32) pid);
}

/* Whether a value of from_type can be stored in a column of to_type as an INSERT would. */
Datum
sync_assignable(PG_FUNCTION_ARGS)
{
	Oid			from_type;
	Oid			to_type;
	int32		typmod;

	parseTypeString(text_to_cstring(PG_GETARG_TEXT_PP(0)), &from_type, &typmod, false);
	parseTypeString(text_to_cstring(PG_GETARG_TEXT_PP(1)), &to_type, &typmod, false);
	PG_RETURN_BOOL(can_coerce_type(1, &from_type, &to_type, COERCION_ASSIGNMENT));
}
