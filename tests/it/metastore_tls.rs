//! The metastore over TLS, with libpq's `sslmode` meanings, against a real PostgreSQL that
//! accepts TCP connections over TLS only. Its certificate, from a private CA, names
//! `localhost` but not `127.0.0.1`, so each mode's check shows: `require` takes any
//! certificate, `verify-ca` wants the CA, `verify-full` the CA and the host name.

use crate::common;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use airstate::auth::{Claims, TokenScope};
use airstate::identity::metastore::{MetastoreResolver, MetastoreSettings};
use airstate::identity::IdentityResolver;
use airstate::store::memory::MemoryStore;
use airstate::store::StateStore;
use common::Postgres;
use uuid::Uuid;

struct TlsMetastore {
    postgres: Postgres,
    ca: PathBuf,
}

fn metastore() -> &'static TlsMetastore {
    static SHARED: OnceLock<TlsMetastore> = OnceLock::new();
    SHARED.get_or_init(|| {
        let certs = tempfile::tempdir().unwrap().keep();
        common::private_ca(&certs, "DNS:localhost");
        TlsMetastore {
            postgres: Postgres::tls_only(&certs),
            ca: certs.join("ca.pem"),
        }
    })
}

fn url(host: &str, params: &str) -> String {
    format!(
        "postgresql://postgres@{host}:{}/airflow?{params}",
        metastore().postgres.port
    )
}

fn resolver(url: String) -> Result<MetastoreResolver, String> {
    MetastoreResolver::new(&MetastoreSettings {
        url,
        pool_size: 1,
        cache_ttl: Duration::from_secs(1),
        cache_capacity: 100,
        timeout: Duration::from_secs(5),
    })
}

/// Whether a query gets through with this URL (a machine without platform roots refuses
/// `verify-*` without `sslrootcert` already when the resolver is made).
async fn connects(url: String) -> Result<(), String> {
    resolver(url)?.ping().await.map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sslmode_checks_what_libpq_checks() {
    let ca = metastore().ca.display().to_string();
    let localhost = "localhost";
    let ip = "127.0.0.1";
    // The server takes no plain TCP at all, so every success below went over TLS.
    let plain = connects(url(ip, "sslmode=disable")).await.unwrap_err();
    assert!(plain.contains("no encryption"), "{plain}");
    for (host, params) in [
        (ip, String::new()), // libpq's default, prefer
        (ip, "sslmode=prefer".into()),
        (ip, "sslmode=require".into()),
        (ip, format!("sslmode=require&sslrootcert={ca}")),
        (ip, format!("sslmode=verify-ca&sslrootcert={ca}")),
        (localhost, format!("sslmode=verify-full&sslrootcert={ca}")),
    ] {
        let result = connects(url(host, &params)).await;
        assert!(result.is_ok(), "{host} {params}: {result:?}");
    }
    // Refused, and the reason reaches the operator's logs.
    let unknown_ca = connects(url(ip, "sslmode=verify-ca")).await.unwrap_err();
    assert!(
        unknown_ca.contains("UnknownIssuer") || unknown_ca.contains("no trusted root"),
        "the private CA is no platform root: {unknown_ca}"
    );
    let params = format!("sslmode=verify-full&sslrootcert={ca}");
    let wrong_host = connects(url(ip, &params)).await.unwrap_err();
    assert!(
        wrong_host.contains("not valid for name \"127.0.0.1\""),
        "{wrong_host}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_import_work_over_verified_tls() {
    let ms = metastore();
    let ca = ms.ca.display().to_string();
    let verified = url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );

    let ti = Uuid::new_v4();
    ms.postgres
        .insert_task_instance(ti, "tls_dag", "tls_run", "tls_task", 3)
        .await;
    let claims = Claims {
        subject: ti,
        scope: TokenScope::Execution,
        issued_at: 0,
        expires_at: i64::MAX,
        all: Default::default(),
    };
    let scope = resolver(verified.clone())
        .unwrap()
        .task(ti, &claims)
        .await
        .expect("metastore reachable")
        .expect("task instance found");
    assert_eq!(
        (
            scope.dag_id.as_str(),
            scope.run_id.as_str(),
            scope.task_id.as_str()
        ),
        ("tls_dag", "tls_run", "tls_task")
    );
    assert_eq!(scope.map_index, 3);

    // `airstate import --from-metastore` reads Airflow's state tables the same way.
    let client = ms.postgres.client().await;
    client
        .execute(
            "INSERT INTO task_state_store (dag_run_id, dag_id, run_id, task_id, map_index, key, \
             value, updated_at) SELECT id, dag_id, run_id, 'tls_task', 3, 'offset', '42', now() \
             FROM dag_run WHERE dag_id = 'tls_dag' AND run_id = 'tls_run'",
            &[],
        )
        .await
        .expect("insert task_state_store row");
    let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
    let summary = airstate::migrate::metastore::import(store.clone(), &verified)
        .await
        .expect("import over TLS");
    assert_eq!(
        store
            .get_task(&scope, "offset")
            .await
            .unwrap()
            .map(|v| v.json),
        Some("42".to_owned()),
        "{summary:?}"
    );
}
