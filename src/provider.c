/*
 * provider.c: the registry of providers. Adding a provider is one file with
 * a SyncProvider and one line here.
 */
#include "sync.h"

static const SyncProvider *const providers[] = {
	&sync_salesforce_provider,
	&sync_stripe_provider,
	&sync_hubspot_provider,
	&sync_airtable_provider,
};

const SyncProvider *
sync_find_provider(const char *kind)
{
	if (kind == NULL)
		return NULL;
	for (size_t i = 0; i < lengthof(providers); i++)
		if (strcmp(providers[i]->kind, kind) == 0)
			return providers[i];
	return NULL;
}

/* "salesforce, hubspot" for hints. */
const char *
sync_provider_kinds(void)
{
	StringInfoData buf;

	initStringInfo(&buf);
	for (size_t i = 0; i < lengthof(providers); i++)
		appendStringInfo(&buf, "%s%s", i ? ", " : "", providers[i]->kind);
	return buf.data;
}
