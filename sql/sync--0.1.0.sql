-- sync 0.1.0: catalog, status views and SQL API.
\echo Use "CREATE EXTENSION sync" to load this file. \quit

-------------------------------------------------------------------------------
-- Catalog
-------------------------------------------------------------------------------

CREATE TABLE sync.sources (
    id          serial PRIMARY KEY,
    name        text NOT NULL UNIQUE
                CHECK (name ~ '^[a-z_][a-z0-9_]*$' AND length(name) <= 63),
    kind        text NOT NULL,
    base_url    text NOT NULL,
    options     jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(options) = 'object'),
    paused      boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE sync.sources IS 'API accounts that sync reads from; secrets live in sync.source_secrets';

-- Credentials and tokens: readable only by the extension's owner and superusers.
CREATE TABLE sync.source_secrets (
    source_id        integer PRIMARY KEY REFERENCES sync.sources ON DELETE CASCADE,
    credentials      jsonb NOT NULL,
    token            jsonb,
    token_updated_at timestamptz
);
REVOKE ALL ON sync.source_secrets FROM PUBLIC;

CREATE TABLE sync.collections (
    id          serial PRIMARY KEY,
    source_id   integer NOT NULL REFERENCES sync.sources ON DELETE CASCADE,
    name        text NOT NULL,
    relid       oid NOT NULL,
    options     jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(options) = 'object'),
    paused      boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source_id, name)
);

CREATE TABLE sync.collection_columns (
    collection_id integer NOT NULL REFERENCES sync.collections ON DELETE CASCADE,
    position      integer NOT NULL,
    api_field     text NOT NULL,
    api_type      text NOT NULL,
    column_name   text NOT NULL,
    column_type   text NOT NULL,
    wire_type     text NOT NULL,
    convert_sql   text,
    is_key        boolean NOT NULL DEFAULT false,
    is_version    boolean NOT NULL DEFAULT false,
    attnum        smallint,             -- the column in the table, followed through renames
    PRIMARY KEY (collection_id, api_field),
    UNIQUE (collection_id, column_name)
);

-- Every field the API describes for a collection, synced or not; refreshed by the worker
-- (option schema_interval), so fields added in the API later are listed, ready to add.
CREATE TABLE sync.api_fields (
    collection_id integer NOT NULL REFERENCES sync.collections ON DELETE CASCADE,
    position      integer NOT NULL,
    api_field     text NOT NULL,
    api_type      text NOT NULL,
    column_name   text NOT NULL,        -- the column name and type sync would give it
    column_type   text NOT NULL,
    wire_type     text NOT NULL,
    convert_sql   text,
    is_key        boolean NOT NULL DEFAULT false,
    is_version    boolean NOT NULL DEFAULT false,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (collection_id, api_field)
);

-- Where each collection stands. The cursor is the provider's own and commits with each page.
CREATE TABLE sync.collection_state (
    collection_id         integer PRIMARY KEY REFERENCES sync.collections ON DELETE CASCADE,
    phase                 text NOT NULL DEFAULT 'backfill' CHECK (phase IN ('backfill', 'incremental')),
    cursor                jsonb NOT NULL DEFAULT '{}',
    backfill_started_at   timestamptz,
    backfill_completed_at timestamptz,
    backfill_records      bigint NOT NULL DEFAULT 0,
    backfill_total        bigint,
    backfill_rate         double precision,
    rate_mark_at          timestamptz,      -- where the backfill rate's window starts
    rate_mark_records     bigint,
    last_poll_at          timestamptz,
    last_caught_up_at     timestamptz,
    records_upserted      bigint NOT NULL DEFAULT 0,
    records_deleted       bigint NOT NULL DEFAULT 0,
    requests              bigint NOT NULL DEFAULT 0,
    bytes_received        bigint NOT NULL DEFAULT 0,
    errors                bigint NOT NULL DEFAULT 0,
    rate_limited          bigint NOT NULL DEFAULT 0,
    retries               bigint NOT NULL DEFAULT 0,
    stats_reset           timestamptz NOT NULL DEFAULT now(),
    -- requests since the collection was last caught up, and their moving average per polling cycle
    cycle_requests        bigint NOT NULL DEFAULT 0,
    avg_cycle_requests    double precision,
    consecutive_failures  integer NOT NULL DEFAULT 0,
    last_error            text,
    last_error_at         timestamptz,
    activity              text,
    run_requested         boolean NOT NULL DEFAULT false,
    reconcile_requested   boolean NOT NULL DEFAULT false,
    sweep_started_at      timestamptz,
    last_sweep_started_at timestamptz,
    last_sweep_at         timestamptz,
    -- a backfill of some columns only: {"fields": [...], "cursor": {...}, "records": n, "started_at": ...}
    column_backfill       jsonb,
    last_column_backfill  jsonb,
    schema_checked_at     timestamptz DEFAULT now(),
    unsynced_attnums      smallint[] NOT NULL DEFAULT '{}'   -- user columns sync said it does not fill
);

-- Values the API sent that do not fit their column: the row was stored with null there
-- (or, when the key did not fit, not at all). One row per record and field, kept up to date.
CREATE TABLE sync.rejected_values (
    collection_id    integer NOT NULL REFERENCES sync.collections ON DELETE CASCADE,
    record_id        text NOT NULL,
    api_field        text NOT NULL,
    column_name      text NOT NULL,
    value            text,
    sqlstate         text NOT NULL,
    message          text NOT NULL,
    record_dropped   boolean NOT NULL DEFAULT false,
    first_rejected_at timestamptz NOT NULL DEFAULT now(),
    last_rejected_at timestamptz NOT NULL DEFAULT now(),
    times            integer NOT NULL DEFAULT 1,
    PRIMARY KEY (collection_id, record_id, api_field)
);
COMMENT ON TABLE sync.rejected_values IS 'API values that did not fit their column; readable like the synced tables (not by PUBLIC)';

-- Ids seen by the delete sweep in progress: rows not seen by its end were deleted in the API.
CREATE TABLE sync.sweep_ids (
    collection_id integer NOT NULL REFERENCES sync.collections ON DELETE CASCADE,
    id            text NOT NULL,
    PRIMARY KEY (collection_id, id)
);

-- Where sync tells users about events: e-mail through an SMTP server, or a POST to a URL.
-- Readable only by the extension's owner: targets hold addresses and SMTP passwords.
CREATE TABLE sync.notification_targets (
    id          serial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    kind        text NOT NULL CHECK (kind IN ('email', 'webhook')),
    target      text NOT NULL,
    options     jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(options) = 'object'),
    events      text[] NOT NULL DEFAULT '{backfill_completed,collection_failing}',
    created_at  timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON sync.notification_targets FROM PUBLIC;

-- Each event for each target, written in the transaction that made the event happen and
-- delivered by the worker afterwards: an event is never lost, and a delivery is recorded
-- before the worker may stop, so none is sent twice.
CREATE TABLE sync.notification_outbox (
    id              bigserial PRIMARY KEY,
    target_id       integer NOT NULL REFERENCES sync.notification_targets ON DELETE CASCADE,
    event           text NOT NULL,
    payload         jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    sent_at         timestamptz
);
CREATE INDEX ON sync.notification_outbox (next_attempt_at) WHERE sent_at IS NULL;
REVOKE ALL ON sync.notification_outbox FROM PUBLIC;

-------------------------------------------------------------------------------
-- Views
-------------------------------------------------------------------------------

-- Each source's request budget as the processes using it see it (shared memory; a source
-- appears once it made a request since the server started).
CREATE FUNCTION sync._budgets(OUT source_id integer, OUT rate float8, OUT burst float8,
    OUT search_rate float8, OUT quota_fraction float8, OUT api_rate float8, OUT basis text,
    OUT limited_by text, OUT used_rate float8, OUT daily_limit float8, OUT daily_remaining float8,
    OUT quota_seen_at timestamptz, OUT penalty_until timestamptz, OUT penalty_reason text,
    OUT other_requests bigint, OUT other_bytes bigint, OUT other_errors bigint,
    OUT other_rate_limited bigint, OUT stats_reset timestamptz)
RETURNS SETOF record LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'sync_budget_state';

-- One polling cycle of a source: every active collection's requests per cycle, at the budget's rate.
CREATE VIEW sync._cycles AS
SELECT c.source_id,
       count(*)                                        AS collections,
       sum(coalesce(st.avg_cycle_requests, 1))         AS cycle_requests
FROM sync.collections c
JOIN sync.sources s ON s.id = c.source_id
JOIN sync.collection_state st ON st.collection_id = c.id
WHERE NOT c.paused AND NOT s.paused
GROUP BY c.source_id;

CREATE VIEW sync.budgets AS
SELECT s.name                                          AS source,
       s.kind,
       b.rate                                          AS requests_per_second,
       b.burst,
       b.search_rate                                   AS search_requests_per_second,
       b.quota_fraction,
       b.api_rate                                      AS api_requests_per_second,
       b.basis,
       b.limited_by,
       b.used_rate                                     AS used_requests_per_second,
       round((b.used_rate / nullif(b.rate, 0))::numeric, 3) AS budget_use,
       b.daily_limit::bigint                           AS daily_limit,
       b.daily_remaining::bigint                       AS daily_remaining,
       round((b.daily_remaining / nullif(b.daily_limit, 0))::numeric, 3) AS quota_headroom,
       b.quota_seen_at,
       b.penalty_until,
       b.penalty_reason,
       cy.collections,
       round(cy.cycle_requests::numeric, 2)            AS cycle_requests,
       make_interval(secs => cy.cycle_requests / nullif(b.rate, 0)) AS poll_cycle
FROM sync.sources s
LEFT JOIN sync._budgets() b ON b.source_id = s.id
LEFT JOIN sync._cycles cy ON cy.source_id = s.id;
COMMENT ON VIEW sync.budgets IS 'each source''s request budget: rate, its basis, use over the last minute, API quota headroom, penalties, polling cycle';

CREATE VIEW sync.status AS
SELECT s.name                          AS source,
       s.kind,
       c.name                          AS collection,
       c.relid::regclass               AS target_table,
       CASE WHEN s.paused OR c.paused       THEN 'paused'
            WHEN st.consecutive_failures > 0 THEN 'error'
            WHEN b.penalty_until IS NOT NULL THEN 'rate limited'
            WHEN st.phase = 'backfill'       THEN 'backfilling'
            ELSE 'syncing' END         AS state,
       st.phase,
       st.backfill_records,
       st.backfill_total,
       CASE WHEN st.phase = 'incremental' AND st.backfill_completed_at IS NOT NULL THEN 100.0
            WHEN st.backfill_total > 0
                 THEN round(least(100.0 * st.backfill_records / st.backfill_total, 100.0), 1)
            END                        AS backfill_percent,
       round(st.backfill_rate::numeric, 1) AS backfill_rate,
       CASE WHEN st.phase = 'backfill' AND st.backfill_rate > 0 AND st.backfill_total IS NOT NULL
            THEN make_interval(secs => greatest(st.backfill_total - st.backfill_records, 0) / st.backfill_rate)
            END                        AS backfill_eta,
       st.backfill_started_at,
       st.backfill_completed_at,
       st.last_poll_at,
       st.last_caught_up_at,
       -- measured: every change made before this long ago is in the table
       now() - st.last_caught_up_at    AS lag,
       -- estimated: one polling cycle over the source's collections within its budget
       make_interval(secs => cy.cycle_requests / nullif(b.rate, 0)
                             + coalesce(c.options->>'poll_interval', s.options->>'poll_interval', '0')::float8)
                                       AS est_max_lag,
       CASE WHEN s.paused OR c.paused THEN NULL
            WHEN b.penalty_until IS NOT NULL
                 THEN format('rate limit: %s, until %s', b.penalty_reason, b.penalty_until)
            WHEN st.consecutive_failures > 0 AND st.last_error ~* 'token|invalid_grant|authoriz'
                 THEN 'token refresh: retry after an error'
            WHEN st.consecutive_failures > 0 THEN 'retry after an error'
            WHEN b.limited_by LIKE 'daily allocation nearly spent%' THEN b.limited_by
            WHEN (st.phase = 'backfill' OR st.column_backfill IS NOT NULL) AND b.rate IS NOT NULL
                 THEN format('request budget: %s requests/s shared by %s collections',
                             round(b.rate::numeric, 2), cy.collections)
            END                        AS waiting_on,
       st.records_upserted,
       st.records_deleted,
       st.requests,
       st.consecutive_failures,
       st.last_error,
       st.last_error_at,
       st.activity,
       st.sweep_started_at,
       st.last_sweep_at,
       -- every delete made before this long ago is reflected (by the last completed sweep)
       now() - st.last_sweep_started_at AS delete_lag,
       st.last_sweep_at - st.last_sweep_started_at AS sweep_duration
FROM sync.collections c
JOIN sync.sources s ON s.id = c.source_id
JOIN sync.collection_state st ON st.collection_id = c.id
LEFT JOIN sync._budgets() b ON b.source_id = s.id
LEFT JOIN sync._cycles cy ON cy.source_id = s.id;
COMMENT ON VIEW sync.status IS 'one row per synced collection: backfill progress, lag (measured and estimated), polling and errors';

CREATE VIEW sync.stat_collections AS
SELECT s.name AS source, c.name AS collection, c.relid::regclass AS target_table,
       st.requests, st.records_upserted, st.records_deleted, st.bytes_received,
       st.errors, st.rate_limited, st.retries, st.stats_reset
FROM sync.collections c
JOIN sync.sources s ON s.id = c.source_id
JOIN sync.collection_state st ON st.collection_id = c.id;
COMMENT ON VIEW sync.stat_collections IS 'cumulative request statistics per collection (committed with each page; reset with sync.reset_stats)';

CREATE VIEW sync.stat_sources AS
SELECT s.name AS source, s.kind,
       coalesce(sum(st.requests), 0) + coalesce(min(b.other_requests), 0)         AS requests,
       coalesce(sum(st.records_upserted), 0)                                      AS records_upserted,
       coalesce(sum(st.records_deleted), 0)                                       AS records_deleted,
       coalesce(sum(st.bytes_received), 0) + coalesce(min(b.other_bytes), 0)     AS bytes_received,
       coalesce(sum(st.errors), 0) + coalesce(min(b.other_errors), 0)            AS errors,
       coalesce(sum(st.rate_limited), 0) + coalesce(min(b.other_rate_limited), 0) AS rate_limited,
       coalesce(sum(st.retries), 0)                                               AS retries,
       coalesce(least(min(st.stats_reset), min(b.stats_reset)), s.created_at)     AS stats_reset
FROM sync.sources s
LEFT JOIN sync.collections c ON c.source_id = s.id
LEFT JOIN sync.collection_state st ON st.collection_id = c.id
LEFT JOIN sync._budgets() b ON b.source_id = s.id
GROUP BY s.id, s.name, s.kind, s.created_at;
COMMENT ON VIEW sync.stat_sources IS 'cumulative request statistics per source, including requests made outside collections (describe) since the server started';

CREATE VIEW sync.rejected AS
SELECT s.name AS source, c.name AS collection, c.relid::regclass AS target_table,
       v.record_id, v.api_field, v.column_name, v.value, v.sqlstate, v.message AS error,
       v.record_dropped, v.first_rejected_at, v.last_rejected_at, v.times
FROM sync.rejected_values v
JOIN sync.collections c ON c.id = v.collection_id
JOIN sync.sources s ON s.id = c.source_id;
COMMENT ON VIEW sync.rejected IS 'values from the API that did not fit their column (the row is stored with null there)';

CREATE VIEW sync.columns AS
SELECT s.name AS source, c.name AS collection, c.relid::regclass AS target_table,
       m.position, m.api_field, m.api_type, m.column_name, m.column_type,
       m.is_key, m.is_version
FROM sync.collection_columns m
JOIN sync.collections c ON c.id = m.collection_id
JOIN sync.sources s ON s.id = c.source_id;
COMMENT ON VIEW sync.columns IS 'which API field feeds which column, and its Postgres type';

GRANT USAGE ON SCHEMA sync TO PUBLIC;
GRANT SELECT ON sync.sources, sync.collections, sync.collection_columns, sync.collection_state,
                sync.status, sync.columns, sync.budgets, sync.stat_sources, sync.stat_collections,
                sync._cycles TO PUBLIC;

-------------------------------------------------------------------------------
-- Internal C helpers (API: Private)
-------------------------------------------------------------------------------

CREATE FUNCTION sync._validate_source(kind text, base_url text, credentials jsonb, options jsonb)
RETURNS void LANGUAGE c STRICT SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'sync_validate_source';

CREATE FUNCTION sync._describe(source text, collection text,
    OUT canonical_name text, OUT "position" integer, OUT api_field text, OUT api_type text,
    OUT column_name text, OUT column_type text, OUT wire_type text, OUT convert_sql text,
    OUT is_key boolean, OUT is_version boolean)
RETURNS SETOF record LANGUAGE c STRICT SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'sync_describe';

CREATE FUNCTION sync._identifier(api_name text) RETURNS text
LANGUAGE c IMMUTABLE STRICT AS 'MODULE_PATHNAME', 'sync_identifier';

CREATE FUNCTION sync._wake() RETURNS void
LANGUAGE c AS 'MODULE_PATHNAME', 'sync_wake';

CREATE FUNCTION sync._wake_trigger() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'sync_wake_trigger';

CREATE FUNCTION sync._register_database() RETURNS void
LANGUAGE c AS 'MODULE_PATHNAME', 'sync_register_database';

CREATE FUNCTION sync._budget_forget(source_id integer) RETURNS void
LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'sync_budget_forget_sql';

CREATE FUNCTION sync._budget_clear_penalty(source_id integer) RETURNS void
LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'sync_budget_clear_penalty_sql';

CREATE FUNCTION sync._budget_reset_stats(source_id integer) RETURNS void
LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'sync_budget_reset_stats_sql';

CREATE FUNCTION sync._wait_for_state(collection_id integer, timeout interval) RETURNS boolean
LANGUAGE c STRICT SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'sync_wait_for_backfill';

-- A committed configuration change wakes the database's worker at once.
CREATE TRIGGER wake_worker AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON sync.sources
    FOR EACH STATEMENT EXECUTE FUNCTION sync._wake_trigger();
CREATE TRIGGER wake_worker AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON sync.collections
    FOR EACH STATEMENT EXECUTE FUNCTION sync._wake_trigger();
CREATE TRIGGER wake_worker AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON sync.source_secrets
    FOR EACH STATEMENT EXECUTE FUNCTION sync._wake_trigger();

CREATE FUNCTION sync._source_id(source text) RETURNS integer
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sid integer;
BEGIN
    SELECT id INTO sid FROM sync.sources WHERE name = source;
    IF sid IS NULL THEN
        RAISE EXCEPTION 'source "%" does not exist', source
            USING ERRCODE = 'undefined_object',
                  HINT = 'Existing sources are listed in sync.sources; create one with sync.create_source().';
    END IF;
    RETURN sid;
END $$;

-- Collection names match exactly, or case-insensitively when that is unambiguous.
CREATE FUNCTION sync._collection_id(source text, collection text) RETURNS integer
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sid integer := sync._source_id(source);
    cid integer;
    n   integer;
BEGIN
    SELECT id INTO cid FROM sync.collections WHERE source_id = sid AND name = collection;
    IF cid IS NULL THEN
        SELECT min(id), count(*) INTO cid, n FROM sync.collections
         WHERE source_id = sid AND lower(name) = lower(collection);
        IF n <> 1 THEN
            cid := NULL;
        END IF;
    END IF;
    IF cid IS NULL THEN
        RAISE EXCEPTION 'collection "%" of source "%" does not exist', collection, source
            USING ERRCODE = 'undefined_object',
                  HINT = 'Synced collections are listed in sync.status; add one with sync.add_collection().';
    END IF;
    RETURN cid;
END $$;

CREATE FUNCTION sync._require_admin() RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT has_table_privilege('sync.source_secrets', 'SELECT, UPDATE') THEN
        RAISE EXCEPTION 'permission denied to configure sync sources'
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'Configuring sources and collections needs access to their credentials.',
                  HINT = 'Run this as the owner of the sync extension or a superuser.';
    END IF;
END $$;

-------------------------------------------------------------------------------
-- Public API
-------------------------------------------------------------------------------

CREATE FUNCTION sync.create_source(name text, kind text, base_url text, credentials jsonb,
                                   options jsonb DEFAULT '{}')
RETURNS integer LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sid integer;
BEGIN
    PERFORM sync._require_admin();
    IF name IS NULL OR name !~ '^[a-z_][a-z0-9_]*$' OR length(name) > 63 THEN
        RAISE EXCEPTION 'invalid source name "%"', name
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'A source name is used as the default schema of its tables.',
                  HINT = 'Use lower-case letters, digits and underscores, at most 63 characters, not starting with a digit.';
    END IF;
    IF EXISTS (SELECT 1 FROM sync.sources s WHERE s.name = create_source.name) THEN
        RAISE EXCEPTION 'source "%" already exists', name
            USING ERRCODE = 'duplicate_object',
                  HINT = 'Choose another name, or change the existing source with sync.alter_source().';
    END IF;
    PERFORM sync._validate_source(kind, base_url, credentials, coalesce(options, '{}'));
    INSERT INTO sync.sources (name, kind, base_url, options)
    VALUES (name, kind, base_url, coalesce(options, '{}'))
    RETURNING id INTO sid;
    INSERT INTO sync.source_secrets (source_id, credentials) VALUES (sid, credentials);
    PERFORM sync._budget_forget(sid);
    RETURN sid;
END $$;
COMMENT ON FUNCTION sync.create_source(text, text, text, jsonb, jsonb) IS 'create an API source (an account of a provider)';

CREATE FUNCTION sync.alter_source(name text, base_url text DEFAULT NULL, credentials jsonb DEFAULT NULL,
                                  options jsonb DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sid integer;
    src sync.sources;
    new_credentials jsonb;
BEGIN
    PERFORM sync._require_admin();
    sid := sync._source_id(name);
    SELECT * INTO src FROM sync.sources WHERE id = sid FOR UPDATE;
    SELECT coalesce(alter_source.credentials, ss.credentials) INTO new_credentials
      FROM sync.source_secrets ss WHERE ss.source_id = sid;
    PERFORM sync._validate_source(src.kind, coalesce(alter_source.base_url, src.base_url), new_credentials,
                                  src.options || coalesce(alter_source.options, '{}'));
    UPDATE sync.sources s
       SET base_url = coalesce(alter_source.base_url, s.base_url),
           options  = jsonb_strip_nulls(s.options || coalesce(alter_source.options, '{}'))
     WHERE s.id = sid;
    IF alter_source.credentials IS NOT NULL OR alter_source.base_url IS NOT NULL THEN
        -- New credentials or a new host invalidate the cached token.
        UPDATE sync.source_secrets ss
           SET credentials = new_credentials, token = NULL, token_updated_at = now()
         WHERE ss.source_id = sid;
    END IF;
    UPDATE sync.collection_state st SET consecutive_failures = 0, run_requested = true
     WHERE st.collection_id IN (SELECT id FROM sync.collections WHERE source_id = sid);
END $$;
COMMENT ON FUNCTION sync.alter_source(text, text, jsonb, jsonb) IS 'change a source''s URL, credentials or options (options are merged; a null value removes a key)';

CREATE FUNCTION sync.drop_source(name text, drop_tables boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sid integer;
    c record;
BEGIN
    PERFORM sync._require_admin();
    sid := sync._source_id(name);
    FOR c IN SELECT co.name FROM sync.collections co WHERE co.source_id = sid LOOP
        PERFORM sync.remove_collection(name, c.name, drop_tables);
    END LOOP;
    DELETE FROM sync.sources WHERE id = sid;
END $$;
COMMENT ON FUNCTION sync.drop_source(text, boolean) IS 'stop syncing a source and forget it; its tables stay unless drop_tables';

CREATE FUNCTION sync.add_collection(source text, collection text, options jsonb DEFAULT '{}')
RETURNS regclass LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sid         integer;
    cid         integer;
    canonical   text;
    schema_name text;
    table_name  text;
    wanted      text[];
    coldefs     text;
    keycol      text;
    rel         regclass;
    unknown     text[];
BEGIN
    PERFORM sync._require_admin();
    sid := sync._source_id(source);
    options := coalesce(options, '{}');
    IF jsonb_typeof(options) <> 'object' THEN
        RAISE EXCEPTION 'options must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF options ? 'fields' AND jsonb_typeof(options->'fields') <> 'array' THEN
        RAISE EXCEPTION 'option "fields" must be a JSON array of API field names'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'For example {"fields": ["Id", "Email"]}.';
    END IF;

    CREATE TEMP TABLE IF NOT EXISTS _sync_described (LIKE sync.collection_columns) ON COMMIT DROP;
    ALTER TABLE _sync_described ADD COLUMN IF NOT EXISTS canonical_name text;
    ALTER TABLE _sync_described ADD COLUMN IF NOT EXISTS synced boolean DEFAULT true;
    TRUNCATE _sync_described;
    INSERT INTO _sync_described (canonical_name, collection_id, position, api_field, api_type, column_name,
                                 column_type, wire_type, convert_sql, is_key, is_version)
    SELECT d.canonical_name, 0, d.position, d.api_field, d.api_type, d.column_name, d.column_type,
           d.wire_type, d.convert_sql, d.is_key, d.is_version
      FROM sync._describe(source, collection) d;
    SELECT min(canonical_name) INTO canonical FROM _sync_described;

    IF EXISTS (SELECT 1 FROM sync.collections c WHERE c.source_id = sid AND c.name = canonical) THEN
        RAISE EXCEPTION 'collection "%" of source "%" is already synced', canonical, source
            USING ERRCODE = 'duplicate_object',
                  HINT = 'Its table and state are in sync.status; use sync.resync() to backfill it again.';
    END IF;

    IF options ? 'fields' THEN
        SELECT array_agg(f) INTO wanted FROM jsonb_array_elements_text(options->'fields') f;
        SELECT array_agg(w) INTO unknown FROM unnest(wanted) w
         WHERE NOT EXISTS (SELECT 1 FROM _sync_described d WHERE lower(d.api_field) = lower(w));
        IF unknown IS NOT NULL THEN
            RAISE EXCEPTION 'collection "%" has no field %', canonical, array_to_string(unknown, ', ')
                USING ERRCODE = 'undefined_column',
                      HINT = 'Field names are the API''s; see the API''s schema of the collection.';
        END IF;
        UPDATE _sync_described d SET synced = false
         WHERE NOT d.is_key AND NOT d.is_version AND lower(d.api_field) <> ALL (SELECT lower(w) FROM unnest(wanted) w);
    END IF;

    schema_name := coalesce(options->>'schema', source);
    table_name  := coalesce(options->>'table', sync._identifier(canonical));
    IF to_regclass(format('%I.%I', schema_name, table_name)) IS NOT NULL THEN
        RAISE EXCEPTION 'table %.% already exists', quote_ident(schema_name), quote_ident(table_name)
            USING ERRCODE = 'duplicate_table',
                  HINT = 'Pass another name with options => ''{"table": "..."}'' or ''{"schema": "..."}''.';
    END IF;

    SELECT string_agg(format('%I %s', d.column_name, d.column_type), ', ' ORDER BY d.position),
           min(d.column_name) FILTER (WHERE d.is_key)
      INTO coldefs, keycol
      FROM _sync_described d WHERE d.synced;
    IF to_regnamespace(quote_ident(schema_name)) IS NULL THEN
        EXECUTE format('CREATE SCHEMA %I', schema_name);
    END IF;
    EXECUTE format('CREATE TABLE %I.%I (%s, _synced_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (%I))',
                   schema_name, table_name, coldefs, keycol);
    rel := format('%I.%I', schema_name, table_name)::regclass;
    EXECUTE format('COMMENT ON TABLE %s IS %L', rel,
                   format('synced by sync from %s (source %s); changes made here are overwritten', canonical, source));
    EXECUTE format('COMMENT ON COLUMN %s._synced_at IS %L', rel, 'when sync last wrote this row');

    INSERT INTO sync.collections (source_id, name, relid, options)
    VALUES (sid, canonical, rel, options - 'schema' - 'table')
    RETURNING id INTO cid;
    INSERT INTO sync.api_fields (collection_id, position, api_field, api_type, column_name, column_type,
                                 wire_type, convert_sql, is_key, is_version)
    SELECT cid, d.position, d.api_field, d.api_type, d.column_name, d.column_type, d.wire_type, d.convert_sql,
           d.is_key, d.is_version
      FROM _sync_described d;
    INSERT INTO sync.collection_columns (collection_id, position, api_field, api_type, column_name, column_type,
                                         wire_type, convert_sql, is_key, is_version, attnum)
    SELECT cid, row_number() OVER (ORDER BY d.position), d.api_field, d.api_type, d.column_name,
           -- as Postgres spells it (timestamp with time zone, not timestamptz): ALTER TABLE compares it
           format_type(a.atttypid, a.atttypmod), d.wire_type, d.convert_sql, d.is_key, d.is_version, a.attnum
      FROM _sync_described d
      JOIN pg_attribute a ON a.attrelid = rel AND a.attname = d.column_name
     WHERE d.synced;
    INSERT INTO sync.collection_state (collection_id, backfill_started_at, run_requested) VALUES (cid, now(), true);
    DROP TABLE _sync_described;
    RETURN rel;
END $$;
COMMENT ON FUNCTION sync.add_collection(text, text, jsonb) IS 'sync a collection of a source into a new typed table; its backfill starts at commit';

CREATE FUNCTION sync.remove_collection(source text, collection text, drop_table boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cid integer;
    rel oid;
BEGIN
    PERFORM sync._require_admin();
    cid := sync._collection_id(source, collection);
    SELECT relid INTO rel FROM sync.collections WHERE id = cid;
    DELETE FROM sync.collections WHERE id = cid;
    IF drop_table AND to_regclass(rel::regclass::text) IS NOT NULL THEN
        EXECUTE format('DROP TABLE %s', rel::regclass);
    END IF;
END $$;
COMMENT ON FUNCTION sync.remove_collection(text, text, boolean) IS 'stop syncing a collection; its table stays unless drop_table';

CREATE FUNCTION sync._set_paused(source text, collection text, paused boolean)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM sync._require_admin();
    IF collection IS NULL THEN
        UPDATE sync.sources s SET paused = _set_paused.paused WHERE s.id = sync._source_id(source);
    ELSE
        UPDATE sync.collections c SET paused = _set_paused.paused WHERE c.id = sync._collection_id(source, collection);
    END IF;
END $$;

CREATE FUNCTION sync.pause(source text, collection text DEFAULT NULL)
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp
RETURN sync._set_paused(source, collection, true);
COMMENT ON FUNCTION sync.pause(text, text) IS 'stop making requests for a source, or one of its collections, until sync.resume()';

CREATE FUNCTION sync.resume(source text, collection text DEFAULT NULL)
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp
RETURN sync._set_paused(source, collection, false);
COMMENT ON FUNCTION sync.resume(text, text) IS 'resume a paused source or collection';

CREATE FUNCTION sync.resync(source text, collection text)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cid integer;
BEGIN
    PERFORM sync._require_admin();
    cid := sync._collection_id(source, collection);
    UPDATE sync.collection_state
       SET phase = 'backfill', cursor = '{}', backfill_started_at = now(), backfill_completed_at = NULL,
           backfill_records = 0, backfill_total = NULL, consecutive_failures = 0, run_requested = true,
           -- Deletes made before the resync are not in the new change feed: sweep once it is done.
           reconcile_requested = true
     WHERE collection_id = cid;
    PERFORM sync._wake();
END $$;
COMMENT ON FUNCTION sync.resync(text, text) IS 'backfill a collection again from the start, then sweep for deletes; rows stay while it runs';

CREATE FUNCTION sync.reconcile(source text, collection text)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM sync._require_admin();
    UPDATE sync.collection_state
       SET reconcile_requested = true, run_requested = true
     WHERE collection_id = sync._collection_id(source, collection);
    PERFORM sync._wake();
END $$;
COMMENT ON FUNCTION sync.reconcile(text, text) IS 'sweep every id of the collection in the API and delete rows whose record is gone';

CREATE FUNCTION sync.run_now(source text, collection text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM sync._require_admin();
    -- the user knows the API takes requests again (e.g. its allocation was raised)
    PERFORM sync._budget_clear_penalty(sync._source_id(source));
    UPDATE sync.collection_state
       SET run_requested = true, consecutive_failures = 0
     WHERE collection_id IN (SELECT id FROM sync.collections c
                              WHERE c.source_id = sync._source_id(source)
                                AND (run_now.collection IS NULL OR c.id = sync._collection_id(source, run_now.collection)));
    PERFORM sync._wake();
END $$;
COMMENT ON FUNCTION sync.run_now(text, text) IS 'poll a source (or one collection) now, skipping any error backoff and rate-limit penalty';

CREATE FUNCTION sync.wait_for_backfill(source text, collection text, timeout interval)
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF timeout IS NULL OR timeout < interval '0' THEN
        RAISE EXCEPTION 'timeout must be a non-negative interval' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN sync._wait_for_state(sync._collection_id(source, collection), timeout);
END $$;
COMMENT ON FUNCTION sync.wait_for_backfill(text, text, interval) IS 'wait until the collection''s backfill completed; false on timeout';

CREATE FUNCTION sync.reset_stats(source text DEFAULT NULL, collection text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sid integer;
    cid integer;
BEGIN
    PERFORM sync._require_admin();
    IF source IS NULL AND collection IS NOT NULL THEN
        RAISE EXCEPTION 'a collection needs its source' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Call sync.reset_stats(source, collection).';
    END IF;
    IF source IS NOT NULL THEN
        sid := sync._source_id(source);
    END IF;
    IF collection IS NOT NULL THEN
        cid := sync._collection_id(source, collection);
    END IF;
    UPDATE sync.collection_state st
       SET requests = 0, records_upserted = 0, records_deleted = 0, bytes_received = 0, errors = 0,
           rate_limited = 0, retries = 0, stats_reset = now()
      FROM sync.collections c
     WHERE c.id = st.collection_id AND (sid IS NULL OR c.source_id = sid) AND (cid IS NULL OR c.id = cid);
    IF cid IS NULL THEN
        FOR sid IN SELECT id FROM sync.sources s WHERE reset_stats.source IS NULL OR s.name = reset_stats.source LOOP
            PERFORM sync._budget_reset_stats(sid);
        END LOOP;
    END IF;
END $$;
COMMENT ON FUNCTION sync.reset_stats(text, text) IS 'zero the statistics of every source, one source, or one collection';

-------------------------------------------------------------------------------
-- Schema changes: a column added, retyped or dropped on a synced table
-------------------------------------------------------------------------------

CREATE FUNCTION sync._assignable(from_type text, to_type text) RETURNS boolean
LANGUAGE c STRICT STABLE AS 'MODULE_PATHNAME', 'sync_assignable';

-- Fill some columns of every row from the API, without touching the collection's cursor.
CREATE FUNCTION sync._start_column_backfill(collection_id integer, fields text[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE sync.collection_state st
       SET column_backfill = jsonb_build_object(
               'fields', (SELECT to_jsonb(array_agg(DISTINCT f ORDER BY f))
                            FROM unnest(coalesce(ARRAY(SELECT jsonb_array_elements_text(st.column_backfill->'fields')),
                                                 '{}') || fields) f
                           WHERE EXISTS (SELECT 1 FROM sync.collection_columns m
                                          WHERE m.collection_id = st.collection_id AND m.api_field = f)),
               'cursor', '{}'::jsonb, 'records', 0, 'started_at', now()),
           run_requested = true
     WHERE st.collection_id = _start_column_backfill.collection_id;
    PERFORM sync._wake();
END $$;

-- The value expression for a column whose type the user chose: assignment semantics when
-- Postgres has an assignment cast from the type sync would use, else through text.
CREATE FUNCTION sync._convert_for(natural_type text, column_type text, convert_sql text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN CASE WHEN natural_type = column_type OR sync._assignable(natural_type, column_type) THEN convert_sql
            ELSE 'CAST((' || coalesce(convert_sql, '%s') || ')::text AS ' || column_type || ')' END;

CREATE FUNCTION sync._on_alter_table() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r       record;
    col     record;
    f       sync.api_fields;
    changed text[];
BEGIN
    FOR r IN SELECT DISTINCT c.id AS collection_id, c.relid, c.name
               FROM pg_event_trigger_ddl_commands() d
               JOIN sync.collections c ON c.relid = d.objid
              WHERE d.classid = 'pg_class'::regclass LOOP
        changed := '{}';
        SELECT m.column_name, m.api_field INTO col FROM sync.collection_columns m
         WHERE m.collection_id = r.collection_id AND (m.is_key OR m.is_version)
           AND NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = r.relid AND a.attnum = m.attnum
                                                          AND NOT a.attisdropped);
        IF FOUND THEN
            RAISE EXCEPTION 'cannot drop column % of %: it holds the API''s %', quote_ident(col.column_name),
                  r.relid::regclass, col.api_field
                USING ERRCODE = 'dependent_objects_still_exist',
                      DETAIL = 'sync needs the record id and modification stamp of every row.',
                      HINT = 'Remove the collection with sync.remove_collection() first.';
        END IF;
        -- dropped columns: stop fetching them
        DELETE FROM sync.collection_columns m
         WHERE m.collection_id = r.collection_id
           AND NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = r.relid AND a.attnum = m.attnum
                                                          AND NOT a.attisdropped);
        -- renamed columns keep their field
        UPDATE sync.collection_columns m SET column_name = a.attname
          FROM pg_attribute a
         WHERE m.collection_id = r.collection_id AND a.attrelid = r.relid AND a.attnum = m.attnum
           AND a.attname <> m.column_name;
        -- retyped columns: values are read again in the new type
        FOR col IN SELECT m.api_field, format_type(a.atttypid, a.atttypmod) AS new_type,
                          af.column_type AS natural_type, af.convert_sql
                     FROM sync.collection_columns m
                     JOIN pg_attribute a ON a.attrelid = r.relid AND a.attnum = m.attnum
                     JOIN sync.api_fields af ON af.collection_id = m.collection_id AND af.api_field = m.api_field
                    WHERE m.collection_id = r.collection_id
                      AND format_type(a.atttypid, a.atttypmod) <> m.column_type LOOP
            UPDATE sync.collection_columns m
               SET column_type = col.new_type,
                   convert_sql = sync._convert_for(col.natural_type, col.new_type, col.convert_sql)
             WHERE m.collection_id = r.collection_id AND m.api_field = col.api_field;
            changed := changed || col.api_field;
        END LOOP;
        -- added columns that name an API field: fetched from now on, and backfilled
        FOR col IN SELECT a.attname, a.attnum, format_type(a.atttypid, a.atttypmod) AS col_type
                     FROM pg_attribute a
                    WHERE a.attrelid = r.relid AND a.attnum > 0 AND NOT a.attisdropped AND a.attname <> '_synced_at'
                      AND NOT EXISTS (SELECT 1 FROM sync.collection_columns m
                                       WHERE m.collection_id = r.collection_id AND m.attnum = a.attnum)
                      AND a.attnum <> ALL (SELECT unnest(st.unsynced_attnums) FROM sync.collection_state st
                                            WHERE st.collection_id = r.collection_id) LOOP
            SELECT * INTO f FROM sync.api_fields af
             WHERE af.collection_id = r.collection_id
               AND (af.column_name = col.attname OR lower(af.api_field) = lower(col.attname))
               AND NOT EXISTS (SELECT 1 FROM sync.collection_columns m
                                WHERE m.collection_id = r.collection_id AND m.api_field = af.api_field)
             ORDER BY af.column_name = col.attname DESC
             LIMIT 1;
            IF NOT FOUND THEN
                RAISE NOTICE 'column % of % is not filled by sync', quote_ident(col.attname), r.relid::regclass
                    USING DETAIL = format('No field of %s is named so (or it is already synced).', r.name),
                          HINT = 'The fields sync can add are listed in sync.available_fields.';
                UPDATE sync.collection_state st SET unsynced_attnums = st.unsynced_attnums || col.attnum
                 WHERE st.collection_id = r.collection_id;
                CONTINUE;
            END IF;
            INSERT INTO sync.collection_columns (collection_id, position, api_field, api_type, column_name,
                                                 column_type, wire_type, convert_sql, is_key, is_version, attnum)
            VALUES (r.collection_id,
                    (SELECT coalesce(max(position), 0) + 1 FROM sync.collection_columns
                      WHERE collection_id = r.collection_id),
                    f.api_field, f.api_type, col.attname, col.col_type, f.wire_type,
                    sync._convert_for(f.column_type, col.col_type, f.convert_sql), false, false, col.attnum);
            changed := changed || f.api_field;
        END LOOP;
        IF changed <> '{}' THEN
            PERFORM sync._start_column_backfill(r.collection_id, changed);
        END IF;
    END LOOP;
END $$;

CREATE EVENT TRIGGER sync_schema_change ON ddl_command_end WHEN TAG IN ('ALTER TABLE')
    EXECUTE FUNCTION sync._on_alter_table();

CREATE FUNCTION sync.add_column(source text, collection text, api_field text, column_type text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cid integer := sync._collection_id(source, collection);
    f   sync.api_fields;
BEGIN
    PERFORM sync._require_admin();
    SELECT * INTO f FROM sync.api_fields af WHERE af.collection_id = cid AND af.api_field = add_column.api_field;
    IF NOT FOUND THEN
        SELECT * INTO f FROM sync.api_fields af WHERE af.collection_id = cid AND lower(af.api_field) = lower(add_column.api_field);
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'collection "%" of source "%" has no field "%"', collection, source, api_field
            USING ERRCODE = 'undefined_column',
                  HINT = 'sync.available_fields lists the fields the API described (a new field appears there after the next schema check).';
    END IF;
    IF EXISTS (SELECT 1 FROM sync.collection_columns m WHERE m.collection_id = cid AND m.api_field = f.api_field) THEN
        RAISE EXCEPTION 'field "%" of collection "%" is already synced', f.api_field, collection
            USING ERRCODE = 'duplicate_column';
    END IF;
    EXECUTE format('ALTER TABLE %s ADD COLUMN %I %s', (SELECT relid::regclass FROM sync.collections WHERE id = cid),
                   f.column_name, coalesce(add_column.column_type, f.column_type));
    RETURN f.column_name;
END $$;
COMMENT ON FUNCTION sync.add_column(text, text, text, text) IS 'sync one more API field into a new column and backfill it (ALTER TABLE ADD COLUMN with the field''s name does the same)';

CREATE FUNCTION sync.alter_column(source text, collection text, column_name text, column_type text)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cid integer := sync._collection_id(source, collection);
    rel regclass := (SELECT relid::regclass FROM sync.collections WHERE id = cid);
BEGIN
    PERFORM sync._require_admin();
    IF NOT EXISTS (SELECT 1 FROM sync.collection_columns m WHERE m.collection_id = cid AND m.column_name = alter_column.column_name) THEN
        RAISE EXCEPTION 'column "%" of % is not synced', column_name, rel USING ERRCODE = 'undefined_column';
    END IF;
    BEGIN
        EXECUTE format('ALTER TABLE %s ALTER COLUMN %I TYPE %s USING %I::%s', rel, column_name, column_type,
                       column_name, column_type);
    EXCEPTION WHEN data_exception OR cannot_coerce OR datatype_mismatch THEN
        -- the values are read again from the API in the new type
        EXECUTE format('ALTER TABLE %s ALTER COLUMN %I TYPE %s USING NULL', rel, column_name, column_type);
    END;
END $$;
COMMENT ON FUNCTION sync.alter_column(text, text, text, text) IS 'change a synced column''s type; its values are read again from the API';

CREATE FUNCTION sync.remove_column(source text, collection text, column_name text)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM sync._require_admin();
    EXECUTE format('ALTER TABLE %s DROP COLUMN %I',
                   (SELECT relid::regclass FROM sync.collections WHERE id = sync._collection_id(source, collection)),
                   column_name);
END $$;
COMMENT ON FUNCTION sync.remove_column(text, text, text) IS 'drop a synced column: its field is no longer fetched';

CREATE VIEW sync.available_fields AS
SELECT s.name AS source, c.name AS collection, c.relid::regclass AS target_table,
       af.api_field, af.api_type, af.column_name, af.column_type,
       m.api_field IS NOT NULL AS synced,
       m.column_name AS synced_as,
       af.first_seen_at, af.last_seen_at
FROM sync.api_fields af
JOIN sync.collections c ON c.id = af.collection_id
JOIN sync.sources s ON s.id = c.source_id
LEFT JOIN sync.collection_columns m ON m.collection_id = af.collection_id AND m.api_field = af.api_field;
COMMENT ON VIEW sync.available_fields IS 'every field the API describes per collection, whether synced, and when it was first seen';
GRANT SELECT ON sync.available_fields TO PUBLIC;

-------------------------------------------------------------------------------
-- Notifications
-------------------------------------------------------------------------------

-- An event: NOTIFY on its channel now (at commit), and e-mail/webhook deliveries queued.
CREATE FUNCTION sync._emit(event text, payload jsonb) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_notify('sync_' || event, payload::text);
    INSERT INTO sync.notification_outbox (target_id, event, payload)
    SELECT t.id, event, payload FROM sync.notification_targets t WHERE event = ANY (t.events);
    IF FOUND THEN
        PERFORM sync._wake();
    END IF;
END $$;

CREATE FUNCTION sync.add_notification(name text, kind text, target text, options jsonb DEFAULT '{}',
                                      events text[] DEFAULT '{backfill_completed,collection_failing}')
RETURNS integer LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    nid integer;
BEGIN
    PERFORM sync._require_admin();
    IF kind IS NULL OR kind NOT IN ('email', 'webhook') THEN
        RAISE EXCEPTION 'unknown notification kind "%"', kind USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Use ''email'' (target: recipient addresses, options: smtp_url, from) or ''webhook'' (target: URL).';
    END IF;
    IF events IS NULL OR cardinality(events) = 0
       OR NOT events <@ ARRAY['backfill_completed', 'collection_failing'] THEN
        RAISE EXCEPTION 'invalid events %', events USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Events are backfill_completed and collection_failing.';
    END IF;
    IF jsonb_typeof(coalesce(options, '{}')) <> 'object' THEN
        RAISE EXCEPTION 'options must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF kind = 'webhook' AND target !~ '^https?://[^/]' THEN
        RAISE EXCEPTION 'invalid webhook URL "%"', target USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Give an http:// or https:// URL.';
    END IF;
    IF kind = 'email' THEN
        IF target !~ '^[^@\s,]+@[^@\s,]+(\s*,\s*[^@\s,]+@[^@\s,]+)*$' THEN
            RAISE EXCEPTION 'invalid e-mail recipients "%"', target USING ERRCODE = 'invalid_parameter_value',
                HINT = 'Give one or more addresses separated by commas.';
        END IF;
        IF coalesce(options->>'smtp_url', '') !~ '^smtps?://[^/]' THEN
            RAISE EXCEPTION 'an e-mail notification needs option "smtp_url"' USING ERRCODE = 'invalid_parameter_value',
                HINT = 'For example {"smtp_url": "smtp://mail.example.com:587", "from": "sync@example.com"}; add "username" and "password" if the server asks.';
        END IF;
    END IF;
    INSERT INTO sync.notification_targets (name, kind, target, options, events)
    VALUES (name, kind, target, coalesce(options, '{}'), events)
    RETURNING id INTO nid;
    RETURN nid;
END $$;
COMMENT ON FUNCTION sync.add_notification(text, text, text, jsonb, text[]) IS 'send events (backfill_completed, collection_failing) by e-mail or to a webhook';

CREATE FUNCTION sync.drop_notification(name text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM sync._require_admin();
    DELETE FROM sync.notification_targets t WHERE t.name = drop_notification.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'notification "%" does not exist', name USING ERRCODE = 'undefined_object';
    END IF;
END $$;

CREATE VIEW sync.notifications AS
SELECT o.id, t.name AS notification, t.kind, o.event, o.payload, o.created_at, o.attempts,
       o.last_error, o.next_attempt_at, o.sent_at,
       CASE WHEN o.sent_at IS NOT NULL THEN 'sent' WHEN o.attempts = 0 THEN 'pending' ELSE 'retrying' END AS state
FROM sync.notification_outbox o
JOIN sync.notification_targets t ON t.id = o.target_id;
COMMENT ON VIEW sync.notifications IS 'every e-mail and webhook delivery of an event, and where it stands';
REVOKE ALL ON sync.notifications FROM PUBLIC;

CREATE FUNCTION sync.worker_pid() RETURNS integer
LANGUAGE c AS 'MODULE_PATHNAME', 'sync_worker_pid';
COMMENT ON FUNCTION sync.worker_pid() IS 'process id of this database''s sync worker, or null when none runs';

REVOKE EXECUTE ON FUNCTION sync.create_source(text, text, text, jsonb, jsonb),
                           sync.alter_source(text, text, jsonb, jsonb),
                           sync.drop_source(text, boolean),
                           sync.add_collection(text, text, jsonb),
                           sync.remove_collection(text, text, boolean),
                           sync.pause(text, text), sync.resume(text, text), sync._set_paused(text, text, boolean),
                           sync.resync(text, text), sync.run_now(text, text), sync.reconcile(text, text),
                           sync._describe(text, text), sync._validate_source(text, text, jsonb, jsonb),
                           sync.reset_stats(text, text), sync._budget_forget(integer),
                           sync._budget_reset_stats(integer), sync._budget_clear_penalty(integer),
                           sync.add_column(text, text, text, text), sync.alter_column(text, text, text, text),
                           sync.remove_column(text, text, text), sync._start_column_backfill(integer, text[]),
                           sync.add_notification(text, text, text, jsonb, text[]), sync.drop_notification(text),
                           sync._emit(text, jsonb)
FROM PUBLIC;

-- The database gets its worker when this transaction commits.
SELECT sync._register_database();
