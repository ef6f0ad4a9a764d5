//! The `kvgate` binary: parse flags, set up logging, run until SIGINT/SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use kvgate::config::{Cli, Config};

/// EX_USAGE: a bad flag or configuration value.
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let msg = e.to_string();
            let line = msg
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("kvgate: {line} (see kvgate --help)");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let kv_save_dir = std::env::var_os("KV_SAVE_DIR").map(Into::into);
    let cfg = match Config::from_cli(cli, kv_save_dir) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kvgate: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cfg.log))
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kvgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(kvgate::run(cfg, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvgate: {e}");
            match e {
                kvgate::StartError::Policy(_)
                | kvgate::StartError::SaveDir(_)
                | kvgate::StartError::Clients(_) => ExitCode::from(EXIT_USAGE),
                kvgate::StartError::Bind { .. } | kvgate::StartError::Llama(_) => ExitCode::FAILURE,
            }
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
