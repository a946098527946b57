-- Stored responses of the Responses API (`store`, `previous_response_id`,
-- GET/DELETE /v1/responses/{id}), per user, until they expire (see store/responses.py).
-- Deleting a user deletes theirs.

CREATE TABLE llama_responses (
    id         text PRIMARY KEY,            -- the response's id, "resp_..."
    user_id    bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    -- the whole conversation's input items, as sent to the engine
    input      jsonb NOT NULL CHECK (jsonb_typeof(input) = 'array'),
    -- the response object, as returned to the client
    response   jsonb NOT NULL CHECK (jsonb_typeof(response) = 'object')
);
CREATE INDEX llama_responses_expires_at ON llama_responses (expires_at);
-- deleting a user finds their responses by it
CREATE INDEX llama_responses_user_id ON llama_responses (user_id);
