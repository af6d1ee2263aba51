//! airstate's integration tests, in one binary so that the crate is linked once.
//!
//! Every test talks to real processes: `redis-server` (standalone, Cluster, Sentinel),
//! PostgreSQL initialised into a temporary directory, PgBouncer, the `airstate` binary
//! itself, and Airflow 3.3.2 where Airflow's behaviour is the question. [`common`] starts
//! those processes; [`gateway`] runs the real router in this process over them. One module
//! per area; `cargo test --test it <module>::` runs one of them.
//!
//! Processes that every test may share (one Redis, one Cluster, one PostgreSQL) are started
//! once per run. State is kept apart by a key prefix per gateway and by unique DAG ids, so
//! tests never need to run alone. The one exception is what a test reads from the
//! process-wide metrics recorder: a test that counts exact metric deltas runs the gateway
//! as its own process.

mod common;
#[macro_use]
mod gateway;
mod admin;
mod airflow_backend;
mod airflow_e2e;
mod asset_registration;
mod asset_state;
mod auth;
mod binary;
mod change_streams;
mod clear_all;
mod core_api;
mod deploy;
mod extensions;
mod forward;
mod fuzz_corpus;
mod hardening_server;
mod hardening_store;
mod lifecycle;
mod metastore_tls;
mod migrate;
mod observability;
mod openapi;
mod operations;
mod ops;
mod pgbouncer;
mod redis_cluster;
mod redis_outages;
mod redis_sentinel;
mod redis_store;
mod rollback;
mod structure;
mod task_state;
mod wire_parity;
