/*
 * http.c: API requests through libcurl. One easy handle per process keeps
 * connections alive between requests; the transfer runs on a multi handle so
 * the process can answer SIGTERM and query cancel within a poll interval,
 * even in the middle of a slow response. Nothing here longjmps through
 * libcurl: callbacks only copy bytes, errors are raised after the transfer.
 */
#include "sync.h"

#include <curl/curl.h>
#include <time.h>

#include "miscadmin.h"

#define SYNC_HTTP_POLL_MS 100

typedef struct HttpBuffer
{
	char	   *data;
	size_t		len;
	size_t		cap;
	bool		too_large;
} HttpBuffer;

static CURL *easy = NULL;
static CURLM *multi = NULL;
static bool curl_ready = false;

/* Response buffers are malloc'd: a palloc failure must not longjmp out of curl. */
static HttpBuffer body_buf;
static HttpBuffer header_buf;	/* every header line of the final response */

static void
buffer_reset(HttpBuffer *b)
{
	b->len = 0;
	b->too_large = false;
	if (b->data)
		b->data[0] = '\0';
}

static bool
buffer_append(HttpBuffer *b, const char *data, size_t n, size_t limit)
{
	if (b->len + n + 1 > limit)
	{
		b->too_large = true;
		return false;
	}
	if (b->len + n + 1 > b->cap)
	{
		size_t		cap = b->cap ? b->cap : 64 * 1024;
		char	   *grown;

		while (cap < b->len + n + 1)
			cap *= 2;
		grown = realloc(b->data, cap);
		if (grown == NULL)
			return false;
		b->data = grown;
		b->cap = cap;
	}
	memcpy(b->data + b->len, data, n);
	b->len += n;
	b->data[b->len] = '\0';
	return true;
}

static size_t
write_body(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	size_t		n = size * nmemb;

	if (!buffer_append(&body_buf, ptr, n, (size_t) sync_max_response_bytes))
		return 0;				/* makes curl fail with CURLE_WRITE_ERROR */
	return n;
}

static size_t
write_header(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	size_t		n = size * nmemb;

	/* A status line starts a new response (after 100 Continue or a redirect). */
	if (n >= 5 && strncmp(ptr, "HTTP/", 5) == 0)
		buffer_reset(&header_buf);
	buffer_append(&header_buf, ptr, n, 64 * 1024);
	return n;
}

void
sync_http_init(void)
{
	if (curl_ready)
		return;
	if (curl_global_init(CURL_GLOBAL_ALL) != CURLE_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not initialize libcurl")));
	curl_ready = true;
}

void
sync_http_cleanup(void)
{
	if (multi && easy)
		curl_multi_remove_handle(multi, easy);
	if (easy)
		curl_easy_cleanup(easy);
	if (multi)
		curl_multi_cleanup(multi);
	easy = NULL;
	multi = NULL;
}

static void
ensure_handles(void)
{
	sync_http_init();
	if (multi == NULL)
		multi = curl_multi_init();
	if (easy == NULL)
		easy = curl_easy_init();
	if (multi == NULL || easy == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not create an HTTP handle")));
}

/*
 * Perform one request. Transport failures (DNS, connect, TLS, timeout, an
 * oversized body) raise an ERROR naming the host only; any HTTP status is
 * returned for the provider to interpret. The body stays valid until the
 * next request.
 */
void
sync_http_request(const char *method, const char *url,
				  const SyncHttpHeader *headers, int nheaders,
				  const char *body, const char *content_type,
				  bool verify_tls, SyncHttpResponse *resp)
{
	sync_http_request_timeout(method, url, headers, nheaders, body, content_type, verify_tls,
							  sync_http_timeout_ms, resp);
}

/* The same with a total timeout of its own (ms). */
void
sync_http_request_timeout(const char *method, const char *url,
						  const SyncHttpHeader *headers, int nheaders,
						  const char *body, const char *content_type,
						  bool verify_tls, int timeout_ms, SyncHttpResponse *resp)
{
	struct curl_slist *volatile list = NULL;
	char		errbuf[CURL_ERROR_SIZE];
	volatile CURLcode result = CURLE_OK;
	volatile bool done = false;
	int			running = 0;
	char		line[8192];
	char	   *why;

	memset(resp, 0, sizeof(*resp));
	if (!sync_url_is_valid(url, &why))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("refusing to request URL on host \"%s\": %s", sync_http_host_of(url), why)));
	if (!verify_tls && !sync_allow_insecure_tls)
		verify_tls = true;

	ensure_handles();
	curl_easy_reset(easy);
	buffer_reset(&body_buf);
	buffer_reset(&header_buf);
	errbuf[0] = '\0';

	for (int i = 0; i < nheaders; i++)
	{
		snprintf(line, sizeof(line), "%s: %s", headers[i].name, headers[i].value);
		list = curl_slist_append(list, line);
	}
	if (content_type)
	{
		snprintf(line, sizeof(line), "Content-Type: %s", content_type);
		list = curl_slist_append(list, line);
	}
	list = curl_slist_append(list, "Accept: application/json");
	list = curl_slist_append(list, "Expect:");

	curl_easy_setopt(easy, CURLOPT_URL, url);
	curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(easy, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(easy, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(easy, CURLOPT_ERRORBUFFER, errbuf);
	curl_easy_setopt(easy, CURLOPT_USERAGENT, sync_user_agent);
	curl_easy_setopt(easy, CURLOPT_HTTPHEADER, list);
	curl_easy_setopt(easy, CURLOPT_CONNECTTIMEOUT_MS, (long) Min(sync_http_connect_timeout_ms, timeout_ms));
	curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, (long) timeout_ms);
	curl_easy_setopt(easy, CURLOPT_ACCEPT_ENCODING, "");
	curl_easy_setopt(easy, CURLOPT_SSL_VERIFYPEER, verify_tls ? 1L : 0L);
	curl_easy_setopt(easy, CURLOPT_SSL_VERIFYHOST, verify_tls ? 2L : 0L);
	curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, write_body);
	curl_easy_setopt(easy, CURLOPT_HEADERFUNCTION, write_header);
	curl_easy_setopt(easy, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t) sync_max_response_bytes);
	if (strcmp(method, "GET") != 0)
		curl_easy_setopt(easy, CURLOPT_CUSTOMREQUEST, method);
	if (body)
	{
		curl_easy_setopt(easy, CURLOPT_POSTFIELDS, body);
		curl_easy_setopt(easy, CURLOPT_POSTFIELDSIZE, (long) strlen(body));
	}

	curl_multi_add_handle(multi, easy);
	PG_TRY();
	{
		while (!done)
		{
			CURLMsg    *msg;
			int			left;

			curl_multi_perform(multi, &running);
			while ((msg = curl_multi_info_read(multi, &left)) != NULL)
			{
				if (msg->msg == CURLMSG_DONE && msg->easy_handle == easy)
				{
					result = msg->data.result;
					done = true;
				}
			}
			if (done)
				break;
			/* Between curl calls, never inside one: SIGTERM and cancel act here. */
			CHECK_FOR_INTERRUPTS();
			if (sync_is_worker && sync_worker_extension_dropped())
				ereport(ERROR,
						(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
						 errmsg("request to \"%s\" given up: the sync extension was dropped",
								sync_http_host_of(url))));
			curl_multi_poll(multi, NULL, 0, SYNC_HTTP_POLL_MS, NULL);
		}
	}
	PG_CATCH();
	{
		curl_multi_remove_handle(multi, easy);
		curl_slist_free_all(list);
		PG_RE_THROW();
	}
	PG_END_TRY();
	curl_multi_remove_handle(multi, easy);
	curl_slist_free_all(list);

	if (result != CURLE_OK)
	{
		const char *host = sync_http_host_of(url);

		if (body_buf.too_large || result == CURLE_FILESIZE_EXCEEDED)
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("response from \"%s\" is larger than sync.max_response_bytes (%d bytes)",
							host, sync_max_response_bytes),
					 errhint("Raise sync.max_response_bytes, or lower the page size of the collection.")));
		ereport(ERROR,
				(errcode(result == CURLE_OPERATION_TIMEDOUT ? ERRCODE_QUERY_CANCELED : ERRCODE_CONNECTION_FAILURE),
				 errmsg("request to \"%s\" failed: %s", host,
						errbuf[0] ? errbuf : curl_easy_strerror(result))));
	}

	curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &resp->status);
	if (body_buf.data == NULL)
		buffer_append(&body_buf, "", 0, 1);
	resp->body = body_buf.data;
	resp->body_len = body_buf.len;
	resp->headers = (header_buf.len > 0) ? pstrdup(header_buf.data) : NULL;
	resp->date = sync_http_header(resp, "Date");
}
