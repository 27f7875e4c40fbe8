/*
 * smtp.c: sending one e-mail through an SMTP server with libcurl. The caller
 * builds the message (headers and body, CRLF line ends); libcurl speaks the
 * protocol, escapes lines starting with a dot, and does TLS for smtps:// or
 * STARTTLS when the server offers it. Nothing here raises an error: the
 * result and a message come back, so a failed delivery never stops the sync.
 */
#include "sync.h"

#include <curl/curl.h>

#define SMTP_TIMEOUT_MS 15000

typedef struct MessageReader
{
	const char *data;
	size_t		len;
	size_t		offset;
} MessageReader;

static size_t
read_message(char *buffer, size_t size, size_t nitems, void *userdata)
{
	MessageReader *reader = userdata;
	size_t		room = size * nitems;
	size_t		n = Min(room, reader->len - reader->offset);

	memcpy(buffer, reader->data + reader->offset, n);
	reader->offset += n;
	return n;
}

/* "<a@x>, b@y" → a curl list of addresses; false when one is malformed. */
static bool
recipient_list(const char *recipients, struct curl_slist **list)
{
	char	   *copy = pstrdup(recipients);
	char	   *save = NULL;

	for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save))
	{
		while (*tok == ' ' || *tok == '\t')
			tok++;
		for (char *end = tok + strlen(tok); end > tok && (end[-1] == ' ' || end[-1] == '\t'); end--)
			end[-1] = '\0';
		if (*tok == '\0' || strchr(tok, '@') == NULL || strpbrk(tok, "\r\n<>") != NULL)
			return false;
		*list = curl_slist_append(*list, psprintf("<%s>", tok));
	}
	return *list != NULL;
}

bool
sync_smtp_send(const char *smtp_url, json_t *options, const char *from, const char *recipients,
			   const char *message, char **error)
{
	CURL	   *curl;
	struct curl_slist *rcpt = NULL;
	MessageReader reader = {message, strlen(message), 0};
	char		errbuf[CURL_ERROR_SIZE];
	const char *username = sync_json_string(options, "username");
	const char *password = sync_json_string(options, "password");
	CURLcode	result;

	*error = NULL;
	if (!recipient_list(recipients, &rcpt))
	{
		curl_slist_free_all(rcpt);
		*error = psprintf("invalid recipients \"%s\"", recipients);
		return false;
	}
	curl = curl_easy_init();
	if (curl == NULL)
	{
		curl_slist_free_all(rcpt);
		*error = pstrdup("could not initialize libcurl");
		return false;
	}
	errbuf[0] = '\0';
	curl_easy_setopt(curl, CURLOPT_URL, smtp_url);
	curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "smtp,smtps");
	curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, errbuf);
	curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, (long) Min(sync_http_connect_timeout_ms, SMTP_TIMEOUT_MS));
	curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, (long) SMTP_TIMEOUT_MS);
	curl_easy_setopt(curl, CURLOPT_MAIL_FROM, psprintf("<%s>", from));
	curl_easy_setopt(curl, CURLOPT_MAIL_RCPT, rcpt);
	curl_easy_setopt(curl, CURLOPT_READFUNCTION, read_message);
	curl_easy_setopt(curl, CURLOPT_READDATA, &reader);
	curl_easy_setopt(curl, CURLOPT_UPLOAD, 1L);
	/* STARTTLS when the server offers it; required when the options say so */
	curl_easy_setopt(curl, CURLOPT_USE_SSL,
					 sync_json_bool(options, "require_tls", false) ? (long) CURLUSESSL_ALL : (long) CURLUSESSL_TRY);
	if (!sync_json_bool(options, "verify_tls", true) && sync_allow_insecure_tls)
	{
		curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, 0L);
		curl_easy_setopt(curl, CURLOPT_SSL_VERIFYHOST, 0L);
	}
	if (username)
		curl_easy_setopt(curl, CURLOPT_USERNAME, username);
	if (password)
		curl_easy_setopt(curl, CURLOPT_PASSWORD, password);

	result = curl_easy_perform(curl);
	if (result != CURLE_OK)
	{
		long		reply = 0;
		long		port = 0;

		curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &reply);
		curl_easy_getinfo(curl, CURLINFO_PRIMARY_PORT, &port);
		*error = psprintf("SMTP delivery through %s:%ld failed%s: %s", sync_http_host_of(smtp_url), port,
						  reply ? psprintf(" (server reply %ld)", reply) : "",
						  errbuf[0] ? errbuf : curl_easy_strerror(result));
	}
	curl_easy_cleanup(curl);
	curl_slist_free_all(rcpt);
	return result == CURLE_OK;
}
