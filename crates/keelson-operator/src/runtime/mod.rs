//! The plumbing every controller shares, and nothing kind-specific: the shared context, child
//! caches with their owner index and relist handling, watch and reconcile backoff
//! ([`controller`]); the one reconcile pipeline of every kind ([`driver`]); the only writes to the API server ([`apply`]); Events folded into series
//! ([`events`]); the retry of what the API server turns away ([`retry`]) and the opt-in client rate
//! limit ([`ratelimit`]). A kind's rules never live here.

pub mod apply;
pub mod controller;
pub mod driver;
pub mod events;
pub mod lock;
pub mod ratelimit;
pub mod retry;

pub use lock::lock;
