//! The `airstate` command: parses arguments and hands over to the library.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{Map, Value};

mod selftest;

// glibc's malloc showed up at ~10 % of a request in perf; mimalloc measured faster
// (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "airstate", version, about = "Airflow's task and asset state API, served from Redis", after_help = env_help())]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the Execution API's state routes (configured by environment variables).
    Serve,
    /// Exit 0 when the local gateway reports ready: a container health check that needs
    /// no shell or curl in the image.
    Healthcheck {
        /// Defaults to /ready on the port of AIRSTATE_LISTEN.
        #[arg(long)]
        url: Option<String>,
    },
    /// Check a running gateway from outside, as the chart's `helm test` hook does: GET
    /// /ready, then (AIRSTATE_IDENTITY=claims) PUT, GET and DELETE a key of a task of its
    /// own with a token minted from this environment's JWT settings; with metastore
    /// identity, that the token is trusted and an unknown task refused. Exit 0 on success.
    Selftest {
        /// The gateway's base URL, e.g. http://airstate.airflow:8080.
        #[arg(long)]
        url: String,
        /// Per-request timeout in seconds.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Write every task and asset scope in Redis as JSON lines (AIRSTATE_REDIS_URL,
    /// AIRSTATE_KEY_PREFIX), or with --to-metastore into Airflow's task_state_store and
    /// asset_state_store tables (AIRFLOW__DATABASE__SQL_ALCHEMY_CONN) for a rollback to
    /// Airflow's own backend: upserts, idempotent; skips (and counts) expired keys, keys of
    /// DAG runs no longer in dag_run and asset keys that are not Airflow asset ids. Progress
    /// on a terminal; a summary on stderr at the end.
    Export {
        /// File to write; `-` is standard output.
        #[arg(long, short, default_value = "-", conflicts_with = "to_metastore")]
        output: String,
        /// Write into Airflow's metastore tables instead of JSON lines.
        #[arg(long)]
        to_metastore: bool,
        /// Keys written per metastore transaction (with --to-metastore).
        #[arg(long, default_value_t = airstate::migrate::metastore::EXPORT_BATCH as u32,
              value_parser = clap::value_parser!(u32).range(1..=10_000),
              requires = "to_metastore")]
        batch_size: u32,
    },
    /// Write JSON lines made by `export` into Redis (every line is checked first; a bad
    /// file changes nothing), or with --from-metastore Airflow's task_state_store and
    /// asset_state_store tables (AIRFLOW__DATABASE__SQL_ALCHEMY_CONN). Idempotent. With
    /// AIRFLOW__DATABASE__SQL_ALCHEMY_CONN set, task lines without dag_run_id are keyed by
    /// their run's id from dag_run (skipped when the run is gone) and their old copies cleared.
    Import {
        /// File to read; `-` is standard input.
        #[arg(long, short, default_value = "-", conflicts_with = "from_metastore")]
        input: String,
        /// Read Airflow's metastore tables instead of JSON lines.
        #[arg(long)]
        from_metastore: bool,
    },
    /// Print an execution token signed with the configured key, as Airflow would mint one.
    Token {
        /// Task-instance UUID (the token subject); the all-zero UUID is a watcher.
        #[arg(long)]
        sub: uuid::Uuid,
        /// Identity claims, for AIRSTATE_IDENTITY=claims.
        #[arg(long)]
        dag_id: Option<String>,
        #[arg(long)]
        run_id: Option<String>,
        #[arg(long)]
        task_id: Option<String>,
        #[arg(long)]
        map_index: Option<i64>,
        /// Token lifetime in seconds.
        #[arg(long, default_value_t = 600)]
        ttl: u64,
    },
}

fn env_help() -> String {
    let mut help = String::from("Environment variables:\n");
    for variable in airstate::config::VARIABLES {
        help.push_str(&format!(
            "  {}\n      {} [default: {}]\n",
            variable.name,
            variable.meaning,
            variable.default.text()
        ));
    }
    help
}

fn healthcheck(url: Option<String>) -> ExitCode {
    let url = url.unwrap_or_else(|| {
        let listen = std::env::var("AIRSTATE_LISTEN")
            .ok()
            .filter(|listen| !listen.trim().is_empty())
            .or_else(|| airstate::config::default_value("AIRSTATE_LISTEN"))
            .unwrap_or_default();
        let port = listen.rsplit(':').next().unwrap_or_default();
        format!("http://127.0.0.1:{port}/ready")
    });
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(3)))
        .build()
        .new_agent();
    match agent.get(&url).call() {
        Ok(response) if response.status() == 200 => ExitCode::SUCCESS,
        Ok(response) => {
            eprintln!("airstate: {url} answered {}", response.status());
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("airstate: {url}: {error}");
            ExitCode::FAILURE
        }
    }
}

enum Migration {
    Export(String),
    Import(String),
    FromMetastore,
    ToMetastore { batch: usize },
}

/// The metastore URL for --from-metastore / --to-metastore, as the gateway reads it.
fn metastore_url(flag: &str) -> Result<String, airstate::migrate::MigrateError> {
    use airstate::migrate::MigrateError;
    let conn = std::env::var("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN").map_err(|_| {
        MigrateError::Metastore(format!(
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN is required with {flag}"
        ))
    })?;
    airstate::identity::metastore::postgres_url_from_sqlalchemy(&conn)
        .map_err(MigrateError::Metastore)
}

/// Export and import need Redis (and the metastore), never a JWT key.
fn migrate(migration: Migration) -> ExitCode {
    use airstate::migrate::MigrateError;
    let redis = match airstate::config::redis_from_lookup(|name| std::env::var(name).ok()) {
        Ok(Some(redis)) => redis,
        Ok(None) => {
            eprintln!("airstate: AIRSTATE_REDIS_URL is required for export and import");
            return ExitCode::from(2);
        }
        Err(error) => {
            eprintln!("airstate: {error}");
            return ExitCode::from(2);
        }
    };
    let batch_bytes =
        match airstate::config::export_batch_bytes_from_lookup(|name| std::env::var(name).ok()) {
            Ok(bytes) => bytes,
            Err(error) => {
                eprintln!("airstate: {error}");
                return ExitCode::from(2);
            }
        };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result: Result<(&str, airstate::migrate::Summary), MigrateError> =
        runtime.block_on(async {
            let store = airstate::store::redis::RedisStore::connect(&redis).await?;
            match migration {
                Migration::Export(path) => {
                    let mut out: Box<dyn std::io::Write> = if path == "-" {
                        Box::new(std::io::BufWriter::new(std::io::stdout().lock()))
                    } else {
                        Box::new(std::io::BufWriter::new(std::fs::File::create(&path)?))
                    };
                    let summary =
                        airstate::migrate::export_in_batches(&store, &mut out, batch_bytes).await?;
                    Ok(("exported", summary))
                }
                Migration::Import(path) => {
                    let mut input: Box<dyn std::io::BufRead> = if path == "-" {
                        Box::new(std::io::stdin().lock())
                    } else {
                        Box::new(std::io::BufReader::new(std::fs::File::open(&path)?))
                    };
                    let store = std::sync::Arc::new(store);
                    // With a metastore the gateway keys task state by dag_run.id.
                    let summary = match std::env::var("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN") {
                        Ok(_) if std::env::var("AIRSTATE_IDENTITY").as_deref() != Ok("claims") => {
                            let url = metastore_url("import")?;
                            airstate::migrate::import_with_run_ids(store, &mut input, &url).await?
                        }
                        _ => airstate::migrate::import(store, &mut input).await?,
                    };
                    Ok(("imported", summary))
                }
                Migration::ToMetastore { batch } => {
                    let url = metastore_url("--to-metastore")?;
                    let summary = airstate::migrate::metastore::export_in_batches(
                        &store,
                        &url,
                        batch,
                        batch_bytes,
                    )
                    .await?;
                    Ok(("exported", summary))
                }
                Migration::FromMetastore => {
                    let url = metastore_url("--from-metastore")?;
                    let summary =
                        airstate::migrate::metastore::import(std::sync::Arc::new(store), &url)
                            .await?;
                    Ok(("imported", summary))
                }
            }
        });
    match result {
        Ok((verb, summary)) => {
            eprintln!("airstate: {verb} {summary}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("airstate: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Refuses unknown `AIRSTATE_*` variables (or warns, with the opt-out), for every command
/// that reads the configuration.
fn check_variables() -> Result<(), ExitCode> {
    let names = std::env::vars_os().filter_map(|(name, _)| name.into_string().ok());
    match airstate::config::check_variables(names, |name| std::env::var(name).ok()) {
        Ok(unknown) => {
            for variable in unknown {
                eprintln!("airstate: warning: {variable}");
            }
            Ok(())
        }
        Err(error) => {
            eprintln!("airstate: {error}");
            Err(ExitCode::from(2))
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Healthcheck { url } = &cli.command {
        // Probes run in the serving container: a start that got past the check needs no other.
        return healthcheck(url.clone());
    }
    if let Err(code) = check_variables() {
        return code;
    }
    match &cli.command {
        Command::Healthcheck { .. } => unreachable!("answered above"),
        Command::Export {
            output,
            to_metastore,
            batch_size,
        } => {
            return migrate(if *to_metastore {
                Migration::ToMetastore {
                    batch: *batch_size as usize,
                }
            } else {
                Migration::Export(output.clone())
            })
        }
        Command::Import {
            input,
            from_metastore,
        } => {
            return migrate(if *from_metastore {
                Migration::FromMetastore
            } else {
                Migration::Import(input.clone())
            })
        }
        _ => {}
    }
    let config = match airstate::config::Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("airstate: {error}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Serve => {
            let format = match airstate::telemetry::LogFormat::from_env() {
                Ok(format) => format,
                Err(error) => {
                    eprintln!("airstate: invalid configuration: {error}");
                    return ExitCode::from(2);
                }
            };
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            runtime.block_on(async {
                let telemetry = airstate::telemetry::init(format);
                let result = airstate::serve(config).await;
                telemetry.shutdown();
                match result {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => {
                        eprintln!("airstate: {error}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Command::Selftest { url, timeout } => {
            match selftest::run(&url, &config, Duration::from_secs(timeout)) {
                Ok(summary) => {
                    println!("airstate selftest: {summary}");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("airstate selftest: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Healthcheck { .. } | Command::Export { .. } | Command::Import { .. } => {
            unreachable!("handled before configuration is read")
        }
        Command::Token {
            sub,
            dag_id,
            run_id,
            task_id,
            map_index,
            ttl,
        } => {
            let mut claims = Map::new();
            claims.insert("sub".into(), sub.to_string().into());
            for (name, value) in [("dag_id", dag_id), ("run_id", run_id), ("task_id", task_id)] {
                if let Some(value) = value {
                    claims.insert(name.into(), Value::String(value));
                }
            }
            if let Some(index) = map_index {
                claims.insert("map_index".into(), index.into());
            }
            let minted = airstate::auth::Authenticator::new(&config.auth)
                .and_then(|auth| auth.mint(claims, Duration::from_secs(ttl)));
            match minted {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("airstate: {error}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
