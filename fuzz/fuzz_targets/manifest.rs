//! The manifest parser (YAML within limits, then the manifest types and their validation).
//! What parses must survive a JSON round trip unchanged and parse again from it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::manifest::{Manifest, parse_manifests};

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else { return };
    let _ = proto::yaml::documents(source, &proto::yaml::Limits::default());
    let Ok(manifests) = parse_manifests(source) else { return };
    for m in manifests {
        assert!(m.validate().is_ok(), "a parsed manifest fails validation");
        let template = m.template();
        assert_eq!(template.hash().len(), 16);
        let json = serde_json::to_string(&m).expect("a manifest serializes");
        let back: Manifest = serde_json::from_str(&json).expect("a serialized manifest deserializes");
        assert_eq!(back, m);
        let again = parse_manifests(&json).expect("a manifest's JSON (valid YAML) parses");
        assert_eq!(again, vec![m]);
    }
});
