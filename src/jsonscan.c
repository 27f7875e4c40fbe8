/*
 * jsonscan.c: a page of records read straight into a batch (records.c).
 * jansson builds a tree of every value of a page, one allocation each, which
 * the store would only turn back into text: for the records of a backfill
 * page, this scanner checks the JSON and cuts each wanted value out as text
 * in one pass. Anything unusual (escapes of NUL or of half a surrogate pair,
 * bytes that are not UTF-8, deep nesting, a record the API marks deleted)
 * makes it give up, and the caller parses the page with jansson as before:
 * both ways store the same values, the fast one only takes the common case.
 */
#include "sync.h"

#include <math.h>

#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/builtins.h"

#define SCAN_MAX_DEPTH 64

typedef struct Scanner
{
	const char *p;
	const char *end;
	StringInfoData text;		/* the last string read, unescaped */
	StringInfoData json;		/* the last value copied as compact JSON */
} Scanner;

/* How records.c turns a field's values into text (its WireForm). */
typedef enum ValueForm
{
	FORM_TEXT,					/* strings as they are, other values as JSON text */
	FORM_JSON,					/* every value as JSON text */
	FORM_ARRAY					/* arrays as array literals */
} ValueForm;

static void
skip_ws(Scanner *s)
{
	while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
		s->p++;
}

static bool
take_char(Scanner *s, char c)
{
	skip_ws(s);
	if (s->p < s->end && *s->p == c)
	{
		s->p++;
		return true;
	}
	return false;
}

static int
hex_digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static int
read_hex4(Scanner *s)
{
	int			v = 0;

	if (s->end - s->p < 4)
		return -1;
	for (int i = 0; i < 4; i++)
	{
		int			d = hex_digit(s->p[i]);

		if (d < 0)
			return -1;
		v = (v << 4) | d;
	}
	s->p += 4;
	return v;
}

static void
append_utf8(StringInfo buf, int cp)
{
	unsigned char out[4];

	unicode_to_utf8((pg_wchar) cp, out);
	appendBinaryStringInfo(buf, (const char *) out, pg_utf_mblen(out));
}

/* A string (at its opening quote) into s->text. */
static bool
read_string(Scanner *s)
{
	resetStringInfo(&s->text);
	if (s->p >= s->end || *s->p != '"')
		return false;
	s->p++;
	for (;;)
	{
		const char *run = s->p;

		/* plain ASCII runs are copied at once */
		while (s->p < s->end && (unsigned char) *s->p >= 0x20 && (unsigned char) *s->p < 0x80 &&
			   *s->p != '"' && *s->p != '\\')
			s->p++;
		appendBinaryStringInfo(&s->text, run, s->p - run);
		if (s->p >= s->end)
			return false;
		if (*s->p == '"')
		{
			s->p++;
			return true;
		}
		if ((unsigned char) *s->p < 0x20)
			return false;
		if ((unsigned char) *s->p >= 0x80)
		{
			int			n = pg_utf_mblen((const unsigned char *) s->p);

			if (n < 2 || s->end - s->p < n || !pg_utf8_islegal((const unsigned char *) s->p, n))
				return false;
			appendBinaryStringInfo(&s->text, s->p, n);
			s->p += n;
			continue;
		}
		/* an escape */
		if (s->end - s->p < 2)
			return false;
		s->p++;
		switch (*s->p++)
		{
			case '"':
				appendStringInfoChar(&s->text, '"');
				break;
			case '\\':
				appendStringInfoChar(&s->text, '\\');
				break;
			case '/':
				appendStringInfoChar(&s->text, '/');
				break;
			case 'b':
				appendStringInfoChar(&s->text, '\b');
				break;
			case 'f':
				appendStringInfoChar(&s->text, '\f');
				break;
			case 'n':
				appendStringInfoChar(&s->text, '\n');
				break;
			case 'r':
				appendStringInfoChar(&s->text, '\r');
				break;
			case 't':
				appendStringInfoChar(&s->text, '\t');
				break;
			case 'u':
				{
					int			cp = read_hex4(s);

					if (cp <= 0 || (cp >= 0xDC00 && cp <= 0xDFFF))
						return false;	/* NUL, half a pair: jansson's way decides */
					if (cp >= 0xD800 && cp <= 0xDBFF)
					{
						int			low;

						if (s->end - s->p < 6 || s->p[0] != '\\' || s->p[1] != 'u')
							return false;
						s->p += 2;
						low = read_hex4(s);
						if (low < 0xDC00 || low > 0xDFFF)
							return false;
						cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
					}
					append_utf8(&s->text, cp);
					break;
				}
			default:
				return false;
		}
	}
}

/*
 * A string (at its opening quote) as *data and *len: the input's own bytes
 * when the string is plain ASCII without escapes (most are), else its
 * unescaped text in s->text. Eight bytes are checked at a time for a quote,
 * a backslash, a control character or a byte of a multibyte character.
 */
#define BYTES_OF(c) (UINT64CONST(0x0101010101010101) * (c))
#define HAS_ZERO_BYTE(v) (((v) - BYTES_OF(0x01)) & ~(v) & BYTES_OF(0x80))

static bool
read_string_span(Scanner *s, const char **data, int *len)
{
	const char *start = s->p + 1;
	const char *p = start;

	if (s->p >= s->end || *s->p != '"')
		return false;
	while (s->end - p >= 8)
	{
		uint64		v;

		memcpy(&v, p, 8);
		if ((v & BYTES_OF(0x80)) || HAS_ZERO_BYTE(v ^ BYTES_OF('"')) ||
			HAS_ZERO_BYTE(v ^ BYTES_OF('\\')) || ((v - BYTES_OF(0x20)) & ~v & BYTES_OF(0x80)))
			break;
		p += 8;
	}
	for (; p < s->end; p++)
	{
		unsigned char c = (unsigned char) *p;

		if (c == '"')
		{
			*data = start;
			*len = p - start;
			s->p = p + 1;
			return true;
		}
		if (c == '\\' || c < 0x20 || c >= 0x80)
			break;
	}
	if (!read_string(s))
		return false;
	*data = s->text.data;
	*len = s->text.len;
	return true;
}

static bool
read_digits(Scanner *s)
{
	const char *start = s->p;

	while (s->p < s->end && *s->p >= '0' && *s->p <= '9')
		s->p++;
	return s->p > start;
}

/* A number as JSON writes it: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? */
static bool
read_number(Scanner *s)
{
	if (s->p < s->end && *s->p == '-')
		s->p++;
	if (s->p < s->end && *s->p == '0')
		s->p++;
	else if (!read_digits(s))
		return false;
	if (s->p < s->end && *s->p == '.')
	{
		s->p++;
		if (!read_digits(s))
			return false;
	}
	if (s->p < s->end && (*s->p == 'e' || *s->p == 'E'))
	{
		s->p++;
		if (s->p < s->end && (*s->p == '+' || *s->p == '-'))
			s->p++;
		if (!read_digits(s))
			return false;
	}
	return true;
}

static bool
read_literal(Scanner *s, const char *word)
{
	size_t		n = strlen(word);

	if ((size_t) (s->end - s->p) < n || memcmp(s->p, word, n) != 0)
		return false;
	s->p += n;
	return true;
}

/* A string passed over: checked, and copied only when it has escapes. */
static bool
skip_string(Scanner *s)
{
	const char *data;
	int			len;

	return read_string_span(s, &data, &len);
}

/* Any value, checked and passed over. */
static bool
skip_value(Scanner *s, int depth)
{
	skip_ws(s);
	if (s->p >= s->end || depth > SCAN_MAX_DEPTH)
		return false;
	switch (*s->p)
	{
		case '"':
			return skip_string(s);
		case '{':
			s->p++;
			if (take_char(s, '}'))
				return true;
			do
			{
				skip_ws(s);
				if (!skip_string(s) || !take_char(s, ':') || !skip_value(s, depth + 1))
					return false;
			} while (take_char(s, ','));
			return take_char(s, '}');
		case '[':
			s->p++;
			if (take_char(s, ']'))
				return true;
			do
			{
				if (!skip_value(s, depth + 1))
					return false;
			} while (take_char(s, ','));
			return take_char(s, ']');
		case 't':
			return read_literal(s, "true");
		case 'f':
			return read_literal(s, "false");
		case 'n':
			return read_literal(s, "null");
		default:
			return read_number(s);
	}
}

/* The field named name[0..len): the one after the last found first (APIs keep their order). */
static int
find_field(const char **names, const int *lengths, int nfields, int *expected, const char *name, int len)
{
	if (*expected < nfields && lengths[*expected] == len && memcmp(names[*expected], name, len) == 0)
		return (*expected)++;
	for (int f = 0; f < nfields; f++)
		if (lengths[f] == len && memcmp(names[f], name, len) == 0)
		{
			*expected = f + 1;
			return f;
		}
	return -1;
}

/*
 * A number as jansson reads it and sync_json_append() writes it back: an
 * integer (no fraction, no exponent) through strtoll, a real through strtod
 * and Ryu. What jansson refuses (out of range) makes the scanner give up.
 */
static bool
copy_number(Scanner *s, StringInfo out)
{
	const char *start = s->p;
	char		token[400];
	size_t		len;
	bool		is_real;

	if (!read_number(s))
		return false;
	len = s->p - start;
	if (len >= sizeof(token))
		return false;
	memcpy(token, start, len);
	token[len] = '\0';
	is_real = strpbrk(token, ".eE") != NULL;
	errno = 0;
	if (!is_real)
	{
		long long	v = strtoll(token, NULL, 10);

		if (errno == ERANGE)
			return false;
		appendStringInfo(out, "%lld", v);
	}
	else
	{
		double		v = strtod(token, NULL);

		if (isinf(v))
			return false;
		sync_json_append_real(out, v);
	}
	return true;
}

/*
 * Any value, written to out as compact JSON exactly as jansson's tree of it
 * would be printed by sync_json_append(): the json columns' and the objects'
 * text without building the tree. Duplicate keys (jansson keeps the last
 * value at the first place) make it give up.
 */
static bool
copy_value(Scanner *s, StringInfo out, int depth)
{
	skip_ws(s);
	if (s->p >= s->end || depth > SCAN_MAX_DEPTH)
		return false;
	switch (*s->p)
	{
		case '"':
			if (!read_string(s))
				return false;
			sync_json_append_string(out, s->text.data, s->text.len);
			return true;
		case '{':
			{
				int			keys[32];	/* offsets in out of the keys written */
				int			nkeys = 0;

				s->p++;
				appendStringInfoChar(out, '{');
				if (take_char(s, '}'))
				{
					appendStringInfoChar(out, '}');
					return true;
				}
				do
				{
					int			key_at;
					int			key_len;

					skip_ws(s);
					if (!read_string(s) || !take_char(s, ':') || nkeys == lengthof(keys))
						return false;
					if (nkeys > 0)
						appendStringInfoChar(out, ',');
					key_at = out->len;
					sync_json_append_string(out, s->text.data, s->text.len);
					key_len = out->len - key_at;
					for (int k = 0; k < nkeys; k++)
					{
						/* escaping is deterministic: the same key is the same text */
						if (memcmp(out->data + keys[k], out->data + key_at, key_len) == 0)
							return false;
					}
					keys[nkeys++] = key_at;
					appendStringInfoChar(out, ':');
					if (!copy_value(s, out, depth + 1))
						return false;
				} while (take_char(s, ','));
				if (!take_char(s, '}'))
					return false;
				appendStringInfoChar(out, '}');
				return true;
			}
		case '[':
			s->p++;
			appendStringInfoChar(out, '[');
			if (take_char(s, ']'))
			{
				appendStringInfoChar(out, ']');
				return true;
			}
			{
				bool		first = true;

				do
				{
					if (!first)
						appendStringInfoChar(out, ',');
					first = false;
					if (!copy_value(s, out, depth + 1))
						return false;
				} while (take_char(s, ','));
			}
			if (!take_char(s, ']'))
				return false;
			appendStringInfoChar(out, ']');
			return true;
		case 't':
			appendStringInfoString(out, "true");
			return read_literal(s, "true");
		case 'f':
			appendStringInfoString(out, "false");
			return read_literal(s, "false");
		case 'n':
			appendStringInfoString(out, "null");
			return read_literal(s, "null");
		default:
			return copy_number(s, out);
	}
}

/*
 * One record's value of field f, as records.c would have made it from
 * jansson's value. Scalars are taken as written; objects and arrays, and
 * every value of a json column, are copied in jansson's printed form; array
 * columns (whose literals records.c makes) go through jansson.
 */
static bool
read_field_value(Scanner *s, SyncBatch *b, int f, int row, ValueForm form)
{
	const char *start;
	json_t	   *v;
	json_error_t err;

	skip_ws(s);
	if (s->p >= s->end)
		return false;
	start = s->p;
	if (*s->p == 'n')
	{
		b->nulls[f][row] = true;
		return read_literal(s, "null");
	}
	if (form == FORM_TEXT && *s->p == '"')
	{
		const char *data;
		int			len;

		if (!read_string_span(s, &data, &len))
			return false;
		b->values[f][row] = sync_batch_make_text(b, data, len);
		b->nulls[f][row] = false;
		return true;
	}
	if (form == FORM_TEXT && (*s->p == '-' || (*s->p >= '0' && *s->p <= '9')))
	{
		if (!read_number(s))
			return false;
		b->values[f][row] = sync_batch_make_text(b, start, s->p - start);
		b->nulls[f][row] = false;
		return true;
	}
	if (form == FORM_TEXT && (*s->p == 't' || *s->p == 'f'))
	{
		bool		is_true = *s->p == 't';

		if (!read_literal(s, is_true ? "true" : "false"))
			return false;
		b->values[f][row] = sync_batch_make_text(b, is_true ? "true" : "false", is_true ? 4 : 5);
		b->nulls[f][row] = false;
		return true;
	}
	if (form != FORM_ARRAY)
	{
		resetStringInfo(&s->json);
		if (!copy_value(s, &s->json, 1))
			return false;
		b->values[f][row] = sync_batch_make_text(b, s->json.data, s->json.len);
		b->nulls[f][row] = false;
		return true;
	}
	if (!skip_value(s, 1))
		return false;
	v = json_loadb(start, s->p - start, JSON_DECODE_ANY, &err);
	if (v == NULL)
		return false;
	b->values[f][row] = sync_json_value_datum(v, list_nth(b->fields, f), &b->nulls[f][row]);
	json_decref(v);
	return true;
}

/* One record (an object) into a new row of b; false to give up. */
static bool
read_record(Scanner *s, SyncBatch *b, const char **names, const int *lengths, const ValueForm *forms,
			const char *deleted_key)
{
	int			row = sync_batch_add(b);
	int			expected = 0;

	skip_ws(s);
	if (s->p < s->end && *s->p != '{')
		return skip_value(s, 1);	/* not an object: a row of nulls, as before */
	s->p++;
	if (take_char(s, '}'))
		return true;
	do
	{
		int			f;
		const char *key;
		int			key_len;

		skip_ws(s);
		if (!read_string_span(s, &key, &key_len) || !take_char(s, ':'))
			return false;
		f = find_field(names, lengths, b->nfields, &expected, key, key_len);
		if (f < 0)
		{
			bool		deleted_flag = deleted_key && (size_t) key_len == strlen(deleted_key) &&
				memcmp(key, deleted_key, key_len) == 0;

			skip_ws(s);
			if (deleted_flag && s->p < s->end && *s->p == 't')
				return false;	/* a deletion, not an upsert: the caller sorts it out */
			if (!skip_value(s, 1))
				return false;
			continue;
		}
		if (!read_field_value(s, b, f, row, forms[f]))
			return false;
	} while (take_char(s, ','));
	return take_char(s, '}');
}

/*
 * Read a page (an object) whose records are the array under array_key into
 * *batch for fields, and its other members into *envelope. false: the page
 * is not one this scanner takes (parse it with jansson; nothing is kept).
 * A record whose deleted_key member is true makes it give up too.
 */
bool
sync_json_scan_page(const char *body, size_t len, const char *array_key, List *fields,
					const char *deleted_key, json_t **envelope, SyncBatch **batch)
{
	Scanner		s = {body, body + len};
	/* room for the page's records at once: a record takes some hundred bytes of JSON at least */
	SyncBatch  *b = sync_batch_new(fields, (int) Min(Max(len / 512, 64), 8192));
	json_t	   *env = json_object();
	const char **names = palloc(sizeof(char *) * Max(b->nfields, 1));
	int		   *lengths = palloc(sizeof(int) * Max(b->nfields, 1));
	ValueForm  *forms = palloc(sizeof(ValueForm) * Max(b->nfields, 1));
	bool		ok = false;
	bool		seen_array = false;
	ListCell   *lc;

	initStringInfo(&s.text);
	initStringInfo(&s.json);
	foreach(lc, fields)
	{
		SyncField  *f = lfirst(lc);
		size_t		len = strlen(f->wire_type);
		ValueForm	form = FORM_TEXT;

		names[foreach_current_index(lc)] = f->api_field;
		lengths[foreach_current_index(lc)] = strlen(f->api_field);
		if (strcmp(f->wire_type, "json") == 0 || strcmp(f->wire_type, "jsonb") == 0)
			form = FORM_JSON;
		else if (len > 2 && strcmp(f->wire_type + len - 2, "[]") == 0)
			form = FORM_ARRAY;
		forms[foreach_current_index(lc)] = form;
	}

	if (!take_char(&s, '{'))
		goto done;
	if (!take_char(&s, '}'))
	{
		do
		{
			char	   *key;
			const char *start;

			skip_ws(&s);
			if (!read_string(&s) || !take_char(&s, ':'))
				goto done;
			key = pnstrdup(s.text.data, s.text.len);
			if (strlen(key) != (size_t) s.text.len)
				goto done;
			skip_ws(&s);
			if (strcmp(key, array_key) == 0)
			{
				if (seen_array)
					goto done;	/* twice: jansson keeps the last, let it */
				seen_array = true;
				if (!take_char(&s, '['))
					goto done;
				if (!take_char(&s, ']'))
				{
					do
					{
						if (!read_record(&s, b, names, lengths, forms, deleted_key))
							goto done;
						if ((b->nrecords & 1023) == 0)
							CHECK_FOR_INTERRUPTS();
					} while (take_char(&s, ','));
					if (!take_char(&s, ']'))
						goto done;
				}
				continue;
			}
			start = s.p;
			if (!skip_value(&s, 1))
				goto done;
			{
				json_error_t err;
				json_t	   *v = json_loadb(start, s.p - start, JSON_DECODE_ANY, &err);

				if (v == NULL)
					goto done;
				json_object_set_new(env, key, v);
			}
		} while (take_char(&s, ','));
		if (!take_char(&s, '}'))
			goto done;
	}
	skip_ws(&s);
	ok = seen_array && s.p == s.end;

done:
	pfree(s.text.data);
	pfree(s.json.data);
	pfree(names);
	pfree(lengths);
	pfree(forms);
	if (!ok)
	{
		json_decref(env);
		return false;
	}
	*envelope = env;
	*batch = b;
	return true;
}
