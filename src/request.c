/*
 * request.c: the one way a provider talks to its API. Every request waits
 * for the source's budget, is counted (requests, bytes, errors, rate-limit
 * answers) in the page that commits with the step, and its response is shown
 * to the budget so usage headers and rate-limit answers take effect for the
 * source's next request, whichever process makes it.
 */
#include "sync.h"

#include "utils/timestamp.h"

/*
 * A backend (add_collection's describe) waits out a short penalty and asks
 * again, as a user would; a worker gives the step up and serves others.
 */
#define BACKEND_RATE_LIMIT_RETRIES 3

void
sync_api_request(SyncSource *source, SyncPage *page, const char *method, const char *url,
				 const SyncHttpHeader *headers, int nheaders, const char *body,
				 const char *content_type, SyncHttpResponse *resp)
{
	const SyncProvider *provider = source->provider;
	bool		search = provider->is_search && provider->is_search(method, url);

	for (int attempt = 0;; attempt++)
	{
		bool		limited;

		if (!sync_budget_acquire(source, search))
		{
			if (page)
				page->penalized = true;
			ereport(ERROR,
					(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
					 errmsg("source \"%s\" is waiting out a rate-limit penalty", source->name),
					 errdetail("The API refused a request of this source as over its limit; see sync.budgets."),
					 errhint("The step runs again once the penalty has passed.")));
		}
		if (page)
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
