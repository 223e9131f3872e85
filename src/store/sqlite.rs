//! Embedded SQLite token store.
