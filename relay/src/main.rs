//! `saiki-relay`: the source (slot → Kafka) and sink (Kafka → ODS) daemons and the operator
//! commands; everything is in the library (`cli.rs`), so that its modules stay crate-private.

fn main() -> std::process::ExitCode {
    saiki_relay::cli::main()
}
