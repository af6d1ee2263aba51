//! Following Airflow's lifecycle: the state of DAG runs Airflow deleted and of assets its
//! scheduler orphaned is reclaimed, as Airflow's own foreign keys and orphan pass reclaim
//! it in the metastore (what is reclaimed, and how, is `store::lifecycle`'s).
//!
//! Every replica runs this loop; a lease in the store lets one at a time run passes. The
//! lease lives one interval and the loop ticks twice per interval, so when the holder
//! dies another replica holds the lease within one and a half intervals. With the
//! metastore unreachable a pass is skipped, deleting nothing, and tried again next time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::ReconcileSettings;
use crate::store::lifecycle::{Oracle, PassError, PassLimits};
use crate::store::StateStore;

/// Starts the loop; it runs until the task is aborted (or the process exits).
pub fn spawn(
    store: Arc<dyn StateStore>,
    oracle: Arc<dyn Oracle>,
    settings: ReconcileSettings,
) -> tokio::task::JoinHandle<()> {
    let holder = uuid::Uuid::new_v4().to_string();
    let limits = PassLimits {
        batch: settings.batch,
        grace: grace(settings.identity_ttl),
    };
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(settings.interval / 2);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_pass: Option<Instant> = None;
        loop {
            ticker.tick().await;
            match store.take_lease(&holder, settings.interval).await {
                Ok(true) => {}
                Ok(false) => {
                    // Another replica runs passes; be ready to take over at once.
                    last_pass = None;
                    continue;
                }
                Err(error) => {
                    tracing::debug!(%error, "lifecycle lease not taken; retrying");
                    continue;
                }
            }
            // Half a tick of slack: the ticker's own jitter must not skip every other pass.
            if last_pass.is_some_and(|at| at.elapsed() + settings.interval / 4 < settings.interval)
            {
                continue;
            }
            last_pass = Some(Instant::now());
            run_pass(store.as_ref(), oracle.as_ref(), limits).await;
        }
    })
}

/// How long a reclaimed run or asset stays marked: a write that resolved its identity
/// just before Airflow deleted it may land for one identity-cache lifetime, and the
/// replica that made it may skip its index entry for one more.
pub fn grace(identity_ttl: Duration) -> Duration {
    identity_ttl * 2 + Duration::from_secs(1)
}

async fn run_pass(store: &dyn StateStore, oracle: &dyn Oracle, limits: PassLimits) {
    let started = Instant::now();
    let outcome = match store.reconcile(oracle, limits).await {
        Ok(done) => {
            metrics::counter!("airstate_reconcile_reclaimed_total", "kind" => "run")
                .increment(done.runs);
            metrics::counter!("airstate_reconcile_reclaimed_total", "kind" => "asset")
                .increment(done.assets);
            if done.runs + done.assets > 0 {
                tracing::info!(
                    runs = done.runs,
                    assets = done.assets,
                    runs_checked = done.runs_checked,
                    assets_checked = done.assets_checked,
                    "reclaimed the state of deleted DAG runs and orphaned assets"
                );
            }
            "completed"
        }
        Err(PassError::Metastore(reason)) => {
            tracing::warn!(%reason, "lifecycle pass skipped: the metastore did not answer; nothing was deleted");
            "skipped"
        }
        Err(PassError::Store(error)) => {
            tracing::warn!(%error, "lifecycle pass stopped: the state store failed; retrying next pass");
            "failed"
        }
    };
    metrics::counter!("airstate_reconcile_passes_total", "outcome" => outcome).increment(1);
    metrics::histogram!("airstate_reconcile_pass_duration_seconds")
        .record(started.elapsed().as_secs_f64());
}
