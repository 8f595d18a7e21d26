//! `saiki-relay`: the source (slot → Kafka) and sink (Kafka → ODS) daemons.
//!
//! This build carries the command surface only: `source` and `sink` are built under issues
//! #3 and #4 and refuse to run here rather than pretend to.

use std::process::ExitCode;

const USAGE: &str = "usage: saiki-relay <source|sink|status> --config FILE\n\n\
  source   stream a replication slot into Kafka (not in this build yet)\n\
  sink     materialize Kafka topics into the ODS (not in this build yet)\n\
  status   print the slot table of saiki.slot_status() (not in this build yet)\n";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--version") | Some("-V") => {
            println!("saiki-relay {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some("--help") | Some("-h") | None => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some(cmd @ ("source" | "sink" | "status")) => {
            eprintln!("saiki-relay {cmd}: not available in this build of Saiki yet");
            ExitCode::from(2)
        }
        Some(other) => {
            eprintln!("saiki-relay: unknown command '{other}'\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
