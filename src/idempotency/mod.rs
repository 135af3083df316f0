//! The receiving end of retried requests: an `Idempotency-Key` layer for
//! servers (enable the `idempotency` feature).
