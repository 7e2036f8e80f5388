//! The `avgate` binary: parse the command line, dispatch. Exit codes:
//! 0 success, 1 runtime failure, 2 invalid usage or configuration.

use std::process::ExitCode;

use avgate::cli::{Cli, Command, ServeArgs};
use clap::Parser;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // clap names the flag even when the value came from its
            // environment variable, which the user may not know it reads.
            if let Some(var) = avgate::cli::env_source_of(&e) {
                eprintln!("note: the value comes from the environment variable {var}");
            }
            return ExitCode::from(e.exit_code().clamp(0, 255) as u8);
        }
    };
    match cli.command {
        Command::Token(args) => avgate::auth::cli::run(args),
        Command::Policy(args) => avgate::policy::cli::run(args),
        Command::CheckConfig(args) => match args.load() {
            Ok(config) => {
                // The files serve would read: a check that passes must not
                // be followed by a start that fails on them.
                let problems = avgate::cli::check_files(&config);
                if !problems.is_empty() {
                    for problem in &problems {
                        eprintln!("avgate: {problem}");
                    }
                    return ExitCode::from(2);
                }
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
    // Registered first: the default actions would end the process at once,
    // during start-up too (and leave a clamd just started behind). A signal
    // that comes during start-up is kept and acted on once it is done.
    let mut hangup = signal(SignalKind::hangup())?;
    let mut stop_signals = StopSignals::register()?;
    let running = avgate::app::start(config).await?;
    let stopper = running.stopper();
    let managed = running.state.managed.clone();
    tokio::spawn(async move {
        stop_signals.next().await;
        tracing::info!(
            "shutting down: finishing in-flight scans (a second SIGTERM or Ctrl-C exits at once)"
        );
        stopper.cancel();
        stop_signals.next().await;
        // Exiting skips the orderly stop: take the managed clamd along.
        if let Some(pid) = managed.and_then(|m| m.status().pid) {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        // A warning: written at once, with the lines waiting before it.
        tracing::warn!("second stop signal: exiting without waiting for in-flight scans");
        std::process::exit(130);
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

/// SIGTERM and SIGINT (Ctrl-C).
struct StopSignals {
    term: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn register() -> std::io::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}
