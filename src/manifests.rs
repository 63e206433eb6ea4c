//! Manifests as the CLI sends them: what `get -o yaml` printed, taken back by `apply -f`.
//!
//! `get -o yaml` shows objects as kubectl does, with fields that are output only (`status`,
//! `metadata.creationTimestamp`) and several objects in a `kind: List`. The hub's parser
//! refuses unknown fields (a typo must not pass silently), so the CLI takes those off and
//! unpacks lists before it sends a file; a file that has none of them is sent as written.

use anyhow::Result;
use serde_json::Value;

/// `source` ready for the hub: output-only fields dropped and lists unpacked, as JSON
/// documents (JSON is YAML) when anything had to change, else `source` unchanged.
pub fn for_apply(source: &str) -> Result<String> {
    let documents = proto::yaml::documents(source, &proto::yaml::Limits::default())
        .map_err(|e| anyhow::anyhow!("document {}: {e}", e.document()))?;
    let mut changed = false;
    let mut out = Vec::new();
    for doc in documents {
        if doc.get("kind").and_then(Value::as_str) == Some("List") {
            changed = true;
            let items = doc.get("items").and_then(Value::as_array).cloned().unwrap_or_default();
            out.extend(items.into_iter().map(|i| strip(i, &mut changed)));
        } else {
            out.push(strip(doc, &mut changed));
        }
    }
    if !changed {
        return Ok(source.to_string());
    }
    let docs: Vec<String> = out.iter().map(serde_json::to_string).collect::<Result<_, _>>()?;
    Ok(docs.join("\n---\n"))
}

/// `doc` without `status` and `metadata.creationTimestamp`.
fn strip(mut doc: Value, changed: &mut bool) -> Value {
    if let Some(m) = doc.as_object_mut() {
        *changed |= m.remove("status").is_some();
        if let Some(meta) = m.get_mut("metadata").and_then(Value::as_object_mut) {
            *changed |= meta.remove("creationTimestamp").is_some();
        }
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_fields_and_lists_are_taken_off_and_plain_files_pass_as_written() {
        let plain = "# mine\napiVersion: flotilla.dev/v1\nkind: Config\nmetadata: {name: c}\ndata: {k: v}\n";
        assert_eq!(for_apply(plain).unwrap(), plain);
        let printed = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: flotilla.dev/v1\n  kind: Config\n  metadata: {name: c, creationTimestamp: '2024-01-01T00:00:00Z'}\n  data: {k: v}\n  status: {version: 1}\n";
        let sent = for_apply(printed).unwrap();
        let docs = proto::manifest::parse_documents(&sent).unwrap();
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].name(), "c");
        assert!(!sent.contains("status") && !sent.contains("creationTimestamp"), "{sent}");
        assert!(for_apply("a: [").unwrap_err().to_string().starts_with("document 1: "));
    }
}
