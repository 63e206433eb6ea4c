//! YAML documents read within limits, for input that may come from anyone holding an API
//! credential (or from a file an operator did not write).
//!
//! Reading is bounded before any work is done and while it is done:
//!
//! - the input's size is checked first ([`Limits::max_input_bytes`]);
//! - the parser (serde-saphyr over granit-parser, a streaming parser) stops at the first
//!   collection nested deeper than [`Limits::max_depth`], flow or block, so a deeply nested
//!   document costs what its first `max_depth` levels cost and not the square of its depth;
//! - aliases are counted (absolute and per anchor) and so are the events they replay;
//! - every document is built by [`Metered`], which charges each node and each string's bytes
//!   *before* they are allocated against a per-document and a total budget, so a small anchor
//!   repeated by aliases cannot expand past the limit: the first byte over it ends the read.
//!
//! serde_yaml 0.9 (deprecated) could do none of this: libyaml tokenizes a whole document before
//! serde_yaml checks its depth, and its flow-level bookkeeping makes a deeply nested flow
//! collection quadratic, while its alias check counts jumps, not bytes.
//!
//! The output is `serde_json::Value` per document: the manifest types then deserialize from it
//! with field paths (`serde_path_to_error`), exactly as they do from JSON.

use std::cell::Cell;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Largest manifest file (or API request body) accepted: 3 MiB.
pub const MAX_REQUEST_BYTES: usize = 3 * 1024 * 1024;
/// Largest single document, measured as it expands (aliases count each time they are used):
/// 1.5 MiB.
pub const MAX_OBJECT_BYTES: usize = 3 * 512 * 1024;

/// Bytes charged for each node beside its strings: a rough size of a `Value` and its map or
/// vector slot, so a document of a million empty lists is as expensive as it is in memory.
const NODE_COST: usize = 32;

/// What one read may cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Size of the input text.
    pub max_input_bytes: usize,
    /// Expanded size of one document (strings, keys and [`NODE_COST`] per node).
    pub max_document_bytes: usize,
    /// Expanded size of all documents together.
    pub max_total_bytes: usize,
    /// Nesting of collections (flow or block).
    pub max_depth: usize,
    /// Number of documents.
    pub max_documents: usize,
    /// Number of aliases (`*name`) in the input.
    pub max_aliases: usize,
}

impl Default for Limits {
    /// Limits for manifests: 3 MiB of input, 1.5 MiB per document and twice the input in all,
    /// 32 levels of nesting (a manifest needs about 8), 256 documents and 1,024 aliases.
    fn default() -> Self {
        Limits {
            max_input_bytes: MAX_REQUEST_BYTES,
            max_document_bytes: MAX_OBJECT_BYTES,
            max_total_bytes: 2 * MAX_REQUEST_BYTES,
            max_depth: 32,
            max_documents: 256,
            max_aliases: 1_024,
        }
    }
}

/// Why YAML input was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum YamlError {
    #[error("input of {len} bytes exceeds the limit of {limit} bytes")]
    InputTooLarge { len: usize, limit: usize },
    #[error("document {document} expands past {limit} bytes (each use of an alias counts in full)")]
    DocumentTooLarge { document: usize, limit: usize },
    #[error("the documents expand past {limit} bytes in all (each use of an alias counts in full)")]
    TotalTooLarge { limit: usize },
    /// Malformed YAML, or a parser limit (depth, aliases, documents) that was reached; the
    /// message names the line and column.
    #[error("invalid YAML: {message}")]
    Invalid { document: usize, message: String },
}

impl YamlError {
    /// The document (counting from 1) the error is in, as far as it is known.
    pub fn document(&self) -> usize {
        match self {
            YamlError::InputTooLarge { .. } | YamlError::TotalTooLarge { .. } => 1,
            YamlError::DocumentTooLarge { document, .. } | YamlError::Invalid { document, .. } => *document,
        }
    }
}

/// Reads every non-empty document of `source` as a JSON value, within `limits`.
pub fn documents(source: &str, limits: &Limits) -> Result<Vec<Value>, YamlError> {
    if source.len() > limits.max_input_bytes {
        return Err(YamlError::InputTooLarge { len: source.len(), limit: limits.max_input_bytes });
    }
    let mut budget = serde_saphyr::Budget::default();
    budget.max_reader_input_bytes = Some(limits.max_input_bytes);
    budget.flow_nesting_limit = limits.max_depth;
    budget.max_depth = limits.max_depth;
    budget.max_documents = limits.max_documents;
    budget.max_aliases = limits.max_aliases;
    budget.max_anchors = limits.max_aliases;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.with_snippet = false;
    // YAML 1.2 booleans only, as serde_yaml read them: `y`, `on` and `no` stay strings.
    options.strict_booleans = true;

    let meter = Meter {
        document: Cell::new(0),
        doc_left: Cell::new(0),
        total_left: Cell::new(limits.max_total_bytes),
        limits: limits.clone(),
        breach: Cell::new(None),
    };
    let read = METER.with(|slot| {
        let previous = slot.replace(Some(meter));
        let read = serde_saphyr::from_multiple_with_options::<Metered>(source, options);
        let meter = slot.replace(previous).expect("the meter installed above");
        (read, meter)
    });
    match read {
        (Ok(docs), _) => Ok(docs.into_iter().map(|d| d.0).collect()),
        (Err(e), meter) => Err(match meter.breach.take() {
            Some(breach) => breach,
            None => YamlError::Invalid { document: meter.document.get().max(1), message: e.to_string() },
        }),
    }
}

/// The budget of the read in progress on this thread. serde-saphyr deserializes each document
/// with `T::deserialize` and no seed, so [`Metered`] finds its budget here; [`documents`]
/// installs it for the duration of one read and restores what was there (reads may nest).
struct Meter {
    /// The document being read, counting from 1.
    document: Cell<usize>,
    doc_left: Cell<usize>,
    total_left: Cell<usize>,
    limits: Limits,
    /// Which limit ended the read, so the caller gets a typed error and not the parser's text.
    breach: Cell<Option<YamlError>>,
}

thread_local! {
    static METER: std::cell::RefCell<Option<Meter>> = const { std::cell::RefCell::new(None) };
}

impl Meter {
    /// Takes `bytes` from both budgets, or records which one ran out.
    fn charge(&self, bytes: usize) -> Result<(), YamlError> {
        let doc = self.doc_left.get().checked_sub(bytes);
        let total = self.total_left.get().checked_sub(bytes);
        match (doc, total) {
            (Some(doc), Some(total)) => {
                self.doc_left.set(doc);
                self.total_left.set(total);
                Ok(())
            }
            (None, _) => Err(YamlError::DocumentTooLarge {
                document: self.document.get(),
                limit: self.limits.max_document_bytes,
            }),
            (_, None) => Err(YamlError::TotalTooLarge { limit: self.limits.max_total_bytes }),
        }
    }
}

/// Charges `bytes` to the read in progress; over budget, the error that ends it.
fn charge<E: de::Error>(bytes: usize) -> Result<(), E> {
    METER.with(|slot| {
        let slot = slot.borrow();
        let Some(meter) = slot.as_ref() else { return Ok(()) };
        meter.charge(bytes).map_err(|breach| {
            let message = breach.to_string();
            meter.breach.set(Some(breach));
            E::custom(message)
        })
    })
}

/// One document, built under the meter.
struct Metered(Value);

impl<'de> Deserialize<'de> for Metered {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        METER.with(|slot| {
            if let Some(meter) = slot.borrow().as_ref() {
                meter.document.set(meter.document.get() + 1);
                meter.doc_left.set(meter.limits.max_document_bytes);
            }
        });
        ValueSeed.deserialize(d).map(Metered)
    }
}

/// Builds a `Value`, charging every node and string before allocating it.
#[derive(Clone, Copy)]
struct ValueSeed;

impl<'de> DeserializeSeed<'de> for ValueSeed {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        charge(NODE_COST)?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        charge(NODE_COST)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        charge(NODE_COST)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        match i64::try_from(v) {
            Ok(v) => self.visit_i64(v),
            Err(_) => match u64::try_from(v) {
                Ok(v) => self.visit_u64(v),
                Err(_) => Err(E::custom(format!("integer {v} is out of range"))),
            },
        }
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::custom(format!("integer {v} is out of range"))),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        charge(NODE_COST)?;
        Number::from_f64(v).map(Value::Number).ok_or_else(|| E::custom(format!("number {v} is not finite")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        charge(NODE_COST + v.len())?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        charge(NODE_COST + v.len())?;
        Ok(Value::String(v))
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Value, E> {
        Err(E::custom("binary values are not supported"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        charge(NODE_COST)?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_newtype_struct<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        charge(NODE_COST)?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        charge(NODE_COST)?;
        let mut out = Map::new();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let value = map.next_value_seed(self)?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

/// A mapping key, as text: JSON objects have string keys, and a manifest's keys are names.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = String;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_string(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a scalar mapping key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        charge(NODE_COST + v.len())?;
        Ok(v.to_owned())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        charge(NODE_COST + v.len())?;
        Ok(v)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
        self.visit_string(v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        self.visit_string(v.to_string())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        self.visit_string(v.to_string())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        self.visit_string(v.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn read(source: &str) -> Result<Vec<Value>, YamlError> {
        documents(source, &Limits::default())
    }

    #[test]
    fn documents_read_as_json_values() {
        let docs = read("a: 1\nb: [x, true, ~, 1.5]\n---\n---\nc: {d: e}\n").unwrap();
        assert_eq!(docs.len(), 2, "the empty document is skipped");
        assert_eq!(docs[0], serde_json::json!({"a": 1, "b": ["x", true, null, 1.5]}));
        assert_eq!(docs[1], serde_json::json!({"c": {"d": "e"}}));
        // Keys are text, whatever they look like.
        assert_eq!(read("1: x\ntrue: y\n").unwrap()[0], serde_json::json!({"1": "x", "true": "y"}));
        // YAML 1.2 booleans only.
        assert_eq!(read("a: on\nb: no\nc: false\n").unwrap()[0], serde_json::json!({"a": "on", "b": "no", "c": false}));
    }

    #[test]
    fn deep_flow_nesting_is_refused_at_once() {
        // 100,000 levels in 200 KB: libyaml took seconds (the square of the depth).
        let deep = format!("a: {}{}", "[".repeat(100_000), "]".repeat(100_000));
        let started = Instant::now();
        let e = read(&deep).unwrap_err();
        assert!(started.elapsed().as_millis() < 200, "took {:?}", started.elapsed());
        assert!(matches!(e, YamlError::Invalid { .. }), "{e}");
        assert!(e.to_string().contains("limit"), "{e}");
        let maps = format!("a: {}{}", "{a: ".repeat(50_000), "}".repeat(50_000));
        let started = Instant::now();
        assert!(read(&maps).is_err());
        assert!(started.elapsed().as_millis() < 200, "took {:?}", started.elapsed());
    }

    #[test]
    fn deep_block_nesting_is_refused() {
        let mut deep = String::new();
        for level in 0..600 {
            deep.push_str(&" ".repeat(level));
            deep.push_str("k:\n");
        }
        let e = read(&deep).unwrap_err();
        assert!(e.to_string().contains("limit") || e.to_string().contains("depth"), "{e}");
        // 32 levels is fine.
        let ok: String = (0..31).map(|l| format!("{}k:\n", " ".repeat(l))).collect();
        assert!(read(&ok).is_ok());
    }

    #[test]
    fn an_alias_expanding_past_the_limit_is_refused_before_it_is_built() {
        // A 512 KiB scalar used twice is 1 MiB: fine. Used four times it passes 1.5 MiB.
        let big = "x".repeat(512 * 1024);
        let twice = format!("a: &big {big}\nb: *big\n");
        assert!(read(&twice).is_ok());
        let four = format!("a: &big {big}\nb: [*big, *big, *big]\n");
        let e = read(&four).err();
        assert_eq!(e, Some(YamlError::DocumentTooLarge { document: 1, limit: MAX_OBJECT_BYTES }));
    }

    #[test]
    fn aliases_cannot_add_up_across_documents() {
        // Nine documents of 300 KiB, each expanding to 1.2 MiB: each is within its limit,
        // together (10.8 MiB) they are not.
        let big = "x".repeat(300 * 1024);
        let doc = format!("a: &big {big}\nb: [*big, *big, *big]\n");
        let docs = [doc.as_str(); 9].join("---\n");
        assert!(docs.len() < MAX_REQUEST_BYTES);
        let e = read(&docs).err().map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|e| e.contains("in all")), "{e:?}");
    }

    #[test]
    fn many_small_aliases_are_refused() {
        let aliases = vec!["*a"; 2_000].join(", ");
        let e = read(&format!("a: &a x\nb: [{aliases}]\n")).unwrap_err();
        assert!(matches!(e, YamlError::Invalid { .. }), "{e}");
    }

    #[test]
    fn oversized_input_is_refused_before_parsing() {
        let e = read(&"#".repeat(MAX_REQUEST_BYTES + 1)).unwrap_err();
        assert!(matches!(e, YamlError::InputTooLarge { .. }), "{e}");
    }

    #[test]
    fn malformed_yaml_names_its_document() {
        let e = read("a: 1\n---\nb: [unclosed\n").unwrap_err();
        assert!(matches!(e, YamlError::Invalid { .. }), "{e}");
        assert!(e.to_string().starts_with("invalid YAML"), "{e}");
    }

    #[test]
    fn reads_nest_and_restore_the_meter() {
        // A read on a thread that is already reading (a Deserialize impl that parses YAML).
        assert!(read("a: 1").is_ok());
        assert!(METER.with(|m| m.borrow().is_none()));
    }
}
