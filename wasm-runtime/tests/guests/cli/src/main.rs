//! A `wasi:cli/run` component (Rust std `main` on wasm32-wasip2). `argv[1]` selects what it does:
//!
//! * `echo [args..]`: prints `args: a|b|..` to stdout and every `KEY=VALUE` of its environment
//!   to stderr, then exits with the code in `$EXIT_CODE` (default 0).
//! * `read PATH`: prints the file's contents to stdout.
//! * `write PATH`: tries to create PATH and write to it; prints `written` or `write failed: ..`.
//! * `connect ADDR`: tries a TCP connection; prints `connected` or `connect failed: ..`.
//! * `resolve HOST`: tries a name lookup; prints `resolved` or `resolve failed: ..`.
//! * `spin`: loops forever.

use std::io::Write as _;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let cmd = args.get(1).map(String::as_str).unwrap_or("echo");
    let arg = args.get(2).cloned().unwrap_or_default();
    match cmd {
        "echo" => {
            println!("args: {}", args.join("|"));
            for (k, v) in std::env::vars() {
                eprintln!("{k}={v}");
            }
            let code = std::env::var("EXIT_CODE").ok().and_then(|c| c.parse().ok()).unwrap_or(0);
            std::io::stdout().flush().ok();
            std::process::exit(code);
        }
        "read" => match std::fs::read_to_string(&arg) {
            Ok(text) => print!("{text}"),
            Err(e) => {
                println!("read failed: {e}");
                std::process::exit(2);
            }
        },
        "write" => match std::fs::File::create(&arg).and_then(|mut f| f.write_all(b"from guest")) {
            Ok(()) => println!("written"),
            Err(e) => println!("write failed: {e}"),
        },
        "connect" => match std::net::TcpStream::connect(&arg) {
            Ok(_) => println!("connected"),
            Err(e) => println!("connect failed: {e}"),
        },
        "resolve" => match std::net::ToSocketAddrs::to_socket_addrs(&(arg.as_str(), 80)) {
            Ok(_) => println!("resolved"),
            Err(e) => println!("resolve failed: {e}"),
        },
        "spin" => {
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        other => {
            eprintln!("unknown command {other:?}");
            std::process::exit(64);
        }
    }
}
