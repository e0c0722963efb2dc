//! `loadgen`: the load generator and benchmark of the presence service.
//!
//!   loadgen run --sessions 5000 --connections 500 --watchers 250 --contacts 20 \
//!       --change-rate 200 --get-rate 500 --server-pid $(pgrep -n presence-server) --json out.json
//!   loadgen soak --target 127.0.0.1:55000,127.0.0.1:55001 --sessions 20000 --duration 30m
//!   loadgen merge --json run.json proc-*.json      # processes of one run
//!   loadgen median --markdown run-1.json run-2.json run-3.json

use std::process::ExitCode;

use clap::Parser;
use presence_e2e::loadgen::{self, Cli, Command, MedianReport, RunReport};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("loadgen: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(cfg) => {
            let cfg = *cfg;
            cfg.validate()?;
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            if cfg.threads > 0 {
                runtime.worker_threads(cfg.threads);
            }
            let runtime = runtime.enable_all().build()?;
            let json = cfg.json.clone();
            let process = runtime.block_on(loadgen::run(cfg))?;
            let report = RunReport::new(vec![process])?;
            if let Some(path) = json {
                report.write(&path)?;
            }
            print!("{}", loadgen::report::run_table(&report));
            // Do not wait for tasks still winding down (streams the server
            // never closed): the figures are out.
            runtime.shutdown_background();
        }
        Command::Soak(cfg) => {
            let cfg = *cfg;
            cfg.validate()?;
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            if cfg.threads > 0 {
                runtime.worker_threads(cfg.threads);
            }
            let runtime = runtime.enable_all().build()?;
            let json = cfg.json.clone();
            let report = runtime.block_on(loadgen::chaos::run(cfg))?;
            if let Some(path) = json {
                report.write(&path)?;
            }
            print!("{}", loadgen::chaos::table(&report));
            runtime.shutdown_background();
            anyhow::ensure!(
                report.clean(),
                "the users shown online differ from the live clients (see the check above)"
            );
        }
        Command::Merge { json, files } => {
            let mut processes = Vec::new();
            for file in &files {
                processes.extend(RunReport::read(file)?.processes);
            }
            processes.sort_by_key(|p| p.proc_index);
            let report = RunReport::new(processes)?;
            if let Some(path) = json {
                report.write(&path)?;
            }
            print!("{}", loadgen::report::run_table(&report));
        }
        Command::Median {
            json,
            markdown,
            files,
        } => {
            let mut runs = Vec::new();
            for file in &files {
                runs.push((file.display().to_string(), RunReport::read(file)?));
            }
            let report = MedianReport::of(&runs);
            if let Some(path) = json {
                report.write(&path)?;
            }
            print!("{}", loadgen::report::median_table(&report, markdown));
        }
    }
    Ok(())
}
