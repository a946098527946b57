-- The dashboard (see store/dashboard.py): its login sessions, and hourly rollups of the
-- request log that keep its page fast with millions of rows in llama_requests.

-- A session of the operator, known to every gateway on this database. The cookie holds
-- a random token; only its SHA-256 is stored.
CREATE TABLE llama_dashboard_sessions (
    token_hash bytea PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX llama_dashboard_sessions_expires_at ON llama_dashboard_sessions (expires_at);

-- Per hour (UTC) and username (NULL: requests that named no valid user), the sums the
-- page shows, with `errors` counted as `usage` counts them (status >= 400 or an outcome
-- other than ok) and `refusals` the 429s among them (rate limits, quotas, full queues).
CREATE TABLE llama_usage_hourly (
    hour              timestamptz NOT NULL,
    username          text,
    requests          bigint NOT NULL,
    errors            bigint NOT NULL,
    refusals          bigint NOT NULL,
    prompt_tokens     bigint NOT NULL,
    completion_tokens bigint NOT NULL
);
CREATE UNIQUE INDEX llama_usage_hourly_key
    ON llama_usage_hourly (hour, (coalesce(username, '')));

-- Per hour, the latencies of the requests that succeeded, as a histogram: bucket b holds
-- the latencies in (2^((b-1)/8), 2^(b/8)] ms (bucket 0: 1 ms or less), so that a
-- percentile read from it is within 9% of the exact one.
CREATE TABLE llama_latency_hourly (
    hour     timestamptz NOT NULL,
    bucket   smallint NOT NULL,
    requests bigint NOT NULL,
    PRIMARY KEY (hour, bucket)
);

CREATE FUNCTION llama_latency_bucket(latency_ms double precision) RETURNS smallint
LANGUAGE sql IMMUTABLE AS $$
    SELECT least(greatest(ceil(8 * log(2, greatest(latency_ms, 1)::numeric)), 0), 32000)::smallint
$$;

-- The statement that adds the rows of `source` (a table of llama_requests' rows) to the
-- rollups, `sign` 1 for rows written, -1 for rows deleted: text, for the caller to
-- EXECUTE, where the trigger's transition tables are in sight. Rows are taken in the
-- order of the rollups' keys, so that two writers that touch the same hours wait for
-- each other rather than deadlock.
CREATE FUNCTION llama_roll_up_sql(source text, sign integer) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT format(
        $q$WITH usage AS (
               INSERT INTO llama_usage_hourly AS u (hour, username, requests, errors,
                                                   refusals, prompt_tokens, completion_tokens)
               SELECT date_trunc('hour', created_at, 'UTC'), username,
                      %2$s * count(*),
                      %2$s * count(*) FILTER (WHERE status >= 400 OR outcome <> 'ok'),
                      %2$s * count(*) FILTER (WHERE status = 429),
                      %2$s * coalesce(sum(prompt_tokens), 0),
                      %2$s * coalesce(sum(completion_tokens), 0)
               FROM %1$I
               GROUP BY 1, 2
               ORDER BY 1, coalesce(username, '')
               ON CONFLICT (hour, (coalesce(username, ''))) DO UPDATE SET
                   requests = u.requests + EXCLUDED.requests,
                   errors = u.errors + EXCLUDED.errors,
                   refusals = u.refusals + EXCLUDED.refusals,
                   prompt_tokens = u.prompt_tokens + EXCLUDED.prompt_tokens,
                   completion_tokens = u.completion_tokens + EXCLUDED.completion_tokens
           )
           INSERT INTO llama_latency_hourly AS l (hour, bucket, requests)
           SELECT date_trunc('hour', created_at, 'UTC'), llama_latency_bucket(latency_ms),
                  %2$s * count(*)
           FROM %1$I
           WHERE status < 400 AND outcome = 'ok'
           GROUP BY 1, 2
           ORDER BY 1, 2
           ON CONFLICT (hour, bucket) DO UPDATE SET requests = l.requests + EXCLUDED.requests$q$,
        source, sign)
$$;

-- Kept by every statement that writes or deletes rows of the request log (the gateway's
-- batched COPY included), once per statement.
CREATE FUNCTION llama_requests_roll_up() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        EXECUTE llama_roll_up_sql('written_rows', 1);
    ELSE
        EXECUTE llama_roll_up_sql('deleted_rows', -1);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER llama_requests_written AFTER INSERT ON llama_requests
    REFERENCING NEW TABLE AS written_rows
    FOR EACH STATEMENT EXECUTE FUNCTION llama_requests_roll_up();
CREATE TRIGGER llama_requests_deleted AFTER DELETE ON llama_requests
    REFERENCING OLD TABLE AS deleted_rows
    FOR EACH STATEMENT EXECUTE FUNCTION llama_requests_roll_up();

-- Emptied with it.
CREATE FUNCTION llama_requests_emptied() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE llama_usage_hourly, llama_latency_hourly;
    RETURN NULL;
END $$;
CREATE TRIGGER llama_requests_truncated AFTER TRUNCATE ON llama_requests
    FOR EACH STATEMENT EXECUTE FUNCTION llama_requests_emptied();

-- The rows logged before this migration.
DO $$ BEGIN EXECUTE llama_roll_up_sql('llama_requests', 1); END $$;
