/*
 * ratelimit.c: each source's request budget, kept in shared memory so that
 * every process making requests for a source (its database's worker, and a
 * backend describing a collection in add_collection) draws on one budget.
 *
 * A budget is a token bucket of `rate` requests per second holding at most
 * `burst` tokens; HubSpot-style search endpoints draw on a second, slower
 * bucket as well. The rate follows from the source's options and what the
 * provider knows of the API's limits (documented, or read from usage
 * headers): requests_per_second when given, else quota_fraction of the API's
 * rate, never more than quota_fraction of a daily allocation, and slower
 * still when the account's daily allocation is nearly spent. A rate-limit
 * answer (429, Salesforce's REQUEST_LIMIT_EXCEEDED) stops the source's
 * requests until its penalty window has passed.
 */
#include "sync.h"

#include <math.h>

#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#define USE_WINDOW_S 60			/* "budget use" is measured over the last minute */
#define NEARLY_SPENT_SHARE 0.05	/* below 5% of the daily allocation left: slow down */
#define SECONDS_PER_DAY 86400.0

typedef struct TokenBucket
{
	double		rate;			/* tokens per second; 0: this bucket does not limit */
	double		burst;
	double		tokens;
	TimestampTz refilled_at;
} TokenBucket;

typedef struct BudgetSlot
{
	Oid			dboid;
	int32		source_id;		/* 0: free */
	TimestampTz last_used;
	TimestampTz created_at;

	TokenBucket main;
	TokenBucket search;

	/* how the rate was derived, for sync.budgets */
	double		quota_fraction;
	double		api_rate;
	char		basis[128];
	char		limited_by[128];

	SyncQuota	seen;			/* read from the API's usage headers */
	TimestampTz quota_seen_at;

	TimestampTz penalty_until;
	int			consecutive_limited;
	char		penalty_reason[160];

	int64		use_second[USE_WINDOW_S];
	int32		use_count[USE_WINDOW_S];

	/* requests made outside a worker's step (describe in add_collection, ...) */
	int64		other_requests;
	int64		other_bytes;
	int64		other_errors;
	int64		other_rate_limited;
	TimestampTz stats_reset;
} BudgetSlot;

typedef struct BudgetShared
{
	int			nslots;
	BudgetSlot	slots[FLEXIBLE_ARRAY_MEMBER];
} BudgetShared;

static BudgetShared *budgets = NULL;
static LWLock *budget_lock = NULL;

Size
sync_budget_shmem_size(void)
{
	return add_size(offsetof(BudgetShared, slots), mul_size(sizeof(BudgetSlot), sync_max_sources));
}

void
sync_budget_shmem_startup(LWLock *lock)
{
	bool		found;

	budgets = ShmemInitStruct("sync budgets", sync_budget_shmem_size(), &found);
	if (!found)
	{
		memset(budgets, 0, sync_budget_shmem_size());
		budgets->nslots = sync_max_sources;
	}
	budget_lock = lock;
}

/* Caller holds budget_lock. */
static BudgetSlot *
slot_find(Oid dboid, int32 source_id)
{
	for (int i = 0; i < budgets->nslots; i++)
		if (budgets->slots[i].source_id == source_id && budgets->slots[i].dboid == dboid)
			return &budgets->slots[i];
	return NULL;
}

/*
 * Caller holds budget_lock exclusively. When every slot is taken, the one
 * unused longest is given up: its source starts again from an empty bucket.
 */
static BudgetSlot *
slot_find_or_add(Oid dboid, int32 source_id, TimestampTz now)
{
	BudgetSlot *slot = slot_find(dboid, source_id);
	BudgetSlot *oldest = NULL;

	if (slot)
		return slot;
	for (int i = 0; i < budgets->nslots; i++)
	{
		BudgetSlot *s = &budgets->slots[i];

		if (s->source_id == 0)
		{
			oldest = s;
			break;
		}
		if (oldest == NULL || s->last_used < oldest->last_used)
			oldest = s;
	}
	if (oldest->source_id != 0)
		ereport(LOG,
				(errmsg("sync: more sources are in use than sync.max_sources (%d) budgets can track",
						sync_max_sources),
				 errhint("Raise sync.max_sources; a source whose budget is forgotten starts from an empty bucket.")));
	memset(oldest, 0, sizeof(*oldest));
	oldest->dboid = dboid;
	oldest->source_id = source_id;
	oldest->main.refilled_at = now;
	oldest->search.refilled_at = now;
	oldest->seen.daily_remaining = -1;
	oldest->stats_reset = now;
	oldest->created_at = now;
	return oldest;
}

static void
bucket_refill(TokenBucket *b, TimestampTz now)
{
	if (b->rate <= 0)
		return;
	if (now > b->refilled_at)
	{
		b->tokens += b->rate * (double) (now - b->refilled_at) / USECS_PER_SEC;
		if (b->tokens > b->burst)
			b->tokens = b->burst;
	}
	b->refilled_at = now;
}

/* Microseconds until the bucket holds a whole token. */
static int64
bucket_wait_us(TokenBucket *b)
{
	if (b->rate <= 0 || b->tokens >= 1.0)
		return 0;
	return (int64) ceil((1.0 - b->tokens) / b->rate * USECS_PER_SEC);
}

static double
option_double(json_t *options, const char *key, double dflt)
{
	json_t	   *v = json_object_get(options, key);

	return json_is_number(v) ? json_number_value(v) : dflt;
}

typedef struct BudgetConfig
{
	double		rate;
	double		search_rate;
	double		burst;
	double		quota_fraction;
	double		api_rate;
	char		basis[128];
	char		limited_by[128];
} BudgetConfig;

/*
 * The budget a source is given now: requests_per_second when the user set
 * one, else quota_fraction of the API's limit; quota_fraction of a daily
 * allocation caps either unless only an absolute rate was given; and the
 * account's own remaining allocation slows it when nearly spent.
 */
static void
budget_config(SyncSource *source, const SyncQuota *seen, BudgetConfig *cfg)
{
	SyncLimits	limits;
	json_t	   *explicit_rate = json_object_get(source->options, "requests_per_second");
	bool		has_fraction = json_is_number(json_object_get(source->options, "quota_fraction"));
	double		f = option_double(source->options, "quota_fraction", source->provider->default_quota_fraction);

	memset(&limits, 0, sizeof(limits));
	memset(cfg, 0, sizeof(*cfg));
	source->provider->limits(source, seen, &limits);
	cfg->quota_fraction = f;
	cfg->api_rate = limits.rate;
	cfg->burst = Max(1.0, option_double(source->options, "burst", 1.0));

	if (json_is_number(explicit_rate))
	{
		cfg->rate = json_number_value(explicit_rate);
		snprintf(cfg->basis, sizeof(cfg->basis), "requests_per_second %g", cfg->rate);
		cfg->search_rate = limits.search_rate;
	}
	else
	{
		cfg->rate = f * limits.rate;
		snprintf(cfg->basis, sizeof(cfg->basis), "%g%% of %s", f * 100.0, limits.basis ? limits.basis : "the API's limit");
		cfg->search_rate = f * limits.search_rate;
	}

	if ((has_fraction || !json_is_number(explicit_rate)) && limits.daily_limit > 0 &&
		f * limits.daily_limit / SECONDS_PER_DAY < cfg->rate)
	{
		cfg->rate = f * limits.daily_limit / SECONDS_PER_DAY;
		snprintf(cfg->limited_by, sizeof(cfg->limited_by), "daily share: %g%% of %.0f requests a day",
				 f * 100.0, limits.daily_limit);
	}

	if (seen->daily_limit > 0 && seen->daily_remaining >= 0 &&
		seen->daily_remaining < NEARLY_SPENT_SHARE * seen->daily_limit)
	{
		double		factor = Max(seen->daily_remaining / (NEARLY_SPENT_SHARE * seen->daily_limit), 0.01);

		cfg->rate *= factor;
		snprintf(cfg->limited_by, sizeof(cfg->limited_by),
				 "daily allocation nearly spent: %.0f of %.0f requests left",
				 seen->daily_remaining, seen->daily_limit);
	}
	if (cfg->search_rate > 0 && cfg->search_rate > cfg->rate)
		cfg->search_rate = 0;	/* the main bucket is the slower one */
	if (cfg->rate <= 0)
		cfg->rate = 0.001;
}

static void
slot_apply_config(BudgetSlot *slot, const BudgetConfig *cfg)
{
	slot->main.rate = cfg->rate;
	slot->main.burst = cfg->burst;
	slot->search.rate = cfg->search_rate;
	slot->search.burst = 1.0;
	slot->quota_fraction = cfg->quota_fraction;
	slot->api_rate = cfg->api_rate;
	strlcpy(slot->basis, cfg->basis, sizeof(slot->basis));
	strlcpy(slot->limited_by, cfg->limited_by, sizeof(slot->limited_by));
	if (slot->main.tokens > slot->main.burst)
		slot->main.tokens = slot->main.burst;
}

static void
slot_count_use(BudgetSlot *slot, TimestampTz now)
{
	int64		second = now / USECS_PER_SEC;
	int			i = (int) (second % USE_WINDOW_S);

	if (slot->use_second[i] != second)
	{
		slot->use_second[i] = second;
		slot->use_count[i] = 0;
	}
	slot->use_count[i]++;
}

/*
 * Take one request's token if the source's budget has it now, and return 0;
 * else return the microseconds until it might, with *penalty_us those of a
 * rate-limit penalty still to run (0: none).
 */
static int64
budget_take(SyncSource *source, bool search, int64 *penalty_us)
{
	SyncQuota	seen;
	BudgetConfig cfg;
	BudgetSlot *slot;
	TimestampTz now = GetCurrentTimestamp();
	int64		wait_us;

	LWLockAcquire(budget_lock, LW_SHARED);
	slot = slot_find(MyDatabaseId, source->id);
	if (slot)
		seen = slot->seen;
	else
	{
		memset(&seen, 0, sizeof(seen));
		seen.daily_remaining = -1;
	}
	LWLockRelease(budget_lock);
	budget_config(source, &seen, &cfg);

	LWLockAcquire(budget_lock, LW_EXCLUSIVE);
	slot = slot_find_or_add(MyDatabaseId, source->id, now);
	slot_apply_config(slot, &cfg);
	slot->last_used = now;
	bucket_refill(&slot->main, now);
	bucket_refill(&slot->search, now);
	wait_us = bucket_wait_us(&slot->main);
	if (search)
		wait_us = Max(wait_us, bucket_wait_us(&slot->search));
	*penalty_us = Max(slot->penalty_until - now, 0);
	wait_us = Max(wait_us, *penalty_us);
	if (wait_us == 0)
	{
		slot->main.tokens -= 1.0;
		if (search && slot->search.rate > 0)
			slot->search.tokens -= 1.0;
		slot_count_use(slot, now);
	}
	LWLockRelease(budget_lock);
	return wait_us;
}

/*
 * Wait until the source's budget allows one more request, and take it.
 * Interruptible: SIGTERM and query cancel act while we wait. A worker does
 * not sit out a rate-limit penalty inside a step, since it serves other
 * sources too: it gets false back and gives the step up until the penalty
 * has passed.
 */
bool
sync_budget_acquire(SyncSource *source, bool search)
{
	for (;;)
	{
		int64		penalty_us;
		int64		wait_us = budget_take(source, search, &penalty_us);

		if (wait_us == 0)
			return true;
		if (sync_is_worker && penalty_us > USECS_PER_SEC)
			return false;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 (long) Max(1, (wait_us + 999) / 1000), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

/*
 * Take a token only if one is there now: for a request that is worth making
 * early but not worth waiting for (a prefetch). False during any penalty.
 */
bool
sync_budget_try_acquire(SyncSource *source, bool search)
{
	int64		penalty_us;

	return budget_take(source, search, &penalty_us) == 0;
}

/* Milliseconds until the source may make a request (0: now); for the scheduler. */
long
sync_budget_wait_ms(int32 source_id)
{
	BudgetSlot *slot;
	TimestampTz now = GetCurrentTimestamp();
	int64		wait_us = 0;

	LWLockAcquire(budget_lock, LW_EXCLUSIVE);
	slot = slot_find(MyDatabaseId, source_id);
	if (slot)
	{
		bucket_refill(&slot->main, now);
		wait_us = bucket_wait_us(&slot->main);
		if (slot->penalty_until > now)
			wait_us = Max(wait_us, slot->penalty_until - now);
	}
	LWLockRelease(budget_lock);
	return (long) ((wait_us + 999) / 1000);
}

/* Retry-After in seconds (delta-seconds or an HTTP date); -1 when absent or unreadable. */
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

/*
 * Take note of a response: usage headers, and whether the API said we went
 * over its limit, in which case the source waits out the penalty (with
 * jitter, growing when it happens again). Returns true for a rate-limit
 * answer. `attributed` is false for requests made outside a worker's step.
 */
bool
sync_budget_note_response(SyncSource *source, SyncHttpResponse *resp, bool attributed)
{
	SyncQuota	seen;
	bool		have_quota = false;
	const char *reason = NULL;
	double		wait_s = 0;
	BudgetSlot *slot;
	TimestampTz now = GetCurrentTimestamp();

	memset(&seen, 0, sizeof(seen));
	seen.daily_remaining = -1;
	if (source->provider->observe_quota)
		have_quota = source->provider->observe_quota(resp, &seen);
	if (source->provider->rate_limit_wait)
		wait_s = source->provider->rate_limit_wait(resp, &reason);
	if (wait_s > 0)
	{
		double		told = retry_after_seconds(resp);

		if (told >= 0)
			wait_s = Max(told, 0.5);
	}

	LWLockAcquire(budget_lock, LW_EXCLUSIVE);
	slot = slot_find_or_add(MyDatabaseId, source->id, now);
	if (have_quota)
	{
		if (seen.daily_limit > 0)
		{
			slot->seen.daily_limit = seen.daily_limit;
			slot->seen.daily_remaining = seen.daily_remaining;
		}
		if (seen.burst_limit > 0)
		{
			slot->seen.burst_limit = seen.burst_limit;
			slot->seen.burst_window_s = seen.burst_window_s;
		}
		slot->quota_seen_at = now;
	}
	if (wait_s > 0)
	{
		double		grown = pow(2.0, Min(slot->consecutive_limited, 16));
		double		jitter = 1.0 + 0.1 * ((double) random() / (double) PG_INT32_MAX);

		slot->consecutive_limited++;
		wait_s = Min(wait_s * grown, Max(wait_s, (double) sync_max_backoff_s)) * jitter;
		slot->penalty_until = now + (TimestampTz) (wait_s * USECS_PER_SEC);
		slot->main.tokens = Min(slot->main.tokens, 0.0);
		snprintf(slot->penalty_reason, sizeof(slot->penalty_reason), "%s (HTTP %ld)",
				 reason ? reason : "rate limited", resp->status);
	}
	else if (resp->status < 400)
		slot->consecutive_limited = 0;
	if (!attributed)
	{
		slot->other_requests++;
		slot->other_bytes += resp->body_len;
		if (wait_s > 0)
			slot->other_rate_limited++;
		else if (resp->status >= 400)
			slot->other_errors++;
	}
	LWLockRelease(budget_lock);
	return wait_s > 0;
}

/* A request outside a step failed before any response (DNS, reset, timeout). */
void
sync_budget_note_transport_error(SyncSource *source)
{
	BudgetSlot *slot;

	LWLockAcquire(budget_lock, LW_EXCLUSIVE);
	slot = slot_find_or_add(MyDatabaseId, source->id, GetCurrentTimestamp());
	slot->other_requests++;
	slot->other_errors++;
	LWLockRelease(budget_lock);
}

/* When the source may make requests again after a rate-limit answer (0: not penalised). */
TimestampTz
sync_budget_penalty_until(int32 source_id)
{
	BudgetSlot *slot;
	TimestampTz until = 0;

	LWLockAcquire(budget_lock, LW_SHARED);
	slot = slot_find(MyDatabaseId, source_id);
	if (slot)
		until = slot->penalty_until;
	LWLockRelease(budget_lock);
	return until;
}

/* A source id is about to be used for a new source: forget what an old one left. */
void
sync_budget_forget(int32 source_id)
{
	BudgetSlot *slot;

	LWLockAcquire(budget_lock, LW_EXCLUSIVE);
	slot = slot_find(MyDatabaseId, source_id);
	if (slot)
		memset(slot, 0, sizeof(*slot));
	LWLockRelease(budget_lock);
}

/* The user says the API will take requests again (sync.run_now). */
void
sync_budget_clear_penalty(int32 source_id)
{
	BudgetSlot *slot;

	LWLockAcquire(budget_lock, LW_EXCLUSIVE);
	slot = slot_find(MyDatabaseId, source_id);
	if (slot)
	{
		slot->penalty_until = 0;
		slot->consecutive_limited = 0;
	}
	LWLockRelease(budget_lock);
}

void
sync_budget_reset_stats(int32 source_id)
{
	BudgetSlot *slot;

	LWLockAcquire(budget_lock, LW_EXCLUSIVE);
	slot = slot_find(MyDatabaseId, source_id);
	if (slot)
	{
		slot->other_requests = slot->other_bytes = slot->other_errors = slot->other_rate_limited = 0;
		slot->stats_reset = GetCurrentTimestamp();
	}
	LWLockRelease(budget_lock);
}

PG_FUNCTION_INFO_V1(sync_budget_forget_sql);
PG_FUNCTION_INFO_V1(sync_budget_reset_stats_sql);
PG_FUNCTION_INFO_V1(sync_budget_clear_penalty_sql);
PG_FUNCTION_INFO_V1(sync_budget_state);

Datum
sync_budget_forget_sql(PG_FUNCTION_ARGS)
{
	sync_budget_forget(PG_GETARG_INT32(0));
	PG_RETURN_VOID();
}

Datum
sync_budget_clear_penalty_sql(PG_FUNCTION_ARGS)
{
	sync_budget_clear_penalty(PG_GETARG_INT32(0));
	PG_RETURN_VOID();
}

Datum
sync_budget_reset_stats_sql(PG_FUNCTION_ARGS)
{
	sync_budget_reset_stats(PG_GETARG_INT32(0));
	PG_RETURN_VOID();
}

#define BUDGET_STATE_COLS 19

/* One row per source of this database whose budget is in use: see the sync.budgets view. */
Datum
sync_budget_state(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	TimestampTz now = GetCurrentTimestamp();
	int64		this_second = now / USECS_PER_SEC;
	int			n = 0;
	BudgetSlot *copy;

	InitMaterializedSRF(fcinfo, 0);
	copy = palloc(sizeof(BudgetSlot) * budgets->nslots);
	LWLockAcquire(budget_lock, LW_SHARED);
	for (int i = 0; i < budgets->nslots; i++)
		if (budgets->slots[i].source_id != 0 && budgets->slots[i].dboid == MyDatabaseId)
			copy[n++] = budgets->slots[i];
	LWLockRelease(budget_lock);

	for (int i = 0; i < n; i++)
	{
		BudgetSlot *s = &copy[i];
		Datum		values[BUDGET_STATE_COLS];
		bool		nulls[BUDGET_STATE_COLS];
		int64		used = 0;
		int			c = 0;
		/* a budget younger than the window is averaged over its own age */
		double		window = Min((double) USE_WINDOW_S, (double) (this_second - s->created_at / USECS_PER_SEC));

		memset(nulls, 0, sizeof(nulls));
		/* whole seconds before this one: the current second is still filling */
		for (int k = 0; k < USE_WINDOW_S; k++)
			if (s->use_second[k] < this_second && s->use_second[k] >= this_second - USE_WINDOW_S)
				used += s->use_count[k];

		values[c++] = Int32GetDatum(s->source_id);
		values[c++] = Float8GetDatum(s->main.rate);
		values[c++] = Float8GetDatum(s->main.burst);
		values[c++] = Float8GetDatum(s->search.rate);
		nulls[c - 1] = s->search.rate <= 0;
		values[c++] = Float8GetDatum(s->quota_fraction);
		values[c++] = Float8GetDatum(s->api_rate);
		values[c++] = CStringGetTextDatum(s->basis);
		values[c++] = CStringGetTextDatum(s->limited_by);
		nulls[c - 1] = s->limited_by[0] == '\0';
		values[c++] = Float8GetDatum(window >= 1 ? (double) used / window : 0);
		values[c++] = Float8GetDatum(s->seen.daily_limit);
		nulls[c - 1] = s->seen.daily_limit <= 0;
		values[c++] = Float8GetDatum(s->seen.daily_remaining);
		nulls[c - 1] = s->seen.daily_limit <= 0 || s->seen.daily_remaining < 0;
		values[c++] = TimestampTzGetDatum(s->quota_seen_at);
		nulls[c - 1] = s->quota_seen_at == 0;
		values[c++] = TimestampTzGetDatum(s->penalty_until);
		nulls[c - 1] = s->penalty_until <= now;
		values[c++] = CStringGetTextDatum(s->penalty_reason);
		nulls[c - 1] = s->penalty_until <= now || s->penalty_reason[0] == '\0';
		values[c++] = Int64GetDatum(s->other_requests);
		values[c++] = Int64GetDatum(s->other_bytes);
		values[c++] = Int64GetDatum(s->other_errors);
		values[c++] = Int64GetDatum(s->other_rate_limited);
		values[c++] = TimestampTzGetDatum(s->stats_reset);
		Assert(c == BUDGET_STATE_COLS);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
