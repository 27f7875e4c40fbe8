/*
 * webhook_verify.c: the cryptography webhook signatures need, on
 * PostgreSQL's own HMAC and base64 (common/), so sync needs no TLS library
 * of its own: HMAC-SHA256, hex and base64, and a comparison whose time does
 * not depend on where two strings differ (an attacker timing our answers
 * must not learn a signature byte by byte).
 */
#include "sync.h"

#include "common/base64.h"
#include "common/cryptohash.h"
#include "common/hmac.h"

/* HMAC-SHA256 of msg under key into digest (32 bytes); false if it could not be computed. */
bool
sync_hmac_sha256(const void *key, size_t key_len, const void *msg, size_t msg_len, uint8 *digest)
{
	pg_hmac_ctx *ctx = pg_hmac_create(PG_SHA256);
	bool		ok;

	if (ctx == NULL)
		return false;
	ok = pg_hmac_init(ctx, key, key_len) == 0 &&
		pg_hmac_update(ctx, msg, msg_len) == 0 &&
		pg_hmac_final(ctx, digest, SYNC_HMAC_SHA256_LEN) == 0;
	pg_hmac_free(ctx);
	return ok;
}

/* Lower-case hex, as Stripe and Airtable write their signatures. */
char *
sync_hex(const uint8 *bytes, size_t len)
{
	static const char digits[] = "0123456789abcdef";
	char	   *out = palloc(len * 2 + 1);

	for (size_t i = 0; i < len; i++)
	{
		out[2 * i] = digits[bytes[i] >> 4];
		out[2 * i + 1] = digits[bytes[i] & 0xf];
	}
	out[len * 2] = '\0';
	return out;
}

char *
sync_base64_encode(const uint8 *bytes, size_t len)
{
	int			cap = pg_b64_enc_len((int) len) + 1;
	char	   *out = palloc(cap);
	int			n = pg_b64_encode((const char *) bytes, (int) len, out, cap);

	if (n < 0)
		return NULL;
	out[n] = '\0';
	return out;
}

/* NULL when text is not base64. */
uint8 *
sync_base64_decode(const char *text, size_t len, size_t *out_len)
{
	int			cap = pg_b64_dec_len((int) len) + 1;
	uint8	   *out = palloc(cap);
	int			n = pg_b64_decode(text, (int) len, (char *) out, cap);

	if (n < 0)
	{
		pfree(out);
		return NULL;
	}
	*out_len = (size_t) n;
	return out;
}

/*
 * Whether two strings are equal, in time that depends only on their
 * lengths (which are public: a signature's length is its algorithm's).
 */
bool
sync_equal_secret(const char *a, const char *b)
{
	size_t		alen = strlen(a);
	size_t		blen = strlen(b);
	unsigned char diff = alen != blen;

	for (size_t i = 0; i < alen; i++)
		diff |= (unsigned char) a[i] ^ (unsigned char) b[i % (blen ? blen : 1)];
	return diff == 0 && blen > 0;
}

/* A header of the delivery (names are lower case), or NULL. */
const char *
sync_webhook_header(const SyncWebhookRequest *req, const char *name)
{
	json_t	   *v = json_object_get(req->headers, name);

	return json_is_string(v) ? json_string_value(v) : NULL;
}
