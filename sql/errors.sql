-- Bad arguments are rejected at call time with a clear message and hint.
CREATE EXTENSION sync;
\set VERBOSITY default
\set creds '{"client_id": "cid", "client_secret": "secret", "refresh_token": "rt"}'

SELECT sync.create_source('acme', 'salesfarce', 'https://acme.my.salesforce.com', :'creds');
SELECT sync.create_source('acme', 'salesforce', 'not a url', :'creds');
SELECT sync.create_source('acme', 'salesforce', 'ftp://acme.example.com', :'creds');
SELECT sync.create_source('acme', 'salesforce', 'file:///etc/passwd', :'creds');
SELECT sync.create_source('acme', 'salesforce', 'https://acme.my.salesforce.com', '{"client_id": "cid"}');
SELECT sync.create_source('acme', 'salesforce', 'https://acme.my.salesforce.com', '{"client_id": "cid", "client_secret": "", "refresh_token": "rt"}');
SELECT sync.create_source('acme', 'salesforce', 'https://acme.my.salesforce.com', '[1, 2]');
SELECT sync.create_source('Acme Corp', 'salesforce', 'https://acme.my.salesforce.com', :'creds');
SELECT sync.create_source('acme', 'salesforce', 'https://acme.my.salesforce.com', :'creds', '{"requests_per_second": -1}');
SELECT sync.create_source('acme', 'salesforce', 'https://acme.my.salesforce.com', :'creds', '{"requests_per_second": "fast"}');
SELECT sync.create_source('acme', 'salesforce', 'https://acme.my.salesforce.com', :'creds', '{"quota_fraction": 0}');
SELECT sync.create_source('acme', 'salesforce', 'https://acme.my.salesforce.com', :'creds', '{"quota_fraction": 1.5}');
SELECT sync.create_source('acme', 'salesforce', 'https://acme.my.salesforce.com', :'creds', '{"quota_fraction": "most"}');
SELECT sync.create_source('acme', 'salesforce', 'https://acme.my.salesforce.com', :'creds', '{"burst": 0.5}');
SELECT sync.create_source('acme', 'salesforce', 'https://acme.my.salesforce.com', :'creds', '{"batch_size": 5000}');
SELECT sync.create_source('acme', 'salesforce', 'https://acme.my.salesforce.com', :'creds', '{"api_version": "latest"}');
SELECT sync.create_source('acme', 'salesforce', 'https://acme.my.salesforce.com', :'creds', '{"verify_tls": false}');
SELECT sync.create_source('acme', 'salesforce', 'https://acme.my.salesforce.com', :'creds', '{"login_url": "gopher://x"}');
SELECT count(*) AS nothing_created FROM sync.sources;

SELECT sync.create_source('acme', 'salesforce', 'https://acme.my.salesforce.com', :'creds');
SELECT sync.create_source('acme', 'salesforce', 'https://acme.my.salesforce.com', :'creds');

-- Unknown sources and collections.
SELECT sync.alter_source('nope', options => '{}');
SELECT sync.drop_source('nope');
SELECT sync.add_collection('nope', 'Contact');
SELECT sync.remove_collection('acme', 'Contact');
SELECT sync.pause('acme', 'Contact');
SELECT sync.resync('acme', 'Contact');
SELECT sync.wait_for_backfill('acme', 'Contact', '1 second');
SELECT sync.wait_for_backfill('acme', 'Contact', '-1 second');
SELECT sync.reset_stats('acme', 'Contact');
SELECT sync.reset_stats(NULL, 'Contact');
SELECT sync.reset_stats('nope');
SELECT sync.add_column('acme', 'Contact', 'Email');
SELECT sync.alter_column('acme', 'Contact', 'email', 'text');
SELECT sync.remove_column('acme', 'Contact', 'email');
SELECT sync.add_collection('acme', 'Contact; DROP TABLE x');
SELECT sync.add_collection('acme', 'Contact', '{"fields": "Email"}');

-- An API that cannot be reached fails add_collection itself, and nothing is left behind.
SELECT sync.alter_source('acme', base_url => 'http://127.0.0.1:9');
DO $$
BEGIN
    PERFORM sync.add_collection('acme', 'Contact');
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'add_collection failed: % %', SQLSTATE, regexp_replace(SQLERRM, ': .*', ': ...');
END $$;
SELECT count(*) AS no_collection FROM sync.collections;
SELECT count(*) AS no_table FROM pg_tables WHERE schemaname = 'acme';

-- Stripe: keys and collections are checked at call time.
SELECT sync.create_source('billing', 'stripe', 'https://api.stripe.com', '{"secret_key": "pk_test_123"}');
SELECT sync.create_source('billing', 'stripe', 'https://api.stripe.com', '{"api_key": "sk_test_123"}');
SELECT sync.create_source('billing', 'stripe', 'https://api.stripe.com', '{"secret_key": "sk_test_123"}');
SELECT sync.add_collection('billing', 'refunds_and_disputes');

-- Functions are safe against search_path tricks: a shadowing function is not called.
CREATE SCHEMA evil;
CREATE FUNCTION evil.jsonb_typeof(jsonb) RETURNS text LANGUAGE sql AS $$ SELECT 'object' $$;
SET search_path = evil, public;
SELECT sync.create_source('other', 'salesforce', 'https://other.my.salesforce.com', '[]');
RESET search_path;
DROP SCHEMA evil CASCADE;

DROP EXTENSION sync;
