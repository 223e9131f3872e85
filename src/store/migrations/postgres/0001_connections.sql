-- finx-gateway's shared token store, schema 1. Tokens are AEAD ciphertexts (see store/crypto.rs):
-- BYTEA, no size limit. Everything else is plaintext so operators can inspect it.

-- The key check: a known constant sealed under the store's encryption key, written by the first
-- replica that starts. A replica with another key refuses to start.
CREATE TABLE store_meta (
    id         SMALLINT PRIMARY KEY CHECK (id = 1),
    key_id     TEXT     NOT NULL,
    key_check  BYTEA    NOT NULL,
    created_at BIGINT   NOT NULL
);

-- Row versions come from one sequence, so a connection deleted and created again never reuses a
-- version a refresh in flight could still compare-and-swap against.
CREATE SEQUENCE connection_versions;

CREATE TABLE connections (
    key               TEXT   PRIMARY KEY,
    status            TEXT   NOT NULL CHECK (status IN ('active', 'reauth_required', 'revoked')),
    refresh_token     BYTEA  NOT NULL,
    access_token      BYTEA,
    access_expires_at BIGINT,
    scope             TEXT,
    version           BIGINT NOT NULL CHECK (version >= 1),
    created_at        BIGINT NOT NULL,
    refreshed_at      BIGINT,
    synced_at         BIGINT,
    updated_at        BIGINT NOT NULL,
    key_id            TEXT   NOT NULL,
    CHECK ((access_token IS NULL) = (access_expires_at IS NULL))
);

-- Started connect flows: the flow id finX issued for a gateway state. Taken (deleted) by the
-- first callback on any replica, which makes a state single use.
CREATE TABLE flow_states (
    state_id   TEXT   PRIMARY KEY,
    flow_id    TEXT   NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX flow_states_expiry ON flow_states (expires_at);
