-- llama_quota_period again, now a set-returning SQL function that is not STRICT, so that
-- PostgreSQL inlines it into the statements that call it (the admission's reservation,
-- the quotas' usage) and plans it once with them, instead of planning its body again at
-- every execution: that took about half of a reservation's CPU. Same arguments, same one
-- row (NULLs for an unknown period or instant), same values.
DROP FUNCTION llama_quota_period(text, timestamptz);

CREATE FUNCTION llama_quota_period(period text, at timestamptz)
RETURNS TABLE (period_start timestamptz, period_end timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE ROWS 1 AS $$
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
