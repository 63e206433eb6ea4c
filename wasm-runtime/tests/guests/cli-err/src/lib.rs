//! Exports `wasi:cli/run` directly; `run` returns `Err(())`.

struct Run;

impl wasi::exports::cli::run::Guest for Run {
    fn run() -> Result<(), ()> {
        Err(())
    }
}

wasi::cli::command::export!(Run);
