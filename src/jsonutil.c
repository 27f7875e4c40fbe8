/*
 * jsonutil.c: small jansson helpers with Postgres errors. jansson allocates
 * with malloc, so its values survive memory context resets: every json_t has
 * exactly one owner that calls json_decref.
 */
#include "sync.h"

#include <float.h>

#include "utils/builtins.h"
#include "utils/jsonb.h"

json_t *
sync_json_parse(const char *text, size_t len, const char *what)
{
	json_error_t err;
	json_t	   *value = json_loadb(text, len, JSON_ALLOW_NUL, &err);

	if (value == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("malformed JSON in %s: %s", what, err.text),
				 errdetail("The error is at line %d, column %d.", err.line, err.column)));
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
 * Reals are written with DBL_DIG (15) significant digits: an API's decimal of
 * up to 15 digits comes back exactly as sent ("412.18", not jansson's default
 * 17-digit "412.18000000000001").
 */
char *
sync_json_dump(json_t *value)
{
	char	   *text = json_dumps(value, JSON_COMPACT | JSON_ENCODE_ANY | JSON_REAL_PRECISION(DBL_DIG));

	if (text == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not serialize JSON")));
	return text;
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
		return (int64) json_real_value(v);
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
