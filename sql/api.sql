-- The SQL API: sources, options, privileges, naming. Workers are off (sync.enabled = off).
CREATE EXTENSION sync;
SELECT extversion FROM pg_extension WHERE extname = 'sync';

-- A source, and what everyone may see of it.
SELECT sync.create_source('acme', 'salesforce', 'https://acme.my.salesforce.com',
       '{"client_id": "cid", "client_secret": "s3cret", "refresh_token": "rt-secret"}',
       '{"requests_per_second": 2, "api_version": "v61.0"}') AS source_id;
SELECT name, kind, base_url, options, paused FROM sync.sources;
SELECT * FROM sync.status;
SELECT * FROM sync.columns;

-- Budgets and statistics: a source appears at once; its budget once it has made a request.
SELECT source, kind, requests_per_second, quota_fraction, collections, poll_cycle FROM sync.budgets;
SELECT source, kind, requests, records_upserted, records_deleted, bytes_received, errors, rate_limited, retries,
       stats_reset IS NOT NULL AS has_reset_time FROM sync.stat_sources;
SELECT sync.alter_source('acme', options => '{"quota_fraction": 0.1}');
SELECT options FROM sync.sources WHERE name = 'acme';
SELECT sync.reset_stats();
SELECT sync.reset_stats('acme');

-- Options are merged; a null value removes a key; credentials are replaced and the token dropped.
SELECT sync.alter_source('acme', options => '{"batch_size": 500, "api_version": null}');
SELECT options FROM sync.sources WHERE name = 'acme';
UPDATE sync.source_secrets SET token = '{"access_token": "x", "instance_url": "https://i"}';
SELECT sync.alter_source('acme', credentials => '{"client_id": "cid", "client_secret": "new", "refresh_token": "rt2"}');
SELECT credentials->>'client_secret' AS secret, token FROM sync.source_secrets;

-- Pause and resume a whole source.
SELECT sync.pause('acme');
SELECT paused FROM sync.sources WHERE name = 'acme';
SELECT sync.resume('acme');
SELECT paused FROM sync.sources WHERE name = 'acme';

-- API names become the identifiers a Postgres user would write.
SELECT n, sync._identifier(n)
FROM unnest(ARRAY['Id', 'FirstName', 'SystemModstamp', 'AccountId', 'Loyalty_Tier__c', 'HTTPStatusCode',
                  'Deal Stage', 'hs_lastmodifieddate', 'Name"; DROP TABLE x; --', '2nd Phone', 'Ünïcode Fïeld',
                  'a.b.c', '', repeat('VeryLongFieldName', 6)]) AS n;
SELECT length(sync._identifier(repeat('VeryLongFieldName', 6))) <= 63 AS fits,
       sync._identifier(repeat('VeryLongFieldName', 6) || 'A') <> sync._identifier(repeat('VeryLongFieldName', 6) || 'B') AS distinct_after_truncation;

-- An unprivileged role reads the status views but never a secret, and cannot configure.
CREATE ROLE sync_reader LOGIN;
SET ROLE sync_reader;
SELECT source, collection FROM sync.status;
SELECT source, requests FROM sync.stat_sources;
SELECT source, requests_per_second FROM sync.budgets;
SELECT count(*) FROM sync.stat_collections;
SELECT sync.reset_stats();
SELECT name FROM sync.sources;
SELECT credentials FROM sync.source_secrets;
SELECT sync.create_source('evil', 'salesforce', 'https://e.example.com', '{"client_id": "a", "client_secret": "b", "refresh_token": "c"}');
SELECT sync.drop_source('acme');
RESET ROLE;

-- Dropping a source.
SELECT sync.drop_source('acme');
SELECT count(*) FROM sync.sources;
SELECT count(*) FROM sync.source_secrets;

DROP ROLE sync_reader;
DROP EXTENSION sync;
