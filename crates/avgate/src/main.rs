//! The `avgate` binary: parse the command line, dispatch. Exit codes:
//! 0 success, 1 runtime failure, 2 invalid usage or configuration.

use std::process::ExitCode;

use avgate::cli::{Cli, Command, ServeArgs};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Token(args) => avgate::auth::cli::run(args),
        Command::Policy(args) => avgate::policy::cli::run(args),
        Command::CheckConfig(args) => match args.load() {
            Ok(config) => {
                // The verdict on stderr, the configuration alone on stdout:
                // `avgate check-config > effective.toml` is a valid file.
                eprintln!("avgate: configuration is valid");
                println!(
                    "# avgate's effective configuration: the defaults, overridden by the file,\n\
                     # then by the environment (AVGATE_*), then by the flags.\n"
                );
                let toml = config.to_toml();
                print!("{toml}");
                if !toml.ends_with('\n') {
                    println!();
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("avgate: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve(args) => {
            let config = match args.load() {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("avgate: {e}");
                    return ExitCode::from(2);
                }
            };
            // Declared before the runtime, so dropped after it: the lines
            // of the shutdown are written too.
            let _log = avgate::cli::init_logging(
                config.log_format,
                config.log_level.as_deref(),
                config.log_flush_interval.0,
            );
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.runtime_workers())
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("avgate: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let code = match runtime.block_on(serve(args, config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("avgate: {e:#}");
                    ExitCode::FAILURE
                }
            };
            drop(runtime);
            code
        }
    }
}

async fn serve(args: ServeArgs, config: avgate::config::Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Registered first: SIGHUP's default action would end the process.
    let mut hangup = signal(SignalKind::hangup())?;
    let running = avgate::app::start(config).await?;
    let stopper = running.stopper();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: finishing in-flight scans");
        stopper.cancel();
    });
    // SIGHUP: the configuration again (same file, environment and flags),
    // what can change at runtime applied, the signatures reloaded.
    let reloader = running.reloader.clone();
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration and the signatures");
            match args.load() {
                Ok(config) => {
                    reloader.reload(config).await;
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "SIGHUP: the configuration is invalid; keeping the one in force"
                ),
            }
        }
    });
    running.wait().await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
