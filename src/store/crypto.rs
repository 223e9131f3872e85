//! AEAD encryption of tokens at rest.
