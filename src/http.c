/*
 * http.c: API requests through libcurl. Easy handles are kept between
 * requests, and the multi handle they run on keeps connections alive; the
 * transfer runs on the multi handle so the process can answer SIGTERM and
 * query cancel within a poll interval, even in the middle of a slow response.
 * Nothing here longjmps through libcurl: callbacks only copy bytes, errors are
 * raised after the transfer.
 *
 * A provider walking pages may start its next GET before it applies the page
 * in hand (sync_http_prefetch), so that the API answers while we write. That
 * GET runs on a second easy handle of the same multi handle, and the request
 * asking for exactly it adopts the transfer instead of sending another. Any
 * other request discards it first: one transfer in flight at a time keeps
 * the loop below simple, and a stale answer is never served.
 *
 * The prefetch runs on a thread of its own (curl_easy_perform), so that
 * receiving and decompressing the next page takes the other CPU while this
 * one writes. The thread runs libcurl and our write callbacks only (malloc,
 * never palloc, no Postgres call, every signal blocked); the process joins
 * it before it reads the answer, and tells it to stop (a progress callback)
 * when the answer is no longer wanted. Without threads it falls back to the
 * multi handle.
 */
#include "sync.h"

#include <curl/curl.h>
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include "miscadmin.h"
#include "storage/ipc.h"
#include "utils/timestamp.h"

#define SYNC_HTTP_POLL_MS 100

/* An older prefetch may answer from a connection or a state long gone: ask again. */
#define PREFETCH_MAX_AGE_US (30 * USECS_PER_SEC)

/* Non-blocking performs that put a prefetch on a kept-alive connection's wire. */
#define PREFETCH_KICKS 4

typedef struct HttpBuffer
{
	char	   *data;
	size_t		len;
	size_t		cap;
	bool		too_large;
} HttpBuffer;

/*
 * One transfer and what it owns until it ends. Everything is malloc'd: a
 * palloc failure must not longjmp out of curl, and a prefetch outlives the
 * memory context of the step that started it.
 */
typedef struct HttpTransfer
{
	CURL	   *easy;
	HttpBuffer	body;
	HttpBuffer	headers;		/* every header line of the final response */
	struct curl_slist *list;	/* request headers: curl reads them until the end */
	char		errbuf[CURL_ERROR_SIZE];
	bool		in_multi;
	bool		done;
	CURLcode	result;

	/* what was asked, for telling whether a prefetch is the request's own */
	char	   *url;
	int			nheaders;		/* the caller's headers, first in list */
	bool		verify_tls;
	int			timeout_ms;
	TimestampTz started_at;
	bool		claimed;		/* promised to the next request: no longer expires */

	/* a prefetch on its own thread (see above) */
	bool		threaded;		/* a thread performs it and must be joined */
	pthread_t	thread;
	bool		thread_done;	/* atomic: the thread wrote result and is ending */
	bool		thread_stop;	/* atomic: the answer is not wanted, stop */
} HttpTransfer;

static void transfer_end(HttpTransfer *t);

/* While waiting for an answer: SIGTERM, cancel and DROP EXTENSION end the wait. */
static void
give_up_if_unwanted(const char *url)
{
	CHECK_FOR_INTERRUPTS();
	if (sync_is_worker && sync_worker_extension_dropped())
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("request to \"%s\" given up: the sync extension was dropped",
						sync_http_host_of(url))));
}

/* The thread's "finished" byte wakes the process's wait (see wait_thread). */
static int	thread_pipe[2] = {-1, -1};
static bool thread_exit_hook = false;

static CURLM *multi = NULL;
static bool curl_ready = false;

/* The request's transfer, and the prefetch in the other slot when there is one. */
static HttpTransfer transfers[2];
static HttpTransfer *current = &transfers[0];
static HttpTransfer *prefetched = NULL;

static void
buffer_reset(HttpBuffer *b)
{
	b->len = 0;
	b->too_large = false;
	if (b->data)
		b->data[0] = '\0';
}

static void
buffer_free(HttpBuffer *b)
{
	free(b->data);
	memset(b, 0, sizeof(*b));
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
	HttpTransfer *t = (HttpTransfer *) userdata;
	size_t		n = size * nmemb;

	if (!buffer_append(&t->body, ptr, n, (size_t) sync_max_response_bytes))
		return 0;				/* makes curl fail with CURLE_WRITE_ERROR */
	return n;
}

static size_t
write_header(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	HttpTransfer *t = (HttpTransfer *) userdata;
	size_t		n = size * nmemb;

	/* A status line starts a new response (after 100 Continue or a redirect). */
	if (n >= 5 && strncmp(ptr, "HTTP/", 5) == 0)
		buffer_reset(&t->headers);
	buffer_append(&t->headers, ptr, n, 64 * 1024);
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

static void
ensure_multi(void)
{
	sync_http_init();
	if (multi == NULL)
		multi = curl_multi_init();
	if (multi == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not create an HTTP handle")));
}

/* The request headers hold tokens: they must not linger in freed memory. */
static void
free_header_list(struct curl_slist *list)
{
	for (struct curl_slist *l = list; l != NULL; l = l->next)
		explicit_bzero(l->data, strlen(l->data));
	curl_slist_free_all(list);
}

/* The prefetch thread: libcurl and the write callbacks, nothing else. */
static void *
thread_perform(void *arg)
{
	HttpTransfer *t = (HttpTransfer *) arg;
	char		byte = 1;

	t->result = curl_easy_perform(t->easy);
	__atomic_store_n(&t->thread_done, true, __ATOMIC_RELEASE);
	if (write(thread_pipe[1], &byte, 1) < 0)
	{
		/* the pipe is full of earlier bytes: the process wakes anyway */
	}
	return NULL;
}

static int
thread_progress(void *userdata, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow)
{
	HttpTransfer *t = (HttpTransfer *) userdata;

	return __atomic_load_n(&t->thread_stop, __ATOMIC_ACQUIRE) ? 1 : 0;
}

static void
drain_thread_pipe(void)
{
	char		bytes[64];

	while (read(thread_pipe[0], bytes, sizeof(bytes)) > 0)
		;
}

/* Stop the thread of t (libcurl calls the progress callback often) and join it. */
static void
thread_stop(HttpTransfer *t)
{
	if (!t->threaded)
		return;
	__atomic_store_n(&t->thread_stop, true, __ATOMIC_RELEASE);
	pthread_join(t->thread, NULL);
	t->threaded = false;
	t->done = true;
	drain_thread_pipe();
}

static void
stop_threads_at_exit(int code, Datum arg)
{
	for (int i = 0; i < lengthof(transfers); i++)
		thread_stop(&transfers[i]);
}

/* Perform t on a new thread; false when the process cannot start one. */
static bool
thread_start(HttpTransfer *t)
{
	sigset_t	all;
	sigset_t	old;
	int			rc;

	if (thread_pipe[0] < 0)
	{
		if (pipe(thread_pipe) != 0)
			return false;
		fcntl(thread_pipe[0], F_SETFL, O_NONBLOCK);
		fcntl(thread_pipe[1], F_SETFL, O_NONBLOCK);
		fcntl(thread_pipe[0], F_SETFD, FD_CLOEXEC);
		fcntl(thread_pipe[1], F_SETFD, FD_CLOEXEC);
	}
	if (!thread_exit_hook)
	{
		on_proc_exit(stop_threads_at_exit, (Datum) 0);
		/*
		 * One malloc arena for the process, as before it had a thread: a
		 * thread's own arena would keep the response buffers it grew (the
		 * worker reuses them) where freed memory is seldom given back.
		 */
		mallopt(M_ARENA_MAX, 1);
		thread_exit_hook = true;
	}
	curl_easy_setopt(t->easy, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(t->easy, CURLOPT_XFERINFOFUNCTION, thread_progress);
	curl_easy_setopt(t->easy, CURLOPT_XFERINFODATA, t);
	t->thread_done = false;
	t->thread_stop = false;
	/* Postgres's signal handlers must run on the process's own thread only */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	rc = pthread_create(&t->thread, NULL, thread_perform, t);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (rc != 0)
		return false;
	t->threaded = true;
	return true;
}

/* Wait for t's thread to finish, interruptibly, and join it. */
static void
thread_wait(HttpTransfer *t, const char *url)
{
	PG_TRY();
	{
		while (!__atomic_load_n(&t->thread_done, __ATOMIC_ACQUIRE))
		{
			give_up_if_unwanted(url);
			/* not the latch: a wakeup meant for the worker's loop must stay set */
			(void) WaitLatchOrSocket(NULL, WL_SOCKET_READABLE | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
									 thread_pipe[0], SYNC_HTTP_POLL_MS, PG_WAIT_EXTENSION);
			drain_thread_pipe();
		}
	}
	PG_CATCH();
	{
		thread_stop(t);
		transfer_end(t);
		PG_RE_THROW();
	}
	PG_END_TRY();
	pthread_join(t->thread, NULL);
	t->threaded = false;
	t->done = true;
	transfer_end(t);
}

/* Take the transfer off the multi handle; its response stays readable. */
static void
transfer_end(HttpTransfer *t)
{
	thread_stop(t);				/* it reads the URL and headers freed below */
	if (t->in_multi)
		curl_multi_remove_handle(multi, t->easy);
	t->in_multi = false;
	free_header_list(t->list);
	t->list = NULL;
	free(t->url);
	t->url = NULL;
}

static void
prefetch_discard(void)
{
	if (prefetched == NULL)
		return;
	transfer_end(prefetched);
	buffer_free(&prefetched->body);
	buffer_free(&prefetched->headers);
	prefetched = NULL;
}

void
sync_http_cleanup(void)
{
	prefetch_discard();
	for (int i = 0; i < lengthof(transfers); i++)
	{
		transfer_end(&transfers[i]);
		if (transfers[i].easy)
			curl_easy_cleanup(transfers[i].easy);
		transfers[i].easy = NULL;
	}
	if (multi)
		curl_multi_cleanup(multi);
	multi = NULL;
}

static void
list_append(HttpTransfer *t, const char *line)
{
	struct curl_slist *grown = curl_slist_append(t->list, line);

	/* a request short of a header (its Authorization) must not go out */
	if (grown == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory building an HTTP request")));
	t->list = grown;
}

static void
transfer_add_to_multi(HttpTransfer *t)
{
	if (curl_multi_add_handle(multi, t->easy) != CURLM_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not start an HTTP request")));
	t->in_multi = true;
}

/* Set a transfer up and (on_multi) add it to the multi handle; nothing is sent yet. */
static void
transfer_start(HttpTransfer *t, const char *method, const char *url,
			   const SyncHttpHeader *headers, int nheaders,
			   const char *body, const char *content_type,
			   bool verify_tls, int timeout_ms, bool on_multi)
{
	char		line[8192];

	Assert(!t->in_multi);
	transfer_end(t);			/* what an ERROR in here left behind */
	if (t->easy == NULL)
		t->easy = curl_easy_init();
	t->url = strdup(url);
	if (t->easy == NULL || t->url == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not create an HTTP handle")));
	curl_easy_reset(t->easy);
	buffer_reset(&t->body);
	buffer_reset(&t->headers);
	t->errbuf[0] = '\0';
	t->done = false;
	t->result = CURLE_OK;
	t->claimed = false;
	t->nheaders = nheaders;
	t->verify_tls = verify_tls;
	t->timeout_ms = timeout_ms;

	for (int i = 0; i < nheaders; i++)
	{
		snprintf(line, sizeof(line), "%s: %s", headers[i].name, headers[i].value);
		list_append(t, line);
	}
	if (content_type)
	{
		snprintf(line, sizeof(line), "Content-Type: %s", content_type);
		list_append(t, line);
	}
	list_append(t, "Accept: application/json");
	list_append(t, "Expect:");

	curl_easy_setopt(t->easy, CURLOPT_URL, url);
	curl_easy_setopt(t->easy, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(t->easy, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(t->easy, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(t->easy, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(t->easy, CURLOPT_ERRORBUFFER, t->errbuf);
	curl_easy_setopt(t->easy, CURLOPT_USERAGENT, sync_user_agent);
	curl_easy_setopt(t->easy, CURLOPT_HTTPHEADER, t->list);
	curl_easy_setopt(t->easy, CURLOPT_CONNECTTIMEOUT_MS, (long) Min(sync_http_connect_timeout_ms, timeout_ms));
	curl_easy_setopt(t->easy, CURLOPT_TIMEOUT_MS, (long) timeout_ms);
	curl_easy_setopt(t->easy, CURLOPT_ACCEPT_ENCODING, "");
	curl_easy_setopt(t->easy, CURLOPT_SSL_VERIFYPEER, verify_tls ? 1L : 0L);
	curl_easy_setopt(t->easy, CURLOPT_SSL_VERIFYHOST, verify_tls ? 2L : 0L);
	curl_easy_setopt(t->easy, CURLOPT_WRITEFUNCTION, write_body);
	curl_easy_setopt(t->easy, CURLOPT_WRITEDATA, t);
	curl_easy_setopt(t->easy, CURLOPT_HEADERFUNCTION, write_header);
	curl_easy_setopt(t->easy, CURLOPT_HEADERDATA, t);
	curl_easy_setopt(t->easy, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t) sync_max_response_bytes);
	curl_easy_setopt(t->easy, CURLOPT_NOPROGRESS, 1L);
	if (strcmp(method, "GET") != 0)
		curl_easy_setopt(t->easy, CURLOPT_CUSTOMREQUEST, method);
	if (body)
	{
		curl_easy_setopt(t->easy, CURLOPT_POSTFIELDS, body);
		curl_easy_setopt(t->easy, CURLOPT_POSTFIELDSIZE, (long) strlen(body));
	}

	t->started_at = GetCurrentTimestamp();
	if (on_multi)
		transfer_add_to_multi(t);
}

/* Move every transfer on as far as it goes without waiting, and note the finished. */
static void
multi_progress(void)
{
	CURLMsg    *msg;
	int			running;
	int			left;

	curl_multi_perform(multi, &running);
	while ((msg = curl_multi_info_read(multi, &left)) != NULL)
	{
		if (msg->msg != CURLMSG_DONE)
			continue;
		for (int i = 0; i < lengthof(transfers); i++)
			if (transfers[i].in_multi && transfers[i].easy == msg->easy_handle)
			{
				transfers[i].done = true;
				transfers[i].result = msg->data.result;
			}
	}
}

/* Wait for the transfer to finish, interruptibly, and take it off the multi handle. */
static void
transfer_finish(HttpTransfer *t, const char *url)
{
	PG_TRY();
	{
		for (;;)
		{
			multi_progress();
			if (t->done)
				break;
			/* Between curl calls, never inside one: SIGTERM and cancel act here. */
			give_up_if_unwanted(url);
			curl_multi_poll(multi, NULL, 0, SYNC_HTTP_POLL_MS, NULL);
		}
	}
	PG_CATCH();
	{
		transfer_end(t);
		PG_RE_THROW();
	}
	PG_END_TRY();
	transfer_end(t);
}

/* Raise a failed transfer's error, or fill resp from its response. */
static void
transfer_response(HttpTransfer *t, const char *url, SyncHttpResponse *resp)
{
	if (t->result != CURLE_OK)
	{
		const char *host = sync_http_host_of(url);

		if (t->body.too_large || t->result == CURLE_FILESIZE_EXCEEDED)
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("response from \"%s\" is larger than sync.max_response_bytes (%d bytes)",
							host, sync_max_response_bytes),
					 errhint("Raise sync.max_response_bytes, or lower the page size of the collection.")));
		ereport(ERROR,
				(errcode(t->result == CURLE_OPERATION_TIMEDOUT ? ERRCODE_QUERY_CANCELED : ERRCODE_CONNECTION_FAILURE),
				 errmsg("request to \"%s\" failed: %s", host,
						t->errbuf[0] ? t->errbuf : curl_easy_strerror(t->result))));
	}

	curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &resp->status);
	if (t->body.data == NULL)
		buffer_append(&t->body, "", 0, 1);
	resp->body = t->body.data;
	resp->body_len = t->body.len;
	resp->headers = (t->headers.len > 0) ? pstrdup(t->headers.data) : NULL;
	resp->date = sync_http_header(resp, "Date");
}

static bool
effective_verify_tls(bool verify_tls)
{
	return verify_tls || !sync_allow_insecure_tls;
}

static bool
header_line_is(const char *line, const SyncHttpHeader *h)
{
	size_t		n = strlen(h->name);

	return strncmp(line, h->name, n) == 0 && line[n] == ':' && line[n + 1] == ' ' &&
		strcmp(line + n + 2, h->value) == 0;
}

/*
 * Whether the prefetch is this very request. A line cut short by the buffer
 * it was formatted in never matches: such a request is simply made anew.
 */
static bool
prefetch_is(const char *method, const char *url,
			const SyncHttpHeader *headers, int nheaders,
			const char *body, const char *content_type,
			bool verify_tls, int timeout_ms)
{
	HttpTransfer *t = prefetched;
	struct curl_slist *line;

	if (t == NULL || strcmp(method, "GET") != 0 || body != NULL || content_type != NULL ||
		strcmp(url, t->url) != 0 || verify_tls != t->verify_tls ||
		timeout_ms != t->timeout_ms || nheaders != t->nheaders)
		return false;
	line = t->list;
	for (int i = 0; i < nheaders; i++, line = line->next)
		if (!header_line_is(line->data, &headers[i]))
			return false;
	return true;
}

static bool
prefetch_young(void)
{
	return GetCurrentTimestamp() - prefetched->started_at < PREFETCH_MAX_AGE_US;
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

/*
 * The same with a total timeout of its own (ms). A prefetch of this very
 * request is adopted: its timeout runs from when it was sent.
 */
void
sync_http_request_timeout(const char *method, const char *url,
						  const SyncHttpHeader *headers, int nheaders,
						  const char *body, const char *content_type,
						  bool verify_tls, int timeout_ms, SyncHttpResponse *resp)
{
	char	   *why;

	memset(resp, 0, sizeof(*resp));
	if (!sync_url_is_valid(url, &why))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("refusing to request URL on host \"%s\": %s", sync_http_host_of(url), why)));
	verify_tls = effective_verify_tls(verify_tls);
	ensure_multi();

	if (prefetch_is(method, url, headers, nheaders, body, content_type, verify_tls, timeout_ms) &&
		(prefetched->claimed || prefetch_young()))
	{
		current = prefetched;
		prefetched = NULL;
	}
	else
	{
		prefetch_discard();
		transfer_start(current, method, url, headers, nheaders, body, content_type,
					   verify_tls, timeout_ms, true);
	}
	if (current->threaded)
		thread_wait(current, url);
	else
		transfer_finish(current, url);
	transfer_response(current, url, resp);
}

/*
 * Send a GET now, to be adopted by the request that asks for it (see
 * sync_http_request_timeout), and return without waiting for the answer. It
 * replaces any earlier prefetch. Only a kept-alive connection gets the
 * request on the wire at once; a new one is connected by sync_http_pump()
 * calls or by the adopting request.
 */
void
sync_http_prefetch(const char *url, const SyncHttpHeader *headers, int nheaders, bool verify_tls)
{
	HttpTransfer *t = (current == &transfers[0]) ? &transfers[1] : &transfers[0];
	char	   *why;

	prefetch_discard();
	/* the request itself reports a URL it refuses, when it is made */
	if (!sync_url_is_valid(url, &why))
		return;
	ensure_multi();
	transfer_start(t, "GET", url, headers, nheaders, NULL, NULL,
				   effective_verify_tls(verify_tls), sync_http_timeout_ms, false);
	prefetched = t;
	if (thread_start(t))
		return;
	transfer_add_to_multi(t);
	for (int i = 0; i < PREFETCH_KICKS && !t->done; i++)
		multi_progress();
}

/*
 * True when the next sync_http_request() of a GET with these arguments will
 * adopt the prefetch, which from now on is kept for it however old: a caller
 * deciding on the answer (not to charge a budget twice) is not let down by
 * the clock in between.
 */
bool
sync_http_prefetch_claim(const char *url, const SyncHttpHeader *headers, int nheaders, bool verify_tls)
{
	if (!prefetch_is("GET", url, headers, nheaders, NULL, NULL,
					 effective_verify_tls(verify_tls), sync_http_timeout_ms) ||
		!(prefetched->claimed || prefetch_young()))
		return false;
	prefetched->claimed = true;
	return true;
}

/*
 * Move the prefetch on without waiting. While the process is busy elsewhere
 * its answer can only pile up in the socket buffer: callers pump between
 * statements so that a large one keeps flowing.
 */
void
sync_http_pump(void)
{
	if (prefetched && !prefetched->done && !prefetched->threaded)
		multi_progress();
}
