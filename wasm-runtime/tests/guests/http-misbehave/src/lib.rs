//! `/spin` loops forever without yielding, `/trap` executes `unreachable`, `/noresponse` returns
//! without setting a response, `/grow` grows memory until the host stops it, `/sleep` sleeps for
//! one second and then answers `200 slept`, anything else gets `200 ok`.

use wasi::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};

struct Misbehave;

impl wasi::exports::http::incoming_handler::Guest for Misbehave {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        match path.as_str() {
            "/spin" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "/trap" => core::arch::wasm32::unreachable(),
            "/noresponse" => return,
            "/sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(1));
                respond(out, b"slept\n");
                return;
            }
            "/grow" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            _ => {}
        }
        respond(out, b"ok\n");
    }
}

fn respond(out: ResponseOutparam, text: &[u8]) {
    let response = OutgoingResponse::new(Fields::new());
    response.set_status_code(200).unwrap();
    let body = response.body().unwrap();
    ResponseOutparam::set(out, Ok(response));
    let stream = body.write().unwrap();
    stream.blocking_write_and_flush(text).unwrap();
    drop(stream);
    OutgoingBody::finish(body, None).unwrap();
}

wasi::http::proxy::export!(Misbehave);
