/*
 * request.c: the one way a provider talks to its API. Every request waits
 * for the source's budget, is counted (requests, bytes, errors, rate-limit
 * answers) in the page that commits with the step, and its response is shown
 * to the budget so usage headers and rate-limit answers take effect for the
 * source's next request, whichever process makes it.
 *
 * A prefetch is paid for when it is sent, since budgets limit requests sent:
 * the request that adopts it does not pay again, but is counted in its page
 * like any other. A prefetch thrown away was a request too; its token stays
 * spent.
 */
#include "sync.h"

#include "utils/timestamp.h"

/*
 * A backend (add_collection's describe) waits out a short penalty and asks
 * again, as a user would; a worker gives the step up and serves others.
 */
#define BACKEND_RATE_LIMIT_RETRIES 3

#define REDACTED "[redacted]"

/*
 * Put REDACTED in place of body[start, end); a span shorter than it becomes
 * asterisks instead. Returns the offset just past the replacement.
 */
static size_t
redact_span(SyncHttpResponse *resp, size_t start, size_t end)
{
	size_t		m = strlen(REDACTED);

	if (end - start < m)
	{
		memset(resp->body + start, '*', end - start);
		return end;
	}
	memcpy(resp->body + start, REDACTED, m);
	memmove(resp->body + start + m, resp->body + end, resp->body_len - end + 1);
	resp->body_len -= end - start - m;
	return start + m;
}

/* Replace each occurrence of secret in the body. */
static void
scrub_string(SyncHttpResponse *resp, const char *secret)
{
	size_t		n = strlen(secret);
	size_t		from = 0;
	char	   *p;

	if (n < 6)
		return;					/* too short to be a credential; would shred ordinary words */
	while (from < resp->body_len &&
		   (p = memmem(resp->body + from, resp->body_len - from, secret, n)) != NULL)
		from = redact_span(resp, p - resp->body, p - resp->body + n);
}

static void
scrub_secret(SyncHttpResponse *resp, const char *secret)
{
	char	   *encoded = sync_http_urlencode(secret);

	scrub_string(resp, secret);
	if (strcmp(encoded, secret) != 0)
		scrub_string(resp, encoded);	/* echoed from a form body */
	pfree(encoded);
}

/* "Bearer <anything>": an echoed Authorization header, whatever token it held. */
static void
scrub_bearer(SyncHttpResponse *resp)
{
	for (size_t i = 0; i + 7 < resp->body_len; i++)
	{
		size_t		end = i + 7;

		if (pg_strncasecmp(resp->body + i, "bearer ", 7) != 0)
			continue;
		while (end < resp->body_len && strchr(" \t\r\n\"',;}]", resp->body[end]) == NULL)
			end++;
		i = redact_span(resp, i + 7, end) - 1;
	}
}

/*
 * Providers quote an error answer in their messages, which end up in
 * sync.status and the log. A broken API or proxy may echo what it was sent:
 * the source's credentials and tokens are cut out of every error body.
 */
static void
scrub_error_body(SyncSource *source, SyncHttpResponse *resp)
{
	const char *key;
	json_t	   *value;

	if (resp->body == NULL)
		return;
	/*
	 * A JSON body may spell an echoed secret with escapes ("sk_\u0074est_…"),
	 * which the provider would decode into its message: compare the decoded
	 * text, written back without needless escapes.
	 */
	{
		json_t	   *parsed = json_loadb(resp->body, resp->body_len, JSON_DECODE_ANY, NULL);

		if (parsed)
		{
			char	   *plain = sync_json_dump(parsed);
			size_t		len = strlen(plain);

			json_decref(parsed);
			if (len <= resp->body_len)
			{
				memcpy(resp->body, plain, len + 1);
				resp->body_len = len;
			}
			pfree(plain);
		}
	}
	json_object_foreach(source->credentials, key, value)
		if (json_is_string(value))
			scrub_secret(resp, json_string_value(value));
	if (json_is_object(source->token))
		json_object_foreach(source->token, key, value)
			if (json_is_string(value) && strstr(key, "token") != NULL)
				scrub_secret(resp, json_string_value(value));
	scrub_bearer(resp);
}

/* The source whose budget paid for the prefetch in flight; 0: none. */
static int32 prefetch_paid_by = 0;

/* a token from the API with a line break would add headers of its choosing */
static void
check_headers(SyncSource *source, const SyncHttpHeader *headers, int nheaders)
{
	for (int i = 0; i < nheaders; i++)
		if (strpbrk(headers[i].value, "\r\n") != NULL)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_EXCEPTION),
					 errmsg("request header \"%s\" of source \"%s\" would contain a line break",
							headers[i].name, source->name),
					 errhint("The token the API issued is malformed; refreshing it again may help.")));
}

static bool
is_search(SyncSource *source, const char *method, const char *url)
{
	const SyncProvider *provider = source->provider;

	return provider->is_search && provider->is_search(method, url);
}

/*
 * Whether this request adopts the source's prefetch. Any request ends the
 * prefetch, adopted or discarded, so what was paid is forgotten here.
 */
static bool
adopts_paid_prefetch(SyncSource *source, const char *method, const char *url,
					 const SyncHttpHeader *headers, int nheaders, const char *body,
					 const char *content_type)
{
	bool		paid = prefetch_paid_by == source->id;

	prefetch_paid_by = 0;
	return paid && strcmp(method, "GET") == 0 && body == NULL && content_type == NULL &&
		sync_http_prefetch_claim(url, headers, nheaders, source->verify_tls);
}

void
sync_api_request(SyncSource *source, SyncPage *page, const char *method, const char *url,
				 const SyncHttpHeader *headers, int nheaders, const char *body,
				 const char *content_type, SyncHttpResponse *resp)
{
	bool		search = is_search(source, method, url);

	check_headers(source, headers, nheaders);

	for (int attempt = 0;; attempt++)
	{
		bool		limited;
		bool		prefetched = adopts_paid_prefetch(source, method, url, headers, nheaders, body,
													  content_type);

		if (!prefetched && !sync_budget_acquire(source, search))
		{
			if (page)
				page->penalized = true;
			ereport(ERROR,
					(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
					 errmsg("source \"%s\" is waiting out a rate-limit penalty", source->name),
					 errdetail("The API refused a request of this source as over its limit; see sync.budgets."),
					 errhint("The step runs again once the penalty has passed.")));
		}
		/* a prefetch was counted by the step that sent it, adopted or not */
		if (page && !prefetched)
			page->requests++;
		PG_TRY();
		{
			sync_http_request(method, url, headers, nheaders, body, content_type, source->verify_tls, resp);
		}
		PG_CATCH();
		{
			if (page)
				page->errors++;
			else
				sync_budget_note_transport_error(source);
			PG_RE_THROW();
		}
		PG_END_TRY();

		if (resp->status < 200 || resp->status >= 300)
			scrub_error_body(source, resp);
		limited = sync_budget_note_response(source, resp, page != NULL);
		if (page)
		{
			page->bytes += (int64) resp->body_len;
			if (limited)
				page->rate_limited++;
			else if (resp->status >= 400)
				page->errors++;
		}
		if (!limited || sync_is_worker || attempt >= BACKEND_RATE_LIMIT_RETRIES ||
			sync_budget_penalty_until(source->id) - GetCurrentTimestamp() > 30 * USECS_PER_SEC)
			return;
	}
}

/*
 * Whether a step may prefetch: the worker allows it when no other collection
 * is due soon, whose request would throw the prefetch away.
 */
bool		sync_prefetch_allowed = false;

/*
 * Send a GET the provider will ask for next (the following page of a walk)
 * now, so the API answers while this step's page is applied; the matching
 * sync_api_request() adopts it. Only when the budget has a token to spare
 * right away: a prefetch is not worth waiting for. Counted in page (the step
 * that sends it), so that every request the API saw is counted once.
 */
void
sync_api_prefetch(SyncSource *source, SyncPage *page, const char *url, const SyncHttpHeader *headers,
				  int nheaders)
{
	char	   *why;

	if (!sync_prefetch_allowed)
		return;
	check_headers(source, headers, nheaders);
	/* the request itself reports a URL it refuses: no token is spent on it here */
	if (!sync_url_is_valid(url, &why))
		return;
	if (!sync_budget_try_acquire(source, is_search(source, "GET", url)))
		return;
	prefetch_paid_by = 0;		/* the older prefetch is gone even if this one fails */
	sync_http_prefetch(url, headers, nheaders, source->verify_tls);
	prefetch_paid_by = source->id;
	if (page)
		page->requests++;
}
