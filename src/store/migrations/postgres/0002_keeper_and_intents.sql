-- Schema 2: the last data call (the keeper's idleness rule) and unfinished refreshes.

ALTER TABLE connections ADD COLUMN last_used_at BIGINT;

-- A refresh that was started (finX may have been asked) and not finished. Written durably on a
-- connection of its own before the token call, deleted in the transaction that commits the
-- refresh. One that stays behind means its refresher crashed (or is still at it, if recent).
CREATE TABLE refresh_intents (
    key        TEXT   PRIMARY KEY,
    version    BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    owner      TEXT   NOT NULL
);
