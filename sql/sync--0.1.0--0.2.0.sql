-- sync 0.1.0 -> 0.2.0: a user's lock on a synced table is a wait state of
-- that collection, not an error; a walk's start survives a restart.
\echo Use "ALTER EXTENSION sync UPDATE" to load this file. \quit

-- why the collection's last step was put back (a lock held by a user);
-- when the unfinished walk of the change feed began (survives a restart mid-walk)
ALTER TABLE sync.collection_state
    ADD COLUMN lock_wait       text,
    ADD COLUMN walk_started_at timestamptz;

CREATE OR REPLACE VIEW sync.status AS
SELECT s.name                          AS source,
       s.kind,
       c.name                          AS collection,
       c.relid::regclass               AS target_table,
       CASE WHEN s.paused OR c.paused       THEN 'paused'
            WHEN st.lock_wait IS NOT NULL    THEN 'waiting for lock'
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
       greatest(now() - st.last_caught_up_at, interval '0') AS lag,
       -- estimated: one polling cycle over the source's collections within its budget
       make_interval(secs => cy.cycle_requests / nullif(b.rate, 0)
                             + coalesce(c.options->>'poll_interval', s.options->>'poll_interval', '0')::float8)
                                       AS est_max_lag,
       CASE WHEN s.paused OR c.paused THEN NULL
            WHEN st.lock_wait IS NOT NULL THEN st.lock_wait
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
COMMENT ON VIEW sync.status IS 'one row per synced collection: backfill progress, lag (measured and estimated), polling, lock waits and errors';

-- Lock the table before the catalog rows: the worker applying a page holds the
-- table and then updates the collection's state, so the other order deadlocks.
CREATE OR REPLACE FUNCTION sync.remove_collection(source text, collection text, drop_table boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cid integer;
    rel oid;
BEGIN
    PERFORM sync._require_admin();
    cid := sync._collection_id(source, collection);
    SELECT relid INTO rel FROM sync.collections WHERE id = cid;
    IF drop_table AND to_regclass(rel::regclass::text) IS NOT NULL THEN
        EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', rel::regclass);
    END IF;
    DELETE FROM sync.collections WHERE id = cid;
    IF drop_table AND to_regclass(rel::regclass::text) IS NOT NULL THEN
        EXECUTE format('DROP TABLE %s', rel::regclass);
    END IF;
END $$;

-------------------------------------------------------------------------------
-- Webhooks: changes pushed by the API, applied at once; polling stays the truth
-------------------------------------------------------------------------------

-- A webhook asks the worker to poll a collection now (an event without the record's data).
ALTER TABLE sync.collection_state ADD COLUMN poll_requested_at timestamptz;

-- Event ids received, for recognising a replayed delivery (kept 7 days).
CREATE TABLE sync.webhook_events (
    source_id   integer NOT NULL REFERENCES sync.sources ON DELETE CASCADE,
    event_id    text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_id, event_id)
);
CREATE INDEX ON sync.webhook_events (received_at);
REVOKE ALL ON sync.webhook_events FROM PUBLIC;

-- Secrets of webhooks sync created itself (Airtable's macSecretBase64), by webhook id.
CREATE TABLE sync.webhook_secrets (
    source_id   integer NOT NULL REFERENCES sync.sources ON DELETE CASCADE,
    webhook_id  text NOT NULL,
    secret      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_id, webhook_id)
);
REVOKE ALL ON sync.webhook_secrets FROM PUBLIC;

-- Every delivery and what became of it (kept 7 days); never a body or a secret.
CREATE TABLE sync.webhook_deliveries (
    id          bigserial PRIMARY KEY,
    source_id   integer REFERENCES sync.sources ON DELETE CASCADE,   -- null: no such source
    received_at timestamptz NOT NULL DEFAULT now(),
    via         text NOT NULL CHECK (via IN ('listener', 'sql')),
    event_id    text,               -- the delivery's (first) event id
    events      integer NOT NULL DEFAULT 0,
    applied     integer NOT NULL DEFAULT 0,  -- events that changed a row or asked for a poll
    ignored     integer NOT NULL DEFAULT 0,  -- events older than the row, or for no synced collection
    outcome     text NOT NULL CHECK (outcome IN ('applied', 'ignored', 'replayed', 'rejected', 'failed')),
    http_status integer NOT NULL,
    reason      text,
    repeats     integer NOT NULL DEFAULT 1,  -- the same refusal again within a minute counts here
    last_received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON sync.webhook_deliveries (last_received_at);
CREATE INDEX ON sync.webhook_deliveries (source_id, id);
REVOKE ALL ON sync.webhook_deliveries FROM PUBLIC;

CREATE VIEW sync.webhooks AS
SELECT s.name                                                   AS source,
       s.kind,
       coalesce(sum(d.repeats) FILTER (WHERE d.outcome IN ('applied', 'ignored')), 0) AS accepted,
       coalesce(sum(d.repeats) FILTER (WHERE d.outcome = 'applied'), 0)  AS applied,
       coalesce(sum(d.repeats) FILTER (WHERE d.outcome = 'ignored'), 0)  AS ignored,
       coalesce(sum(d.repeats) FILTER (WHERE d.outcome = 'replayed'), 0) AS replayed,
       coalesce(sum(d.repeats) FILTER (WHERE d.outcome = 'rejected'), 0) AS rejected,
       coalesce(sum(d.repeats) FILTER (WHERE d.outcome = 'failed'), 0)   AS failed,
       max(d.last_received_at)                                  AS last_delivery_at,
       max(d.received_at) FILTER (WHERE d.outcome = 'applied') AS last_applied_at,
       (SELECT format('HTTP %s: %s', e.http_status, e.reason) FROM sync.webhook_deliveries e
         WHERE e.source_id = s.id AND e.outcome IN ('rejected', 'failed')
         ORDER BY e.id DESC LIMIT 1)                            AS last_error,
       max(d.last_received_at) FILTER (WHERE d.outcome IN ('rejected', 'failed')) AS last_error_at
FROM sync.sources s
LEFT JOIN sync.webhook_deliveries d ON d.source_id = s.id
GROUP BY s.id, s.name, s.kind;
COMMENT ON VIEW sync.webhooks IS 'webhook deliveries of the last 7 days per source: accepted, replayed, rejected, and the last error';
GRANT SELECT ON sync.webhooks TO PUBLIC;

CREATE FUNCTION sync._ingest_webhook(source text, headers jsonb, body text, url text, method text)
RETURNS jsonb LANGUAGE c CALLED ON NULL INPUT SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'sync_ingest_webhook';

CREATE FUNCTION sync.ingest_webhook(source text, headers jsonb, body text, url text DEFAULT NULL,
                                    method text DEFAULT 'POST')
RETURNS jsonb LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM sync._require_admin();
    IF source IS NULL OR headers IS NULL OR body IS NULL THEN
        RAISE EXCEPTION 'source, headers and body must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    RETURN sync._ingest_webhook(source, headers, body, url, method);
END $$;
COMMENT ON FUNCTION sync.ingest_webhook(text, jsonb, text, text, text) IS 'verify and apply one webhook delivery (body: the raw body as received); returns its outcome and the HTTP status to answer';
REVOKE EXECUTE ON FUNCTION sync.ingest_webhook(text, jsonb, text, text, text),
                           sync._ingest_webhook(text, jsonb, text, text, text) FROM PUBLIC;
