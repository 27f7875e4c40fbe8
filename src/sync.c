/*
 * sync.c: module load. Defines the settings, reserves shared memory, registers
 * the launcher and hooks DROP DATABASE so a database's worker never blocks it.
 */
#include "sync.h"

#include "commands/extension.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "storage/ipc.h"
#include "tcop/utility.h"
#include "utils/guc.h"
#include "commands/dbcommands.h"

PG_MODULE_MAGIC;

bool		sync_enabled = true;
int			sync_max_databases = 64;
int			sync_max_sources = 256;
int			sync_notify_after_failures = 5;
int			sync_launcher_naptime_s = 10;
int			sync_http_timeout_ms = 60000;
int			sync_http_connect_timeout_ms = 10000;
int			sync_max_response_bytes = 256 * 1024 * 1024;
int			sync_max_backoff_s = 300;
int			sync_lock_timeout_ms = 1000;
char	   *sync_user_agent = NULL;
bool		sync_allow_insecure_tls = false;
char	   *sync_webhook_listen_address = NULL;
char	   *sync_webhook_database = NULL;
int			sync_webhook_max_body = 1024 * 1024;
int			sync_webhook_max_connections = 64;
int			sync_webhook_timeout_s = 10;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;
static ProcessUtility_hook_type prev_process_utility_hook = NULL;

void		_PG_init(void);

static void
sync_define_settings(void)
{
	DefineCustomBoolVariable("sync.enabled",
							 "Whether sync workers make API requests.",
							 "When off, workers stay connected but idle.",
							 &sync_enabled, true, PGC_SIGHUP, 0,
							 NULL, NULL, NULL);
	DefineCustomIntVariable("sync.max_databases",
							"Most databases that can run a sync worker.",
							NULL, &sync_max_databases, 64, 1, 1024,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("sync.max_sources",
							"Most sources, over all databases, whose request budgets are tracked.",
							"Each takes a few hundred bytes of shared memory.",
							&sync_max_sources, 256, 1, 65536,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("sync.notify_after_failures",
							"Failed attempts in a row after which a collection counts as failing.",
							"Then NOTIFY sync_collection_failing is sent, and e-mail/webhook notifications.",
							&sync_notify_after_failures, 5, 1, 1000000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("sync.launcher_naptime",
							"How often the launcher looks for new databases.",
							NULL, &sync_launcher_naptime_s, 10, 1, 3600,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("sync.http_timeout",
							"Longest an API request may take.",
							NULL, &sync_http_timeout_ms, 60000, 100, 600000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("sync.http_connect_timeout",
							"Longest connecting to an API may take.",
							NULL, &sync_http_connect_timeout_ms, 10000, 100, 600000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("sync.max_response_bytes",
							"Largest API response body accepted.",
							NULL, &sync_max_response_bytes, 256 * 1024 * 1024,
							1024, INT_MAX, PGC_SIGHUP, GUC_UNIT_BYTE, NULL, NULL, NULL);
	DefineCustomIntVariable("sync.max_backoff",
							"Longest wait before retrying a failing collection.",
							NULL, &sync_max_backoff_s, 300, 1, 86400,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("sync.lock_timeout",
							"Longest a worker waits for a lock on a synced table.",
							"A user's lock on one table delays that collection only.",
							&sync_lock_timeout_ms, 1000, 1, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomStringVariable("sync.user_agent",
							   "User-Agent header of API requests.",
							   NULL, &sync_user_agent, "pg-sync/" SYNC_VERSION,
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("sync.allow_insecure_tls",
							 "Whether a source may turn TLS verification off.",
							 "Sources still verify unless their options say verify_tls=false.",
							 &sync_allow_insecure_tls, false, PGC_SUSET, GUC_SUPERUSER_ONLY,
							 NULL, NULL, NULL);
	DefineCustomStringVariable("sync.webhook_listen_address",
							   "Address (host:port) the webhook listener serves deliveries on.",
							   "Empty: no listener. 127.0.0.1:8787 takes deliveries from this host only.",
							   &sync_webhook_listen_address, "",
							   PGC_POSTMASTER, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomStringVariable("sync.webhook_database",
							   "Database whose sources the webhook listener serves.",
							   NULL, &sync_webhook_database, "postgres",
							   PGC_POSTMASTER, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomIntVariable("sync.webhook_max_body",
							"Largest webhook delivery body the listener accepts.",
							"Larger ones are answered 413 before they are read.",
							&sync_webhook_max_body, 1024 * 1024, 1024, 64 * 1024 * 1024,
							PGC_SIGHUP, GUC_UNIT_BYTE, NULL, NULL, NULL);
	DefineCustomIntVariable("sync.webhook_max_connections",
							"Most connections the webhook listener serves at once.",
							"One client address may hold at most half of them.",
							&sync_webhook_max_connections, 64, 1, 1000,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("sync.webhook_timeout",
							"Longest a webhook connection may stay idle.",
							"A client that sends nothing for this long is disconnected.",
							&sync_webhook_timeout_s, 10, 1, 3600,
							PGC_POSTMASTER, GUC_UNIT_S, NULL, NULL, NULL);
	MarkGUCPrefixReserved("sync");
}

static void
sync_shmem_request_hook(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	sync_shmem_request();
}

static void
sync_shmem_startup_hook(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	sync_shmem_startup();
}

/*
 * Our worker's connection would make DROP DATABASE fail with "database is
 * being accessed by other users": stop the worker first. If the DROP then
 * fails for another reason, the launcher restarts the worker after a pause.
 */
static void
sync_process_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
					 ProcessUtilityContext context, ParamListInfo params,
					 QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *parsetree = pstmt->utilityStmt;

	if (IsA(parsetree, DropdbStmt))
	{
		DropdbStmt *stmt = (DropdbStmt *) parsetree;
		Oid			dboid = get_database_oid(stmt->dbname, true);

		if (OidIsValid(dboid))
		{
			sync_stop_database_worker(dboid, 10000);
			sync_stop_webhook_listener(dboid, 10000);
		}
	}
	else if (IsA(parsetree, RenameStmt) && ((RenameStmt *) parsetree)->renameType == OBJECT_DATABASE)
	{
		Oid			dboid = get_database_oid(((RenameStmt *) parsetree)->subname, true);

		if (OidIsValid(dboid))
		{
			sync_stop_database_worker(dboid, 10000);
			sync_stop_webhook_listener(dboid, 10000);
		}
	}

	if (prev_process_utility_hook)
		prev_process_utility_hook(pstmt, queryString, readOnlyTree, context, params,
								  queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params,
								queryEnv, dest, qc);

	/*
	 * The worker learns at commit that its extension was dropped, not at its
	 * next round, and gives up a request in flight.
	 */
	if (IsA(parsetree, DropStmt) && ((DropStmt *) parsetree)->removeType == OBJECT_EXTENSION &&
		!OidIsValid(get_extension_oid(SYNC_EXTENSION_NAME, true)))
		sync_extension_dropped_at_commit();
}

void
_PG_init(void)
{
	if (IsBinaryUpgrade)
		return;

	if (!process_shared_preload_libraries_in_progress)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("sync must be loaded via shared_preload_libraries"),
				 errhint("Add sync to shared_preload_libraries in postgresql.conf and restart the server.")));

	sync_define_settings();

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = sync_shmem_request_hook;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = sync_shmem_startup_hook;
	prev_process_utility_hook = ProcessUtility_hook;
	ProcessUtility_hook = sync_process_utility;

	sync_register_launcher();
	sync_register_webhook_listener();
}
