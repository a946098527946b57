-- The per-user cap on requests generating at once (LLAMA_PROXY_USER_CONCURRENCY), held
-- across every gateway on this database: each gateway says it is alive in
-- llama_gateways, and each request generating under the cap holds a lease in
-- llama_generating until it ends. The leases of a gateway not seen for a while are
-- dropped by the others (see store/generating.py).

CREATE TABLE llama_gateways (
    gateway_id uuid PRIMARY KEY,
    seen_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE llama_generating (
    lease_id   uuid PRIMARY KEY,
    user_id    bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    gateway_id uuid NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX llama_generating_user_id ON llama_generating (user_id);

-- Take a lease for a user below `cap`. The takers of one user's leases go one at a time
-- (a transaction-scoped advisory lock), and the count, a statement of its own in a
-- volatile function, has a snapshot taken after the lock: it sees every lease committed
-- before, so that the cap is exact under concurrency and across gateways.
CREATE FUNCTION llama_take_generating(lease uuid, uid bigint, gateway uuid, cap integer)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('llama_generating:' || uid, 0));
    IF (SELECT count(*) FROM llama_generating WHERE user_id = uid) >= cap THEN
        RETURN false;
    END IF;
    INSERT INTO llama_generating (lease_id, user_id, gateway_id) VALUES (lease, uid, gateway);
    RETURN true;
END
$$;
