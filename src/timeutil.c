/*
 * timeutil.c: the API timestamps providers read and write.
 */
#include "sync.h"

#include <time.h>

/*
 * Seconds since the epoch of an ISO 8601 timestamp such as
 * "2024-05-01T12:34:56.000+0000", "…56.789Z" or "…56+00:00"; -1 if malformed.
 */
double
sync_parse_iso8601(const char *s)
{
	struct tm	tm;
	int			n = 0;
	double		frac = 0;
	int			sign = 0,
				oh = 0,
				om = 0;
	const char *p;

	if (s == NULL)
		return -1;
	memset(&tm, 0, sizeof(tm));
	if (sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d%n", &tm.tm_year, &tm.tm_mon, &tm.tm_mday,
			   &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &n) != 6)
		return -1;
	if (tm.tm_mon < 1 || tm.tm_mon > 12 || tm.tm_mday < 1 || tm.tm_mday > 31 ||
		tm.tm_hour > 23 || tm.tm_min > 59 || tm.tm_sec > 60 || tm.tm_year < 0)
		return -1;
	p = s + n;
	if (*p == '.')
	{
		/* digits only: strtod would also read an exponent ("…56.5e300") */
		double		scale = 0.1;

		for (p++; *p >= '0' && *p <= '9'; p++, scale /= 10)
			frac += (*p - '0') * scale;
	}
	if (*p == '+' || *p == '-')
	{
		sign = (*p == '-') ? -1 : 1;
		if ((sscanf(p + 1, "%2d:%2d", &oh, &om) != 2 && sscanf(p + 1, "%2d%2d", &oh, &om) != 2) ||
			oh < 0 || oh > 23 || om < 0 || om > 59)
			return -1;
	}
	else if (*p != 'Z' && *p != '\0')
		return -1;
	tm.tm_year -= 1900;
	tm.tm_mon -= 1;
	return (double) timegm(&tm) + frac - sign * (oh * 3600 + om * 60);
}

/* An epoch time formatted in UTC with strftime's format. */
char *
sync_format_utc(double epoch, const char *format)
{
	time_t		t;
	struct tm	tm;
	char		buf[64];

	/* years 1 to 9999: anything else is not a time an API meant */
	if (!(epoch >= -62135596800.0 && epoch <= 253402300799.0))
		epoch = epoch > 0 ? 253402300799.0 : -62135596800.0;
	t = (time_t) epoch;
	gmtime_r(&t, &tm);
	strftime(buf, sizeof(buf), format, &tm);
	return pstrdup(buf);
}
