//! The frame codec and every message type on Flotilla's streams: a header is checked against
//! both frame limits, the body is decoded as each message; whatever decodes must encode and
//! decode again to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::codec::{self, HEADER_LEN, MAX_FRAME, MAX_UNAUTHENTICATED_FRAME};
use proto::messages::{
    AgentMsg, ApiRequest, ApiResponse, AssignmentSet, ClientConfigFile, HubMsg, HubRequest, JoinRequest,
    JoinResponse, StreamStart,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Decodes `body` as `T`; a value that decodes re-encodes, and decodes to the same JSON.
fn round_trip<T: Serialize + DeserializeOwned>(body: &[u8]) {
    let Ok(msg) = codec::decode::<T>(body) else { return };
    let frame = codec::encode(&msg).expect("a decoded message encodes");
    let len = codec::body_len(frame[..HEADER_LEN].try_into().unwrap()).expect("an encoded frame has a valid length");
    assert_eq!(len, frame.len() - HEADER_LEN);
    let again: T = codec::decode(&frame[HEADER_LEN..]).expect("an encoded message decodes");
    assert_eq!(
        serde_json::to_value(&msg).unwrap(),
        serde_json::to_value(&again).unwrap(),
        "a message changed across encode and decode"
    );
}

fuzz_target!(|data: &[u8]| {
    if data.len() >= HEADER_LEN {
        let header: [u8; HEADER_LEN] = data[..HEADER_LEN].try_into().unwrap();
        let len = u32::from_be_bytes(header) as usize;
        assert_eq!(codec::body_len(header).is_ok(), len <= MAX_FRAME);
        assert_eq!(codec::body_len_within(header, MAX_UNAUTHENTICATED_FRAME).is_ok(), len <= MAX_UNAUTHENTICATED_FRAME);
    }
    let body = data.get(HEADER_LEN..).unwrap_or(data);
    round_trip::<JoinRequest>(body);
    round_trip::<JoinResponse>(body);
    round_trip::<AgentMsg>(body);
    round_trip::<HubMsg>(body);
    round_trip::<HubRequest>(body);
    round_trip::<StreamStart>(body);
    round_trip::<ApiRequest>(body);
    round_trip::<ApiResponse>(body);
    round_trip::<AssignmentSet>(body);
    round_trip::<ClientConfigFile>(body);
});
