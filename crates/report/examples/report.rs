//! Builds the report of a finished run and prints its main table:
//! `cargo run -p rbon-report --example report -- RUN_DIR`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: report RUN_DIR");
        return ExitCode::from(2);
    };
    match rbon_report::build_report(&dir, rbon_report::ReportOptions::default()) {
        Ok(r) => {
            print!("{}", r.terminal_table());
            for f in &r.files {
                println!("wrote {}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
