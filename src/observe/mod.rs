//! What kvgate tells the outside about itself: the live event stream
//! ([`events`], `GET /events`) and Prometheus metrics ([`metrics`],
//! `GET /metrics`).

pub mod events;
pub mod metrics;
