//! Caller authentication (JWT) and per-service policy.
