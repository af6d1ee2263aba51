//! The `airstate` command: parses arguments and hands over to the library.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{Map, Value};

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
    for (name, default, meaning) in airstate::config::VARIABLES {
        help.push_str(&format!("  {name}\n      {meaning} [default: {default}]\n"));
    }
    help
}

fn healthcheck(url: Option<String>) -> ExitCode {
    let url = url.unwrap_or_else(|| {
        let listen = std::env::var("AIRSTATE_LISTEN").unwrap_or_default();
        let port = listen
            .rsplit(':')
            .next()
            .filter(|p| !p.is_empty())
            .unwrap_or("8080");
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Healthcheck { url } = &cli.command {
        return healthcheck(url.clone());
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
        Command::Healthcheck { .. } => unreachable!("handled before configuration is read"),
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
