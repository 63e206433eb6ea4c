//! Answers every request with `200 hello from wasm: <METHOD> <path>` (and `$GREETING` if set).

use wasi::http::types::{Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam};

struct Hello;

impl wasi::exports::http::incoming_handler::Guest for Hello {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let method = match request.method() {
            Method::Get => "GET".to_string(),
            Method::Post => "POST".to_string(),
            Method::Other(m) => m,
            _ => "OTHER".to_string(),
        };
        let path = request.path_with_query().unwrap_or_default();
        let mut text = format!("hello from wasm: {method} {path}\n");
        if let Ok(greeting) = std::env::var("GREETING") {
            text.push_str(&greeting);
            text.push('\n');
        }
        let headers = Fields::from_list(&[("content-type".to_string(), b"text/plain".to_vec())]).unwrap();
        let response = OutgoingResponse::new(headers);
        response.set_status_code(200).unwrap();
        let body = response.body().unwrap();
        ResponseOutparam::set(out, Ok(response));
        let stream = body.write().unwrap();
        // blocking_write_and_flush accepts at most 4096 bytes per call.
        for chunk in text.as_bytes().chunks(4096) {
            stream.blocking_write_and_flush(chunk).unwrap();
        }
        drop(stream);
        OutgoingBody::finish(body, None).unwrap();
    }
}

wasi::http::proxy::export!(Hello);
