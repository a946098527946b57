-- The engine each request was sent to (its URL from LLAMA_SERVER_BACKEND_URL), NULL for
-- requests that never reached one (refused by the gateway, queued until they left, or
-- refused by every engine it tried): with several engines it says which served what,
-- and `usage` counts as uncounted only requests an engine may have generated for.
ALTER TABLE llama_requests ADD COLUMN engine text;
