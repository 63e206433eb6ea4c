//! Flotilla's example wasi:http component: a `wasi:http/proxy` world component
//! whose exported `wasi:http/incoming-handler` answers
//!
//! - `GET /`          -> `200 text/plain` `hello from flotilla over wasi:http\n`
//! - `GET /env/NAME`  -> `200 text/plain` with the value of environment variable
//!   NAME (no trailing newline), or `404` if it is unset
//! - `GET /file/PATH` -> `200 text/plain` with the contents of the file `/PATH` in
//!   the component's preopened directories (its volumes), or `404`
//! - anything else    -> `404 text/plain` `not found\n`
//!
//! A query string (`?...`) is ignored. Environment variables come from the
//! host's `wasi:cli/environment` (the workload's `env:`), so the host must
//! provide that interface alongside wasi:http.
//!
//! Build: `cargo build --release --target wasm32-wasip2 --manifest-path examples/hello-http/Cargo.toml`
//! Output: `examples/hello-http/target/wasm32-wasip2/release/hello_http.wasm`

use wasi::exports::http::incoming_handler::Guest;
use wasi::http::types::{Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam};

pub const HELLO: &str = "hello from flotilla over wasi:http\n";
const NOT_FOUND: &str = "not found\n";

/// What to answer: status code and text body.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    fn ok(body: impl Into<String>) -> Self {
        Reply { status: 200, body: body.into() }
    }
    fn not_found() -> Self {
        Reply { status: 404, body: NOT_FOUND.to_owned() }
    }
}

/// Routes a request. `is_get` is whether the method is GET; `path_with_query`
/// is the request target (`None` treated as `/`); `env` looks a variable up.
pub fn route(is_get: bool, path_with_query: Option<&str>, env: impl Fn(&str) -> Option<String>) -> Reply {
    if !is_get {
        return Reply::not_found();
    }
    let target = path_with_query.unwrap_or("/");
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path == "/" {
        return Reply::ok(HELLO);
    }
    match path.strip_prefix("/env/") {
        Some(name) if !name.is_empty() && !name.contains('/') => env(name).map_or_else(Reply::not_found, Reply::ok),
        _ => Reply::not_found(),
    }
}

struct Component;

wasi::http::proxy::export!(Component);

impl Guest for Component {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let is_get = matches!(request.method(), Method::Get);
        let target = request.path_with_query();
        let path = target.as_deref().unwrap_or("/").split('?').next().unwrap_or("/");
        let reply = match path.strip_prefix("/file/") {
            Some(rel) if is_get => {
                std::fs::read_to_string(format!("/{rel}")).map_or_else(|_| Reply::not_found(), Reply::ok)
            }
            _ => route(is_get, target.as_deref(), |name| std::env::var(name).ok()),
        };
        respond(response_out, reply);
    }
}

fn respond(response_out: ResponseOutparam, reply: Reply) {
    let body = reply.body.into_bytes();
    let headers = Fields::from_list(&[
        ("content-type".to_owned(), b"text/plain".to_vec()),
        ("content-length".to_owned(), body.len().to_string().into_bytes()),
    ])
    .expect("static headers are valid");
    let response = OutgoingResponse::new(headers);
    response.set_status_code(reply.status).expect("valid status code");
    let out_body = response.body().expect("response body is taken once");
    ResponseOutparam::set(response_out, Ok(response));

    // The host has the response head now; a failure while streaming the body
    // (client gone) leaves nothing better to do than stop.
    let Ok(stream) = out_body.write() else { return };
    // blocking-write-and-flush takes at most 4096 bytes per call.
    for chunk in body.chunks(4096) {
        if stream.blocking_write_and_flush(chunk).is_err() {
            return;
        }
    }
    drop(stream);
    let _ = OutgoingBody::finish(out_body, None);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "GREETING").then(|| "hi there".to_owned())
    }

    #[test]
    fn root() {
        assert_eq!(route(true, Some("/"), env), Reply { status: 200, body: HELLO.to_owned() });
        assert_eq!(route(true, Some("/?x=1"), env).status, 200);
        assert_eq!(route(true, None, env).status, 200);
    }

    #[test]
    fn env_lookup() {
        assert_eq!(route(true, Some("/env/GREETING"), env), Reply { status: 200, body: "hi there".to_owned() });
        assert_eq!(route(true, Some("/env/GREETING?a=b"), env).body, "hi there");
        assert_eq!(route(true, Some("/env/MISSING"), env).status, 404);
        assert_eq!(route(true, Some("/env/"), env).status, 404);
        assert_eq!(route(true, Some("/env/GREETING/x"), env).status, 404);
    }

    #[test]
    fn everything_else_is_404() {
        assert_eq!(route(false, Some("/"), env).status, 404);
        assert_eq!(route(true, Some("/nope"), env), Reply::not_found());
        assert_eq!(route(true, Some("/env"), env).status, 404);
    }
}
