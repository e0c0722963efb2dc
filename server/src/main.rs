//! `presence-server`: parse the configuration (failing before anything binds),
//! set up logs, and serve until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use clap::Parser;
use presence_server::config::{Cli, Command};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Token { user, admin, ttl }) = &cli.command {
        return match cli.config.jwt_secret() {
            Ok(secret) => {
                let config = &cli.config;
                println!(
                    "{}",
                    presence_server::auth::mint_for(
                        secret,
                        user,
                        *admin,
                        *ttl,
                        config.jwt_issuer.as_deref(),
                        config.jwt_audience.as_deref(),
                    )
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("presence-server token: {error}");
                ExitCode::from(2)
            }
        };
    }
    if let Some(Command::Migrate) = &cli.command {
        return migrate(&cli.config).await;
    }
    if let Err(error) = cli.config.validate() {
        eprintln!("presence-server: {error}");
        return ExitCode::from(2);
    }
    let _telemetry = match presence_server::telemetry::init(cli.config.log_format) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("presence-server: cannot set up telemetry: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(addr) = cli.config.metrics_listen
        && let Err(error) = presence_server::telemetry::serve_metrics(addr)
    {
        tracing::error!(error = format!("{error:#}"), %addr, "cannot serve metrics");
        return ExitCode::FAILURE;
    }
    let listener = match TcpListener::bind(cli.config.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, listen = %cli.config.listen, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    match presence_server::run(cli.config, listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "server failed");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail at startup");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

async fn migrate(config: &presence_server::config::Config) -> ExitCode {
    if config.scylla.is_empty() {
        eprintln!("presence-server migrate: --scylla is required");
        return ExitCode::from(2);
    }
    match presence_server::store::scylla::migrate_with(&config.scylla_config()).await {
        Ok(()) => {
            println!("schema up to date");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("presence-server migrate: {error:#}");
            ExitCode::FAILURE
        }
    }
}
