//! `edgetune-server`: the federated aggregation server (the same as `edgetune fed serve`).

use clap::Parser;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(version, about = "edgetune's federated aggregation server")]
struct Cli {
    #[command(flatten)]
    serve: edgetune_server::args::ServeArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match edgetune_server::serve_forever(&cli.serve) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
