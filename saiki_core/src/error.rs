//! The one error type of the core crate.

/// Everything the pure core can refuse. Each message names the thing to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A logical decoding option the plugin does not know.
    #[error("unknown option \"{name}\" (known options: {known})")]
    UnknownOption { name: String, known: &'static str },
    /// A known option with a value that does not parse.
    #[error("invalid value \"{value}\" for option \"{name}\": {reason}")]
    InvalidOptionValue {
        name: String,
        value: String,
        reason: String,
    },
    /// Text that should have been an LSN (`X/X`).
    #[error(
        "invalid LSN \"{0}\": expected two hexadecimal numbers separated by '/', like 16/B374D848"
    )]
    InvalidLsn(String),
}
