/*
 * httpmsg.c: URLs and response headers. Nothing here makes a transfer, so
 * providers' response handling can run (and be fuzzed) without a network.
 */
#include "sync.h"

#include <curl/curl.h>
#include <time.h>

/* The host part of a URL, for messages (never the path or query, which may carry ids). */
char *
sync_http_host_of(const char *url)
{
	CURLU	   *u = curl_url();
	char	   *host = NULL;
	char	   *result;

	if (u && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
		curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK)
	{
		result = pstrdup(host);
		curl_free(host);
	}
	else
		result = pstrdup("(invalid URL)");
	if (u)
		curl_url_cleanup(u);
	return result;
}

/* Only absolute http and https URLs with a host are accepted. */
bool
sync_url_is_valid(const char *url, char **why)
{
	CURLU	   *u = curl_url();
	char	   *scheme = NULL;
	char	   *host = NULL;
	char	   *user = NULL;
	bool		ok = false;

	*why = NULL;
	if (u == NULL)
	{
		*why = "out of memory";
		return false;
	}
	if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK)
		*why = "it is not an absolute URL";
	else if (curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
			 (pg_strcasecmp(scheme, "http") != 0 && pg_strcasecmp(scheme, "https") != 0))
		*why = "only http and https URLs are allowed";
	else if (curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK || host[0] == '\0')
		*why = "it has no host";
	else if (curl_url_get(u, CURLUPART_USER, &user, 0) == CURLUE_OK)
		*why = "a user name or password in a URL would be readable by everyone: use the credentials";
	else
		ok = true;
	if (user)
		curl_free(user);
	if (scheme)
		curl_free(scheme);
	if (host)
		curl_free(host);
	curl_url_cleanup(u);
	return ok;
}

char *
sync_http_urlencode(const char *s)
{
	char	   *escaped;
	char	   *result;

	/* libcurl ignores the handle since 7.82: no transfer state is needed. */
	escaped = curl_easy_escape(NULL, s, 0);
	if (escaped == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	result = pstrdup(escaped);
	curl_free(escaped);
	return result;
}

/* An HTTP date (Date, Retry-After) as epoch seconds; 0 when unreadable. */
double
sync_parse_http_date(const char *value)
{
	time_t		t = curl_getdate(value, NULL);

	return t > 0 ? (double) t : 0;
}

/* The server's clock from its Date header (providers' cursors follow it), else ours. */
double
sync_http_server_time(SyncHttpResponse *resp)
{
	if (resp->date)
	{
		time_t		t = curl_getdate(resp->date, NULL);

		if (t > 0)
			return (double) t;
	}
	return (double) time(NULL);
}

/* A response header's value (the last one of that name), palloc'd; NULL when absent. */
char *
sync_http_header(SyncHttpResponse *resp, const char *name)
{
	size_t		namelen = strlen(name);
	const char *line = resp->headers;
	char	   *found = NULL;

	while (line && *line)
	{
		const char *end = strchr(line, '\n');
		size_t		len = end ? (size_t) (end - line) : strlen(line);

		if (len > namelen && pg_strncasecmp(line, name, namelen) == 0 && line[namelen] == ':')
		{
			const char *value = line + namelen + 1;
			size_t		vlen = len - namelen - 1;

			while (vlen > 0 && (*value == ' ' || *value == '\t'))
				value++, vlen--;
			while (vlen > 0 && (value[vlen - 1] == '\r' || value[vlen - 1] == ' '))
				vlen--;
			if (found)
				pfree(found);
			found = pnstrdup(value, vlen);
		}
		line = end ? end + 1 : NULL;
	}
	return found;
}
