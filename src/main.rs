//! The `kvgate` binary: parse flags, set up logging, run until SIGINT/SIGTERM;
//! or, as `kvgate demo`, run the demo ([`kvgate::demo`]).

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use kvgate::config::{Cli, Config};

/// EX_USAGE: a bad flag or configuration value.
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    // The demo is the only subcommand; `Cli` stays flat so every existing
    // command line keeps its meaning.
    #[cfg(feature = "demo")]
    if std::env::args_os().nth(1).is_some_and(|a| a == "demo") {
        return demo();
    }
    let command = Cli::command();
    #[cfg(feature = "demo")]
    let command = command
        .after_help("To see kvgate at work without a model: kvgate demo (see kvgate demo --help).");
    let cli = match command
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(c) => c,
        Err(e) => return clap_exit(&e, "kvgate --help"),
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

/// `kvgate demo [--llama-server PATH] [--keep DIR]`: exit 0 when the demo
/// ran and its self-check passed, 1 otherwise.
#[cfg(feature = "demo")]
fn demo() -> ExitCode {
    use clap::Parser;
    use kvgate::demo::DemoCli;

    // The first argument ("demo") stands where clap expects the binary name.
    let cli = match DemoCli::try_parse_from(std::env::args_os().skip(1)) {
        Ok(c) => c,
        Err(e) => return clap_exit(&e, "kvgate demo --help"),
    };
    if let Some(path) = &cli.write_model {
        return match kvgate::demo::write_model(path) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kvgate demo: {e}");
                ExitCode::FAILURE
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kvgate demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        tokio::select! {
            r = kvgate::demo::run(cli.options()) => Some(r),
            _ = shutdown_signal() => None,
        }
    });
    // Dropping the runtime drops the supervisor's task, whose llama-server
    // child is killed on drop: nothing is left behind after an interrupt.
    drop(rt);
    match result {
        Some(Ok(_)) => ExitCode::SUCCESS,
        Some(Err(e)) => {
            eprintln!("kvgate demo: {e}");
            ExitCode::FAILURE
        }
        None => {
            eprintln!("kvgate demo: interrupted");
            ExitCode::FAILURE
        }
    }
}

/// Prints help or version (exit 0), or a one-line usage error pointing at
/// `help` (exit 64).
fn clap_exit(e: &clap::Error, help: &str) -> ExitCode {
    if matches!(
        e.kind(),
        clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
    ) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let msg = e.to_string();
    let line = msg
        .lines()
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ");
    eprintln!("kvgate: {line} (see {help})");
    ExitCode::from(EXIT_USAGE)
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
