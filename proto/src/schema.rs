//! The manifest schema: a JSON Schema (draft 7) of every kind `flotilla apply` takes, derived
//! with `schemars` from the very types that parse them (serde's renames, defaults and enum
//! shapes included), so the schema cannot drift from the parser. The types' doc comments are
//! the descriptions users read.
//!
//! [`json_schema`] is the document editors load (`docs/flotilla.schema.json`); [`kinds`] is
//! the same schema as a tree of fields (name, type, default, description) that `flotilla
//! explain` prints and [`reference_markdown`] turns into `docs/manifest-reference.md`.
//!
//! The schema describes shape; the semantic checks of `Manifest::validate` and friends (a
//! probe has exactly one handler, a port name is unique, ...) stay there and are stated in the
//! descriptions instead. Pure functions; nothing here parses a manifest.

use std::borrow::Cow;
use std::collections::BTreeMap;

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde_json::{Map, Value, json};

use crate::manifest::Manifest;
use crate::objects::ObjectManifest;
use crate::route::RouteManifest;
use crate::service::ServiceManifest;

/// A duration as `parse_duration_ms` reads it (a string: YAML numbers are refused).
pub struct Duration;

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A duration: numbers with a unit each (ms, s, m, h or d), added up, more than zero, such as `500ms`, `10s`, `1m30s` or `1.5h`.",
            "pattern": r"^\s*((\d+(\.\d{0,9})?|\.\d{1,9})(ms|s|m|h|d))+\s*$",
            "examples": ["500ms", "10s", "1m30s"],
        })
    }
}

/// A byte quantity as `parse_quantity` reads it.
pub struct Quantity;

impl JsonSchema for Quantity {
    fn schema_name() -> Cow<'static, str> {
        "Quantity".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "Bytes, as Kubernetes writes them: a number with a binary (Ki, Mi, Gi, Ti, Pi, Ei) or decimal (k, M, G, T, P, E) suffix or an exponent, such as `64Mi` or `1.5Gi`; quote one YAML would read as a number (`\"1048576\"`, `\"128e6\"`).",
            "pattern": r"^\s*(\d+(\.\d{0,9})?|\.\d{1,9})([KMGTPE]i|[kMGTPE]|[eE]\+?\d+)?\s*$",
            "examples": ["64Mi", "1.5Gi", "128e6"],
        })
    }
}

/// CPU as `parse_cpu_millis` reads it.
pub struct Cpu;

impl JsonSchema for Cpu {
    fn schema_name() -> Cow<'static, str> {
        "Cpu".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "CPU: millicores (`250m`) or cores with at most three decimals (`\"0.5\"`, `\"2\"`; quoted, since YAML would read them as numbers), more than zero and at most 1000 cores.",
            "pattern": r"^\s*(\d+m|\d+(\.\d{0,3})?)\s*$",
            "examples": ["250m", "0.5", "2"],
        })
    }
}

/// Permission bits as `KeyToPath::mode` reads them.
pub struct FileMode;

impl JsonSchema for FileMode {
    fn schema_name() -> Cow<'static, str> {
        "FileMode".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "Permission bits in octal, as text (`\"0400\"`, `\"0o640\"`), at most 0777.",
            "pattern": "^(0o)?0*[0-7]{1,3}$",
            "examples": ["0400", "0444"],
        })
    }
}

/// The JSON Schema of one manifest document: one of the kinds, told apart by `kind`.
pub fn json_schema() -> Value {
    let mut generator = SchemaSettings::draft07().into_generator();
    let kinds: Vec<Value> = vec![
        generator.subschema_for::<Manifest>().into(),
        generator.subschema_for::<ServiceManifest>().into(),
        generator.subschema_for::<RouteManifest>().into(),
        generator.subschema_for::<ObjectManifest>().into(),
    ];
    let definitions = generator.take_definitions(true);
    let mut schema = json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Flotilla manifest",
        "description": "One document of a file `flotilla apply -f` takes: a Workload, a Service, a Route, a Config or a Secret (several documents are separated by `---`).",
        "oneOf": kinds,
        "definitions": definitions,
    });
    tidy_descriptions(&mut schema);
    schema
}

/// Doc comments come with their line breaks: each paragraph becomes one line, paragraphs
/// stay apart, so editors and the reference table show them as written.
fn tidy_descriptions(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                match v {
                    Value::String(text) if k == "description" => *text = paragraphs(text).join("\n\n"),
                    _ => tidy_descriptions(v),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(tidy_descriptions),
        _ => {}
    }
}

fn paragraphs(text: &str) -> Vec<String> {
    text.split("\n\n").map(|p| p.split_whitespace().collect::<Vec<_>>().join(" ")).filter(|p| !p.is_empty()).collect()
}

// ---------------------------------------------------------------------------------------------
// The schema as a tree of fields

/// A kind or one of its fields, as `explain` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    /// The key as written in YAML (`readinessProbe`); for a kind, its name (`Workload`).
    pub name: String,
    /// `string`, `integer`, `boolean`, `object`, `[]object`, `map[string]string`, a named
    /// string (`duration`, `quantity`, `cpu`, `fileMode`), or alternatives (`string or object`).
    pub ty: String,
    pub required: bool,
    /// Paragraphs: the field's own description, then its type's.
    pub description: Vec<String>,
    /// For a named string (`duration`), what it takes.
    pub format: Option<String>,
    pub default: Option<Value>,
    /// The values of an enumeration, each with its description when it has one.
    pub values: Vec<(String, Option<String>)>,
    /// For an object its fields, for a list its items' fields, for a map its values' fields;
    /// sorted by name.
    pub fields: Vec<Field>,
}

impl Field {
    /// The first sentence of the description, for a one-line listing.
    pub fn summary(&self) -> String {
        let Some(first) = self.description.first() else { return String::new() };
        let bytes = first.as_bytes();
        for (i, _) in first.match_indices(". ") {
            if bytes.get(i + 2).is_some_and(u8::is_ascii_uppercase) {
                return first[..=i].to_string();
            }
        }
        first.clone()
    }

    fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }
}

/// Why `explain` found nothing at a path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    #[error("unknown kind {kind:?}; the kinds are {}", valid.join(", "))]
    UnknownKind { kind: String, valid: Vec<String> },
    #[error(
        "{at} has no field {field:?}{}; its fields are {}",
        suggestion.as_ref().map(|s| format!(" (did you mean {s:?}?)")).unwrap_or_default(),
        valid.join(", ")
    )]
    UnknownField { at: String, field: String, suggestion: Option<String>, valid: Vec<String> },
    #[error("{at} is a {ty} and has no fields")]
    NoFields { at: String, ty: String },
}

/// Each manifest kind as a tree: Workload, Service, Route, Config, Secret.
pub fn kinds() -> Vec<Field> {
    let schema = json_schema();
    let tree = Tree { definitions: schema["definitions"].as_object().cloned().unwrap_or_default() };
    let mut out = Vec::new();
    for kind in schema["oneOf"].as_array().into_iter().flatten() {
        let root = tree.field(String::new(), kind, false, 0);
        // A shape shared by several kinds (Config and Secret) becomes one tree per kind.
        let names: Vec<String> =
            root.field("kind").map(|k| k.values.iter().map(|v| v.0.clone()).collect()).unwrap_or_default();
        let shared = names.len() > 1;
        for name in names {
            let mut root = root.clone();
            root.name = name.clone();
            root.required = true;
            if let Some(k) = root.fields.iter_mut().find(|f| f.name == "kind") {
                k.values.retain(|v| v.0 == name);
                // What sets this kind apart comes first.
                if let Some((_, Some(first))) = k.values.first().filter(|_| shared) {
                    root.description.insert(0, first.clone());
                }
            }
            out.push(root);
        }
    }
    out
}

/// The kind and the field that `path` (`workload.spec.readinessProbe`) names, with the path
/// of fields that leads there. The kind matches in any case and in the plural; fields match
/// exactly. A list's or a map's elements need no step of their own (`spec.ports.name`), and a
/// trailing `[]` is ignored.
pub fn find<'a>(kinds: &'a [Field], path: &str) -> Result<(&'a Field, Vec<&'a Field>), ExplainError> {
    let mut steps = path.split('.').map(|s| s.trim_end_matches("[]"));
    let wanted = steps.next().unwrap_or_default();
    let lower = wanted.to_ascii_lowercase();
    let kind = kinds
        .iter()
        .find(|k| {
            let name = k.name.to_ascii_lowercase();
            lower == name || lower.strip_suffix('s') == Some(name.as_str())
        })
        .ok_or_else(|| ExplainError::UnknownKind {
            kind: wanted.to_string(),
            valid: kinds.iter().map(|k| k.name.to_ascii_lowercase()).collect(),
        })?;
    let mut trail: Vec<&Field> = Vec::new();
    let mut at = kind;
    let mut at_path = kind.name.to_ascii_lowercase();
    for step in steps {
        if at.fields.is_empty() {
            return Err(ExplainError::NoFields { at: at_path, ty: at.ty.clone() });
        }
        let next = at.field(step).ok_or_else(|| {
            let valid: Vec<String> = at.fields.iter().map(|f| f.name.clone()).collect();
            ExplainError::UnknownField {
                at: at_path.clone(),
                field: step.to_string(),
                suggestion: closest(step, &valid),
                valid,
            }
        })?;
        at_path = format!("{at_path}.{step}");
        trail.push(next);
        at = next;
    }
    Ok((kind, trail))
}

/// The valid name a misspelt `name` most likely meant: one it starts with or that starts
/// with it (`periodSeconds` for `period`), else one within a third of its length in edits.
fn closest(name: &str, valid: &[String]) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    if let Some(v) = valid.iter().filter(|v| v.len() >= 3).find(|v| {
        let v = v.to_ascii_lowercase();
        lower.starts_with(&v) || (v.starts_with(&lower) && lower.len() >= 3)
    }) {
        return Some(v.clone());
    }
    valid
        .iter()
        .map(|v| (edit_distance(&lower, &v.to_ascii_lowercase()), v))
        .filter(|(d, _)| *d <= (name.len() / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, v)| v.clone())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1).min(row[j] + 1).min(prev + usize::from(ca != *cb));
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// Nesting deeper than this is cut off (the manifest types are not recursive; this only
/// bounds a mistake).
const MAX_DEPTH: usize = 16;

struct Tree {
    definitions: Map<String, Value>,
}

impl Tree {
    /// The schemas `s` stands for, outermost first: through `$ref`, a lone `allOf` and an
    /// optional value's `anyOf [T, null]`, down to the one that says what the value is.
    fn chain<'a>(&'a self, mut s: &'a Value) -> Vec<(&'a Value, Option<&'a str>)> {
        let mut out = Vec::new();
        let mut name = None;
        for _ in 0..MAX_DEPTH {
            out.push((s, name));
            if let Some(r) = s.get("$ref").and_then(Value::as_str) {
                let def = r.rsplit('/').next().unwrap_or(r);
                match self.definitions.get(def) {
                    Some(d) => (s, name) = (d, Some(def)),
                    None => break,
                }
            } else if let Some([one]) = s.get("allOf").and_then(Value::as_array).map(Vec::as_slice) {
                s = one;
            } else if let [one] = non_null(alternatives(s)).as_slice()
                && s.get("properties").is_none()
            {
                s = one;
            } else {
                break;
            }
        }
        out
    }

    fn field(&self, name: String, s: &Value, required: bool, depth: usize) -> Field {
        let chain = self.chain(s);
        let (core, def_name) = *chain.last().expect("a chain starts with its schema");
        let ty = self.type_of(core, def_name, depth);
        // A named string's description is its format, the same wherever it is used.
        let format = match def_name {
            Some(def) if ty == lower_first(def) => core.get("description").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        let mut description: Vec<String> = Vec::new();
        for (s, _) in &chain[..chain.len() - usize::from(format.is_some())] {
            if let Some(d) = s.get("description").and_then(Value::as_str) {
                for p in paragraphs(d) {
                    if !description.contains(&p) {
                        description.push(p);
                    }
                }
            }
        }
        let default = chain.iter().find_map(|(s, _)| s.get("default")).cloned();
        let mut field =
            Field { name, ty, required, description, format, default, values: self.values(core), fields: Vec::new() };
        if depth < MAX_DEPTH {
            field.fields = self.fields_of(core, depth + 1);
        }
        field
    }

    /// The values of an enumeration: `enum`, `const`, or alternatives that are all constants.
    fn values(&self, s: &Value) -> Vec<(String, Option<String>)> {
        let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
        let describe = |s: &Value| s.get("description").and_then(Value::as_str).map(str::to_string);
        if let Some(values) = s.get("enum").and_then(Value::as_array) {
            return values.iter().map(|v| (text(v), None)).collect();
        }
        if let Some(c) = s.get("const") {
            return vec![(text(c), None)];
        }
        non_null(alternatives(s))
            .into_iter()
            .flat_map(|alt| {
                let (core, _) = *self.chain(alt).last().expect("a chain starts with its schema");
                let mut values = self.values(core);
                if let [(_, d @ None)] = values.as_mut_slice() {
                    *d = describe(alt).or_else(|| describe(core));
                }
                values
            })
            .collect()
    }

    fn type_of(&self, s: &Value, def_name: Option<&str>, depth: usize) -> String {
        let alts = non_null(alternatives(s));
        if !alts.is_empty() {
            let mut names: Vec<String> = Vec::new();
            for alt in alts {
                let (core, def) = *self.chain(alt).last().expect("a chain starts with its schema");
                let t = self.type_of(core, def, depth + 1);
                if !names.contains(&t) {
                    names.push(t);
                }
            }
            return names.join(" or ");
        }
        if let Some(c) = s.get("const").or_else(|| s.get("enum").and_then(|e| e.get(0))) {
            return json_type(c).to_string();
        }
        let ty = match s.get("type") {
            Some(Value::String(t)) => t.as_str(),
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).find(|t| *t != "null").unwrap_or("null"),
            _ => return "any".into(),
        };
        match ty {
            "array" if depth < MAX_DEPTH => {
                let items = s.get("items").unwrap_or(&Value::Null);
                let (core, def) = *self.chain(items).last().expect("a chain starts with its schema");
                format!("[]{}", group(self.type_of(core, def, depth + 1)))
            }
            "object" if s.get("properties").is_none() && depth < MAX_DEPTH => match s.get("additionalProperties") {
                Some(v @ Value::Object(_)) => {
                    let (core, def) = *self.chain(v).last().expect("a chain starts with its schema");
                    format!("map[string]{}", group(self.type_of(core, def, depth + 1)))
                }
                _ => "object".into(),
            },
            // A named string (`Duration`) says more than `string`.
            "string" | "integer" if def_name.is_some() => lower_first(def_name.unwrap_or_default()),
            other => other.to_string(),
        }
    }

    /// The fields under `s`: its properties, its items' or its values', or those of the
    /// object among its alternatives (`{cni: NAME}` beside `none`).
    fn fields_of(&self, s: &Value, depth: usize) -> Vec<Field> {
        if let Some(props) = s.get("properties").and_then(Value::as_object) {
            let required: Vec<&str> =
                s.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
            return props
                .iter()
                .map(|(name, p)| self.field(name.clone(), p, required.contains(&name.as_str()), depth))
                .collect();
        }
        let inner = s.get("items").or_else(|| s.get("additionalProperties").filter(|v| v.is_object()));
        if let Some(inner) = inner {
            let (core, _) = *self.chain(inner).last().expect("a chain starts with its schema");
            return self.fields_of(core, depth);
        }
        let mut out: BTreeMap<String, Field> = BTreeMap::new();
        for alt in non_null(alternatives(s)) {
            let chain = self.chain(alt);
            let (core, _) = *chain.last().expect("a chain starts with its schema");
            let mut fields = self.fields_of(core, depth);
            // A one-key object (`{after: 30s}`) is described by its alternative.
            if let [only] = fields.as_mut_slice()
                && only.description.is_empty()
            {
                only.description = chain
                    .iter()
                    .filter_map(|(s, _)| s.get("description").and_then(Value::as_str))
                    .flat_map(paragraphs)
                    .collect();
            }
            for f in fields {
                out.entry(f.name.clone()).or_insert(f);
            }
        }
        out.into_values().collect()
    }
}

fn alternatives(s: &Value) -> Vec<&Value> {
    s.get("oneOf").or_else(|| s.get("anyOf")).and_then(Value::as_array).map(|a| a.iter().collect()).unwrap_or_default()
}

fn non_null(alts: Vec<&Value>) -> Vec<&Value> {
    alts.into_iter().filter(|a| a.get("type").and_then(Value::as_str) != Some("null")).collect()
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "string",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::Bool(_) => "boolean",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
        Value::Null => "null",
    }
}

/// Alternatives inside a list or map type: `map[string](string or object)`.
fn group(ty: String) -> String {
    if ty.contains(" or ") { format!("({ty})") } else { ty }
}

fn lower_first(s: &str) -> String {
    let mut chars = s.chars();
    chars.next().map(|c| c.to_ascii_lowercase().to_string() + chars.as_str()).unwrap_or_default()
}

/// A default as YAML would write it.
pub fn show_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// The reference

/// `docs/manifest-reference.md`: every kind, every field with its path, type, default and
/// description.
pub fn reference_markdown() -> String {
    let kinds = kinds();
    let mut out = String::from(
        "<!-- Generated from the manifest schema (proto/src/schema.rs) by `FLOTILLA_UPDATE_DOCS=1 cargo test -p flotilla-proto generated_docs`; do not edit. -->\n\n\
         # Manifest reference\n\n\
         Every field of every kind `flotilla apply` takes, from the schema the parser is built from. \
         `flotilla explain KIND.FIELD` shows the same on the command line (`flotilla explain workload.spec.readinessProbe`), \
         and [`flotilla.schema.json`](flotilla.schema.json) is the JSON Schema editors can check manifests against.\n\n\
         Paths name a list's items with `[]` and a map's values with `<key>`. Durations are strings such as `500ms`, `10s` or `1m30s`; \
         quantities such as `64Mi` or `1.5Gi`.\n",
    );
    out.push_str("\nKinds: ");
    out.push_str(
        &kinds.iter().map(|k| format!("[{}](#{})", k.name, k.name.to_ascii_lowercase())).collect::<Vec<_>>().join(", "),
    );
    out.push('\n');
    let mut formats = BTreeMap::new();
    kinds.iter().for_each(|k| collect_formats(k, &mut formats));
    out.push_str("\n## Value formats\n\n");
    for (ty, text) in &formats {
        out.push_str(&format!("- <a id=\"{}\"></a>`{ty}`: {text}\n", ty.to_ascii_lowercase()));
    }
    for kind in &kinds {
        out.push_str(&format!("\n## {}\n\n{}\n\n", kind.name, kind.description.join(" ")));
        out.push_str("| Field | Type | Default | Description |\n| --- | --- | --- | --- |\n");
        rows(&mut out, "", &kind.fields);
    }
    out
}

fn collect_formats(f: &Field, out: &mut BTreeMap<String, String>) {
    if let Some(text) = &f.format {
        out.insert(f.ty.clone(), text.clone());
    }
    f.fields.iter().for_each(|c| collect_formats(c, out));
}

fn rows(out: &mut String, prefix: &str, fields: &[Field]) {
    for f in fields {
        let path = format!("{prefix}{}", f.name);
        let ty = if f.format.is_some() { format!("[{}](#{})", f.ty, f.ty.to_ascii_lowercase()) } else { f.ty.clone() };
        let ty = if f.required { format!("{ty}, required") } else { ty };
        let default = f.default.as_ref().map(|d| format!("`{}`", show_value(d))).unwrap_or_default();
        let mut text = f.description.join(" ");
        // One value is a constant its description already names.
        if f.values.len() > 1 {
            let values: Vec<String> = f
                .values
                .iter()
                .map(|(v, d)| match d {
                    Some(d) => format!("`{v}`: {}", d.trim_end_matches('.')),
                    None => format!("`{v}`"),
                })
                .collect();
            let sep = if f.values.iter().any(|v| v.1.is_some()) { "; " } else { ", " };
            text = format!("{text} Values: {}.", values.join(sep)).trim().to_string();
        }
        out.push_str(&format!("| `{path}` | {} | {default} | {} |\n", cell(&ty), cell(&text)));
        let child = if f.ty.starts_with("[]") {
            format!("{path}[].")
        } else if f.ty.starts_with("map[") {
            format!("{path}.<key>.")
        } else {
            format!("{path}.")
        };
        rows(out, &child, &f.fields);
    }
}

/// Text safe in a table cell (GitHub's tables split on every `|`, even in code).
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind<'a>(kinds: &'a [Field], name: &str) -> &'a Field {
        kinds.iter().find(|k| k.name == name).unwrap()
    }

    fn at<'a>(kinds: &'a [Field], path: &str) -> &'a Field {
        let (k, trail) = find(kinds, path).unwrap();
        trail.last().copied().unwrap_or(k)
    }

    #[test]
    fn every_kind_apply_takes_is_in_the_schema_told_apart_by_kind() {
        let kinds = kinds();
        let names: Vec<&str> = kinds.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["Workload", "Service", "Route", "Config", "Secret"]);
        for k in &kinds {
            let kind = k.field("kind").unwrap();
            assert_eq!(kind.values.iter().map(|v| v.0.as_str()).collect::<Vec<_>>(), [k.name.as_str()]);
            assert!(kind.required && k.field("apiVersion").unwrap().required, "{}", k.name);
            assert_eq!(k.field("apiVersion").unwrap().values[0].0, crate::manifest::API_VERSION);
        }
        let schema = json_schema();
        assert_eq!(schema["oneOf"].as_array().unwrap().len(), 4);
        assert_eq!(schema["$schema"], "http://json-schema.org/draft-07/schema#");
    }

    /// The schema's descriptions are the reference users read: every field has one, written
    /// for users (no rustdoc links).
    #[test]
    fn every_field_has_a_description() {
        fn walk(path: &str, f: &Field, missing: &mut Vec<String>) {
            let path = format!("{path}.{}", f.name);
            if f.description.is_empty() || f.description.iter().any(|d| d.contains("[`")) {
                missing.push(path.clone());
            }
            f.fields.iter().for_each(|c| walk(&path, c, missing));
        }
        let mut missing = Vec::new();
        for k in kinds() {
            walk("", &k, &mut missing);
        }
        assert!(missing.is_empty(), "fields without a description for users:\n{}", missing.join("\n"));
    }

    #[test]
    fn fields_follow_the_parser_renames_defaults_and_custom_shapes() {
        let kinds = kinds();
        let probe = at(&kinds, "workload.spec.readinessProbe");
        assert_eq!(probe.ty, "object");
        let names: Vec<&str> = probe.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "exec",
                "failureThreshold",
                "httpGet",
                "initialDelay",
                "period",
                "successThreshold",
                "tcpSocket",
                "timeout"
            ]
        );
        let period = at(&kinds, "workload.spec.readinessProbe.period");
        assert_eq!((period.ty.as_str(), period.default.clone()), ("duration", Some(json!("10s"))));
        assert!(period.format.as_ref().unwrap().contains("1m30s"), "{period:?}");
        assert!(period.description[0].contains("periodSeconds"), "{:?}", period.description);
        assert_eq!(at(&kinds, "workload.spec.readinessProbe.httpGet.path").default, Some(json!("/")));
        assert_eq!(at(&kinds, "workload.spec.restartPolicy").default, Some(json!("Always")));
        assert_eq!(at(&kinds, "workload.spec.resources.memory").ty, "quantity");
        assert_eq!(at(&kinds, "workload.spec.ports").ty, "[]object");
        assert_eq!(at(&kinds, "workload.spec.nodeSelector").ty, "map[string]string");
        assert!(at(&kinds, "workload.metadata.name").required);
        assert!(!at(&kinds, "workload.spec.replicas").required);
        // Hand-written shapes: a text or a reference; `never` or `{after: DURATION}`.
        let env = at(&kinds, "workload.spec.env");
        assert_eq!(env.ty, "map[string](string or object)");
        assert_eq!(at(&kinds, "workload.spec.env.valueFrom.key").ty, "string");
        let failover = at(&kinds, "workload.spec.failover");
        assert_eq!((failover.ty.as_str(), failover.values[0].0.as_str()), ("string or object", "never"));
        assert_eq!(at(&kinds, "workload.spec.failover.after").ty, "duration");
        // serde's enum shapes: unit variants are words, `Cni(String)` is `{cni: NAME}`.
        let network = at(&kinds, "workload.spec.network");
        let words: Vec<&str> = network.values.iter().map(|v| v.0.as_str()).collect();
        assert_eq!(words, ["none", "host", "bridge"]);
        assert_eq!(network.fields.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["cni"]);
        assert!(!network.fields[0].description.is_empty());
        assert_eq!(at(&kinds, "service.spec.ports.targetPort").ty, "integer or string");
        assert_eq!(at(&kinds, "service.spec.scope").default, Some(json!("site")));
        assert_eq!(at(&kinds, "secret.binaryData").ty, "map[string]string");
    }

    #[test]
    fn an_unknown_kind_or_field_names_the_valid_ones() {
        let kinds = kinds();
        let e = find(&kinds, "deployment").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown kind \"deployment\"; the kinds are workload, service, route, config, secret"
        );
        assert_eq!(find(&kinds, "Workloads").unwrap().0.name, "Workload");
        let e = find(&kinds, "workload.spec.readinessProbe.periodSeconds").unwrap_err();
        let ExplainError::UnknownField { at: parent, suggestion, valid, .. } = &e else { panic!("{e}") };
        assert_eq!((parent.as_str(), suggestion.as_deref()), ("workload.spec.readinessProbe", Some("period")));
        assert!(valid.contains(&"timeout".to_string()));
        assert!(e.to_string().contains("did you mean \"period\"?"), "{e}");
        let e = find(&kinds, "workload.spec.replicaz").unwrap_err();
        assert!(e.to_string().contains("did you mean \"replicas\"?"), "{e}");
        let e = find(&kinds, "workload.spec.image.tag").unwrap_err();
        assert_eq!(e, ExplainError::NoFields { at: "workload.spec.image".into(), ty: "string".into() });
        assert_eq!(at(&kinds, "workload.spec.volumes[].items.mode").ty, "fileMode");
    }

    #[test]
    fn summaries_stop_at_the_first_sentence() {
        let f = |d: &str| Field {
            name: "x".into(),
            ty: "string".into(),
            required: false,
            description: vec![d.into()],
            format: None,
            default: None,
            values: vec![],
            fields: vec![],
        };
        assert_eq!(f("One (e.g. `x`). Two.").summary(), "One (e.g. `x`).");
        assert_eq!(f("Only one.").summary(), "Only one.");
        assert_eq!(kind(&kinds(), "Workload").field("spec").unwrap().summary(), "What the workload runs and where.");
    }

    /// The committed files are what the code generates; `FLOTILLA_UPDATE_DOCS=1` rewrites them.
    #[test]
    fn generated_docs_are_up_to_date() {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
        let schema = serde_json::to_string_pretty(&json_schema()).unwrap() + "\n";
        for (file, generated) in [("flotilla.schema.json", schema), ("manifest-reference.md", reference_markdown())] {
            let path = docs.join(file);
            if std::env::var_os("FLOTILLA_UPDATE_DOCS").is_some() {
                std::fs::write(&path, &generated).unwrap();
                continue;
            }
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == generated,
                "docs/{file} differs from what the manifest types generate; regenerate it with\n  \
                 FLOTILLA_UPDATE_DOCS=1 cargo test -p flotilla-proto generated_docs"
            );
        }
    }
}
