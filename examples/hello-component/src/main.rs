//! Flotilla's example workload as a WASI preview 2 command component: the same
//! service as examples/hello (a wasm32-wasip1 core module), built for
//! wasm32-wasip2 so the output is a component exporting `wasi:cli/run`.
//!
//! A long-running service that prints `"<GREETING> #<n> from <argv[0]>"` to
//! stdout every `--interval-ms` milliseconds, flushing each line so the agent
//! sees it at once.
//!
//! Build: `cargo build --release --target wasm32-wasip2 --manifest-path examples/hello-component/Cargo.toml`
//! Output: `examples/hello-component/target/wasm32-wasip2/release/hello-component.wasm`
//!
//! Options:
//!   --interval-ms N       pause between lines (default 1000)
//!   --count N             exit after N lines (default: run forever)
//!   --exit-code C         exit status after the count (default 0; WASI 0.2's
//!                         `wasi:cli/exit` only tells success from failure, so a
//!                         host may report any non-zero code as 1)
//!   --fail-to-stderr MSG  print MSG to stderr before starting
//!
//! Environment: GREETING (default "hello from flotilla").

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

const DEFAULT_GREETING: &str = "hello from flotilla";
const USAGE: &str = "usage: hello-component [--interval-ms N] [--count N] [--exit-code C] [--fail-to-stderr MSG]";

#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    interval_ms: u64,
    count: Option<u64>,
    exit_code: u8,
    fail_to_stderr: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options { interval_ms: 1000, count: None, exit_code: 0, fail_to_stderr: None }
    }
}

/// Parses the arguments after argv[0]. Accepts `--flag value` and `--flag=value`.
fn parse_args<I>(args: I) -> Result<Options, String>
where
    I: IntoIterator<Item = String>,
{
    let mut opts = Options::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            match inline.clone().or_else(|| args.next()) {
                Some(v) => Ok(v),
                None => Err(format!("{name} needs a value")),
            }
        };
        match flag.as_str() {
            "--interval-ms" => {
                let v = value("--interval-ms")?;
                opts.interval_ms =
                    v.parse().map_err(|_| format!("--interval-ms: not a non-negative integer: {v:?}"))?;
            }
            "--count" => {
                let v = value("--count")?;
                opts.count = Some(v.parse().map_err(|_| format!("--count: not a non-negative integer: {v:?}"))?);
            }
            "--exit-code" => {
                let v = value("--exit-code")?;
                opts.exit_code = v.parse().map_err(|_| format!("--exit-code: not an integer 0-255: {v:?}"))?;
            }
            "--fail-to-stderr" => opts.fail_to_stderr = Some(value("--fail-to-stderr")?),
            _ => return Err(format!("unknown argument: {arg:?}")),
        }
    }
    Ok(opts)
}

fn line(greeting: &str, n: u64, name: &str) -> String {
    format!("{greeting} #{n} from {name}")
}

fn main() -> ExitCode {
    let mut argv = std::env::args();
    let name = argv.next().unwrap_or_else(|| "hello-component".to_string());
    let opts = match parse_args(argv) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("hello-component: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let greeting = std::env::var("GREETING").unwrap_or_else(|_| DEFAULT_GREETING.to_string());

    if let Some(msg) = &opts.fail_to_stderr {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{msg}");
        let _ = err.flush();
    }

    let interval = Duration::from_millis(opts.interval_ms);
    let mut n: u64 = 0;
    loop {
        if opts.count.is_some_and(|c| n >= c) {
            break;
        }
        n += 1;
        {
            let mut out = std::io::stdout().lock();
            // Stdout gone (e.g. the host closed it): nothing useful left to do.
            if writeln!(out, "{}", line(&greeting, n, &name)).and_then(|_| out.flush()).is_err() {
                return ExitCode::from(1);
            }
        }
        if opts.count.is_some_and(|c| n >= c) {
            break;
        }
        std::thread::sleep(interval);
    }
    ExitCode::from(opts.exit_code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn defaults() {
        assert_eq!(parse(&[]).unwrap(), Options::default());
        assert_eq!(Options::default().interval_ms, 1000);
    }

    #[test]
    fn all_flags_both_forms() {
        let o = parse(&["--interval-ms", "250", "--count=3", "--exit-code", "7", "--fail-to-stderr", "boom"]).unwrap();
        assert_eq!(o, Options { interval_ms: 250, count: Some(3), exit_code: 7, fail_to_stderr: Some("boom".into()) });
    }

    #[test]
    fn value_may_contain_equals() {
        let o = parse(&["--fail-to-stderr=a=b"]).unwrap();
        assert_eq!(o.fail_to_stderr.as_deref(), Some("a=b"));
    }

    #[test]
    fn rejects_unknown_and_bad_values() {
        assert!(parse(&["--nope"]).unwrap_err().contains("unknown argument"));
        assert!(parse(&["positional"]).is_err());
        assert!(parse(&["--count"]).unwrap_err().contains("needs a value"));
        assert!(parse(&["--interval-ms", "-5"]).is_err());
        assert!(parse(&["--exit-code", "256"]).is_err());
    }

    #[test]
    fn line_format() {
        assert_eq!(line("hi", 3, "hello-component.wasm"), "hi #3 from hello-component.wasm");
    }
}
