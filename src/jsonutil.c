/*
 * jsonutil.c: small jansson helpers with Postgres errors. jansson allocates
 * with malloc, so its values survive memory context resets: every json_t has
 * exactly one owner that calls json_decref.
 */
#include "sync.h"

#include <math.h>

#include "common/shortest_dec.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"

#include "utils/builtins.h"
#include "utils/jsonb.h"

/*
 * One byte that is not valid UTF-8 would make the whole response unreadable,
 * and the page would fail for ever: each invalid sequence becomes U+FFFD,
 * the replacement character, as browsers and most clients do.
 */
static char *
replace_invalid_utf8(const char *text, size_t len, size_t *newlen)
{
	StringInfoData buf;
	size_t		i = 0;

	initStringInfo(&buf);
	while (i < len)
	{
		const unsigned char *p = (const unsigned char *) text + i;
		int			n = pg_utf_mblen(p);

		if (*p < 0x80)
			n = 1;
		else if (n > 1 && i + n <= len && pg_utf8_islegal(p, n))
			;
		else
		{
			appendBinaryStringInfo(&buf, "\xEF\xBF\xBD", 3);
			i++;
			continue;
		}
		appendBinaryStringInfo(&buf, (const char *) p, n);
		i += n;
	}
	*newlen = buf.len;
	return buf.data;
}

static int
hex4(const char *p)
{
	int			v = 0;

	for (int i = 0; i < 4; i++)
	{
		char		c = p[i];

		v <<= 4;
		if (c >= '0' && c <= '9')
			v |= c - '0';
		else if (c >= 'a' && c <= 'f')
			v |= c - 'a' + 10;
		else if (c >= 'A' && c <= 'F')
			v |= c - 'A' + 10;
		else
			return -1;
	}
	return v;
}

/*
 * JavaScript writes half of a surrogate pair as a lone \uD800 escape, which
 * is no character: each becomes \uFFFD (same length, so in place).
 */
static void
replace_lone_surrogates(char *text, size_t len)
{
	for (size_t i = 0; i + 1 < len; i++)
	{
		int			cp;

		if (text[i] != '\\')
			continue;
		if (text[i + 1] != 'u' || i + 6 > len || (cp = hex4(text + i + 2)) < 0)
		{
			i++;				/* an escaped character: skip it */
			continue;
		}
		if (cp >= 0xD800 && cp <= 0xDBFF && i + 12 <= len && text[i + 6] == '\\' && text[i + 7] == 'u' &&
			hex4(text + i + 8) >= 0xDC00 && hex4(text + i + 8) <= 0xDFFF)
			i += 11;			/* a proper pair */
		else if (cp >= 0xD800 && cp <= 0xDFFF)
		{
			memcpy(text + i + 2, "FFFD", 4);
			i += 5;
		}
		else
			i += 5;
	}
}

json_t *
sync_json_parse(const char *text, size_t len, const char *what)
{
	json_error_t err;
	json_t	   *value = json_loadb(text, len, JSON_ALLOW_NUL, &err);

	if (value == NULL &&
		(json_error_code(&err) == json_error_invalid_utf8 || strncmp(err.text, "invalid Unicode", 15) == 0))
	{
		size_t		clean_len;
		char	   *clean = replace_invalid_utf8(text, len, &clean_len);

		replace_lone_surrogates(clean, clean_len);
		value = json_loadb(clean, clean_len, JSON_ALLOW_NUL, &err);
		pfree(clean);
	}
	if (value == NULL)
	{
		/* jansson quotes the bytes near the error: they could be part of a token */
		char	   *near = strstr(err.text, " near '");

		if (near)
			*near = '\0';
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("malformed JSON in %s: %s", what, err.text),
				 errdetail("The error is at line %d, column %d.", err.line, err.column)));
	}
	return value;
}

/* An empty object, built by jansson itself (see sync.h for why not json_object()). */
json_t *
sync_json_new_object(void)
{
	json_t	   *object = json_pack("{}");

	if (object == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));
	return object;
}

/*
 * The shortest decimal that reads back as the same double: an API's 412.18
 * stays 412.18 (jansson would write 412.18000000000001) and
 * 0.30000000000000004 keeps every digit.
 */
void
sync_json_append_real(StringInfo buf, double value)
{
	char		text[64];
	int			digits;
	char	   *e;

	if (isnan(value) || isinf(value))
	{
		appendStringInfoString(buf, "null");
		return;
	}
	/* Ryu, as float8out: the shortest digits, without trying each precision in turn */
	double_to_shortest_decimal_buf(value, text);
	/*
	 * It writes 1e+16 as such, which Postgres reads as a number fine but a
	 * text column would keep: in the range where people write plain decimals,
	 * write the same digits without an exponent.
	 */
	e = strpbrk(text, "eE");
	if (e && fabs(value) >= 1e-4 && fabs(value) < 1e17)
	{
		int			exponent = atoi(e + 1);

		digits = 0;
		for (char *p = text; p < e; p++)
			digits += isdigit((unsigned char) *p) ? 1 : 0;
		snprintf(text, sizeof(text), "%.*f", Max(0, Min(digits, 17) - 1 - exponent), value);
	}
	appendStringInfoString(buf, text);
	/* keep it a JSON real: "5" would read back as an integer */
	if (strpbrk(text, ".eE") == NULL)
		appendStringInfoString(buf, ".0");
}

void
sync_json_append_string(StringInfo buf, const char *s, size_t len)
{
	appendStringInfoChar(buf, '"');
	for (size_t i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) s[i];

		if (c == '\0')
			continue;			/* text cannot hold NUL: the character is dropped */
		if (c == '"' || c == '\\')
		{
			appendStringInfoChar(buf, '\\');
			appendStringInfoChar(buf, (char) c);
		}
		else if (c < 0x20)
			appendStringInfo(buf, "\\u%04x", c);
		else
			appendStringInfoChar(buf, (char) c);	/* UTF-8 as jansson validated it */
	}
	appendStringInfoChar(buf, '"');
}

static void append_json(StringInfo buf, json_t *value);

/* Compact JSON text of value, appended to buf. */
void
sync_json_append(StringInfo buf, json_t *value)
{
	append_json(buf, value);
}

static void
append_json(StringInfo buf, json_t *value)
{
	const char *key;
	json_t	   *item;
	size_t		i;
	bool		first = true;

	check_stack_depth();
	switch (json_typeof(value))
	{
		case JSON_OBJECT:
			appendStringInfoChar(buf, '{');
			json_object_foreach(value, key, item)
			{
				if (!first)
					appendStringInfoChar(buf, ',');
				first = false;
				sync_json_append_string(buf, key, strlen(key));
				appendStringInfoChar(buf, ':');
				append_json(buf, item);
			}
			appendStringInfoChar(buf, '}');
			break;
		case JSON_ARRAY:
			appendStringInfoChar(buf, '[');
			json_array_foreach(value, i, item)
			{
				if (i > 0)
					appendStringInfoChar(buf, ',');
				append_json(buf, item);
			}
			appendStringInfoChar(buf, ']');
			break;
		case JSON_STRING:
			sync_json_append_string(buf, json_string_value(value), json_string_length(value));
			break;
		case JSON_INTEGER:
			appendStringInfo(buf, "%" JSON_INTEGER_FORMAT, json_integer_value(value));
			break;
		case JSON_REAL:
			sync_json_append_real(buf, json_real_value(value));
			break;
		case JSON_TRUE:
			appendStringInfoString(buf, "true");
			break;
		case JSON_FALSE:
			appendStringInfoString(buf, "false");
			break;
		case JSON_NULL:
			appendStringInfoString(buf, "null");
			break;
	}
}

/* Compact JSON text of a value, palloc'd in the current memory context. */
char *
sync_json_dump(json_t *value)
{
	StringInfoData buf;

	initStringInfo(&buf);
	append_json(&buf, value);
	return buf.data;
}

/* The name of the field at position i (from 0) in records as SQL reads them (see records.c). */
const char *
sync_record_key(int i)
{
	static char key[16];

	snprintf(key, sizeof(key), "f%d", i + 1);
	return key;
}

const char *
sync_json_string(json_t *object, const char *key)
{
	json_t	   *v = object ? json_object_get(object, key) : NULL;

	return (v && json_is_string(v)) ? json_string_value(v) : NULL;
}

int64
sync_json_int(json_t *object, const char *key, int64 dflt)
{
	json_t	   *v = object ? json_object_get(object, key) : NULL;

	if (v && json_is_integer(v))
		return (int64) json_integer_value(v);
	if (v && json_is_real(v))
	{
		double		d = json_real_value(v);

		/* out of range (or NaN): not a count or a time the API meant */
		return (d >= -9.2e18 && d <= 9.2e18) ? (int64) d : dflt;
	}
	if (v && json_is_string(v))
		return strtoll(json_string_value(v), NULL, 10);
	return dflt;
}

double
sync_json_number(json_t *object, const char *key, double dflt)
{
	json_t	   *v = object ? json_object_get(object, key) : NULL;

	if (v && json_is_number(v))
		return json_number_value(v);
	if (v && json_is_string(v))
		return strtod(json_string_value(v), NULL);
	return dflt;
}

bool
sync_json_bool(json_t *object, const char *key, bool dflt)
{
	json_t	   *v = object ? json_object_get(object, key) : NULL;

	if (v && json_is_boolean(v))
		return json_is_true(v);
	return dflt;
}

/*
 * An OAuth token's "expires_in" in seconds, within a day's worth of reason:
 * a year at most, so a wild value never becomes a time nobody can store.
 */
int64
sync_token_lifetime(json_t *body, int64 dflt)
{
	int64		seconds = sync_json_int(body, "expires_in", dflt);

	return (seconds >= 0 && seconds <= 365 * 86400) ? seconds : dflt;
}
