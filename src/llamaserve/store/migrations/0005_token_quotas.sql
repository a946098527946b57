-- Token quotas per period and a tokens-per-minute limit per user (see store/quotas.py).

-- NULL: the gateway's LLAMA_PROXY_TOKEN_QUOTA / _QUOTA_PERIOD / _TOKEN_RATE_LIMIT;
-- 0 = none for this user. A period is day, week or month (calendar, in UTC), or a span
-- in whole seconds ('21600s': 6 h windows aligned on the Unix epoch).
ALTER TABLE users
    ADD COLUMN token_quota      bigint CHECK (token_quota >= 0),
    ADD COLUMN quota_period     text CHECK (quota_period IN ('day', 'week', 'month')
                                            OR quota_period ~ '^[1-9][0-9]{0,9}s$'),
    ADD COLUMN token_rate_limit integer CHECK (token_rate_limit >= 0);

-- The token bucket of the tokens-per-minute limit: `level` tokens at `updated_at`,
-- refilling at capacity / 60 per second up to `capacity` (the limit as of the latest
-- admission, which the charge of a request's tokens refills with). The level goes
-- below 0 when requests used more than was left: the debt is paid off by waiting.
-- Made before quota_usage, so that deleting a user deletes a user's rows in the order
-- admissions and charges lock them (bucket, then quota).
CREATE TABLE token_rate_state (
    user_id    bigint PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    level      double precision NOT NULL,
    capacity   integer NOT NULL CHECK (capacity > 0),
    updated_at timestamptz NOT NULL
);

-- The tokens of each user's quota periods: `used` charged (prompt and completion),
-- `reserved` held by the requests admitted and not yet charged. Old periods are only
-- kept for reading; `last_grant` is what the latest admission reserved (what its
-- INSERT ... ON CONFLICT DO UPDATE returns: PostgreSQL 15 cannot return old values).
CREATE TABLE quota_usage (
    user_id      bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    period_start timestamptz NOT NULL,
    used         bigint NOT NULL DEFAULT 0,
    reserved     bigint NOT NULL DEFAULT 0,
    last_grant   bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, period_start)
);

-- The quota period holding the instant `at`: [period_start, period_end). Calendar periods
-- are UTC's whatever the session's time zone; a span of n seconds is the window
-- [k*n, (k+1)*n) seconds after the Unix epoch. NULL for an unknown period.
CREATE FUNCTION llama_quota_period(
    period text, at timestamptz, OUT period_start timestamptz, OUT period_end timestamptz
)
LANGUAGE sql STABLE STRICT PARALLEL SAFE AS $$
    SELECT s.start,
           CASE WHEN p.secs IS NOT NULL THEN s.start + make_interval(secs => p.secs)
                ELSE ((s.start AT TIME ZONE 'UTC') + CASE period WHEN 'day' THEN interval '1 day'
                    WHEN 'week' THEN interval '1 week' WHEN 'month' THEN interval '1 month' END)
                    AT TIME ZONE 'UTC'
           END
    FROM (SELECT substring(period FROM '^([1-9][0-9]{0,9})s$')::bigint AS secs) AS p
    CROSS JOIN LATERAL (
        SELECT CASE WHEN p.secs IS NOT NULL
                    THEN to_timestamp(floor(extract(epoch FROM at) / p.secs) * p.secs)
                    WHEN period IN ('day', 'week', 'month')
                    THEN date_trunc(period, at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
               END AS start
    ) AS s
$$;
