/*
 * naming.c: API names (FirstName, Loyalty_Tier__c, "Deal Stage") to column
 * and table names as a Postgres user would write them (first_name,
 * loyalty_tier__c, deal_stage). Results are always quoted when used in SQL;
 * these rules only make them pleasant to type.
 */
#include "sync.h"

#include "common/hashfn.h"
#include "mb/pg_wchar.h"

static bool
is_upper(char c)
{
	return c >= 'A' && c <= 'Z';
}

static bool
is_lower_or_digit(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
}

/* Fit a name into NAMEDATALEN - 1 bytes; a hash of the whole name keeps truncated names apart. */
static char *
fit_identifier(const char *name)
{
	int			len = strlen(name);
	char		suffix[16];
	int			keep;
	char	   *result;

	if (len < NAMEDATALEN)
		return pstrdup(name);
	snprintf(suffix, sizeof(suffix), "_%08x", hash_bytes((const unsigned char *) name, len));
	keep = pg_mbcliplen(name, len, NAMEDATALEN - 1 - (int) strlen(suffix));
	result = palloc(keep + strlen(suffix) + 1);
	memcpy(result, name, keep);
	strcpy(result + keep, suffix);
	return result;
}

char *
sync_identifier_from_api_name(const char *api_name)
{
	StringInfoData buf;
	int			n = strlen(api_name);

	initStringInfo(&buf);
	for (int i = 0; i < n; i++)
	{
		char		c = api_name[i];
		char		prev = i > 0 ? api_name[i - 1] : '\0';
		char		next = i + 1 < n ? api_name[i + 1] : '\0';

		if (is_upper(c))
		{
			bool		boundary = is_lower_or_digit(prev) ||
				(is_upper(prev) && next >= 'a' && next <= 'z');

			if (boundary && buf.len > 0 && buf.data[buf.len - 1] != '_')
				appendStringInfoChar(&buf, '_');
			appendStringInfoChar(&buf, c - 'A' + 'a');
		}
		else if (is_lower_or_digit(c) || c == '_' || (unsigned char) c >= 0x80)
			appendStringInfoChar(&buf, c);
		else if (buf.len > 0 && buf.data[buf.len - 1] != '_')
			appendStringInfoChar(&buf, '_');	/* spaces, dots, quotes, ... */
	}
	/* "Deal Stage " leaves a trailing separator; "__c" suffixes are kept. */
	while (buf.len > 1 && buf.data[buf.len - 1] == '_' && api_name[n - 1] != '_')
		buf.data[--buf.len] = '\0';
	if (buf.len == 0)
		appendStringInfoString(&buf, "field");
	if (buf.data[0] >= '0' && buf.data[0] <= '9')
	{
		char	   *prefixed = psprintf("_%s", buf.data);

		return fit_identifier(prefixed);
	}
	return fit_identifier(buf.data);
}

/* wanted, or wanted_2, wanted_3, ... : the first not in taken (a List of char *). */
char *
sync_unique_identifier(const char *wanted, List *taken)
{
	char	   *candidate = pstrdup(wanted);

	for (int n = 2;; n++)
	{
		ListCell   *lc;
		bool		clash = false;

		foreach(lc, taken)
		{
			if (strcmp((char *) lfirst(lc), candidate) == 0)
			{
				clash = true;
				break;
			}
		}
		if (!clash)
			return candidate;
		{
			char		suffix[16];
			int			slen = snprintf(suffix, sizeof(suffix), "_%d", n);
			int			keep = pg_mbcliplen(wanted, strlen(wanted),
											Min((int) strlen(wanted), NAMEDATALEN - 1 - slen));

			candidate = psprintf("%.*s%s", keep, wanted, suffix);
		}
	}
}
