-- Users, their API keys, rate-limit state and the request log.

CREATE TABLE users (
    id                  bigserial PRIMARY KEY,
    username            text NOT NULL UNIQUE,
    enabled             boolean NOT NULL DEFAULT true,
    -- NULL: the gateway's LLAMA_PROXY_RATE_LIMIT / _WINDOW_SECONDS; 0 requests = no limit
    rate_limit          integer CHECK (rate_limit >= 0),
    rate_window_seconds integer CHECK (rate_window_seconds > 0),
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          bigserial PRIMARY KEY,
    key_id      text NOT NULL UNIQUE,       -- the short public id inside the key
    key_hash    bytea NOT NULL,             -- sha256 of the whole key; the key itself is never stored
    user_id     bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz
);
CREATE INDEX api_keys_user ON api_keys (user_id);

-- GCRA: one "theoretical arrival time" per user (see store/limits.py).
CREATE TABLE rate_limit_state (
    user_id bigint PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    tat     timestamptz NOT NULL
);

CREATE TABLE llama_requests (
    id                bigserial PRIMARY KEY,
    request_id        text NOT NULL,
    created_at        timestamptz NOT NULL,
    -- kept when the user is deleted (user_id becomes NULL, username stays) for accounting
    user_id           bigint REFERENCES users (id) ON DELETE SET NULL,
    username          text,
    key_id            text,
    method            text NOT NULL,
    path              text NOT NULL,
    model             text,
    stream            boolean NOT NULL DEFAULT false,
    status            integer NOT NULL,
    outcome           text NOT NULL,        -- ok | error | rejected | cancelled
    latency_ms        double precision NOT NULL,
    ttft_ms           double precision,
    queue_ms          double precision,
    bytes_in          bigint NOT NULL DEFAULT 0,
    bytes_out         bigint NOT NULL DEFAULT 0,
    prompt_tokens     integer,
    completion_tokens integer,
    client_addr       text,
    error             text
);
CREATE INDEX llama_requests_user_time ON llama_requests (user_id, created_at);
CREATE INDEX llama_requests_time ON llama_requests (created_at);
