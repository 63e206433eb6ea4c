//! `-o jsonpath=TEMPLATE`, kubectl's template language over RFC 9535 JSONPath.
//!
//! A template is text with `{...}` actions, as kubectl takes it: `{.metadata.name}`,
//! `{.items[*].metadata.name}`, `{.items[?(@.spec.replicas>1)].metadata.name}`, string
//! literals `{"\n"}`, and `{range EXPR}...{end}`, which renders its body once per value of
//! EXPR with paths inside relative to that value. Paths are kubectl's (`.a.b`, `..a`,
//! `[0]`): each is read as the RFC 9535 query `$` + path, evaluated by `serde_json_path`,
//! against the current value. Values print as kubectl prints them: strings raw, anything
//! else as JSON, several values separated by a space; a path that matches nothing prints
//! nothing (kubectl's `--allow-missing-template-keys=true`).

use serde_json::Value;
use serde_json_path::JsonPath;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("jsonpath template {template:?}: unclosed {{ at byte {at}")]
    Unclosed { template: String, at: usize },
    #[error("jsonpath template {template:?}: {{end}} without {{range}}")]
    EndWithoutRange { template: String },
    #[error("jsonpath template {template:?}: {{range}} without {{end}}")]
    RangeWithoutEnd { template: String },
    #[error("jsonpath template {template:?}: {{{expr}}}: {reason}")]
    Expression { template: String, expr: String, reason: ExprError },
}

/// Why one `{...}` action is not an expression.
#[derive(Debug, thiserror::Error)]
pub enum ExprError {
    #[error(transparent)]
    Path(#[from] serde_json_path::ParseError),
    #[error("a string literal must end with its quote")]
    Unterminated,
    #[error("unknown escape \\{0}")]
    UnknownEscape(char),
    #[error("a string literal ends in \\")]
    TrailingBackslash,
}

/// A parsed template.
#[derive(Debug)]
pub struct Template {
    nodes: Vec<Node>,
}

#[derive(Debug)]
enum Node {
    Text(String),
    Path(JsonPath),
    Range(JsonPath, Vec<Node>),
}

impl Template {
    pub fn parse(template: &str) -> Result<Template, TemplateError> {
        let mut stack: Vec<(Option<JsonPath>, Vec<Node>)> = vec![(None, Vec::new())];
        for piece in pieces(template)? {
            match piece {
                Piece::Text(t) => stack.last_mut().expect("the stack keeps its root").1.push(Node::Text(t)),
                Piece::Action(a) => {
                    let a = a.trim();
                    let err = |reason: ExprError| TemplateError::Expression {
                        template: template.to_string(),
                        expr: a.to_string(),
                        reason,
                    };
                    if a == "end" {
                        if stack.len() == 1 {
                            return Err(TemplateError::EndWithoutRange { template: template.to_string() });
                        }
                        let (path, body) = stack.pop().expect("checked above");
                        let node = Node::Range(path.expect("only ranges are pushed"), body);
                        stack.last_mut().expect("the stack keeps its root").1.push(node);
                    } else if let Some(expr) = a.strip_prefix("range ") {
                        stack.push((Some(path(expr.trim()).map_err(err)?), Vec::new()));
                    } else if a.starts_with('"') || a.starts_with('\'') {
                        let text = literal(a).map_err(err)?;
                        stack.last_mut().expect("the stack keeps its root").1.push(Node::Text(text));
                    } else {
                        let p = path(a).map_err(err)?;
                        stack.last_mut().expect("the stack keeps its root").1.push(Node::Path(p));
                    }
                }
            }
        }
        if stack.len() > 1 {
            return Err(TemplateError::RangeWithoutEnd { template: template.to_string() });
        }
        let (_, nodes) = stack.pop().expect("the root");
        Ok(Template { nodes })
    }

    /// The template rendered against `value`.
    pub fn render(&self, value: &Value) -> String {
        let mut out = String::new();
        render(&self.nodes, value, &mut out);
        out
    }
}

fn render(nodes: &[Node], value: &Value, out: &mut String) {
    for n in nodes {
        match n {
            Node::Text(t) => out.push_str(t),
            Node::Path(p) => {
                let shown: Vec<String> = p.query(value).all().into_iter().map(show).collect();
                out.push_str(&shown.join(" "));
            }
            Node::Range(p, body) => {
                for v in p.query(value).all() {
                    render(body, v, out);
                }
            }
        }
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// kubectl's path (`.a.b`, `[0]`, `..a`, `@`, `$...`) as an RFC 9535 query.
fn path(expr: &str) -> Result<JsonPath, ExprError> {
    let query = match expr {
        "" | "@" | "$" => "$".to_string(),
        e if e.starts_with('$') => e.to_string(),
        e if e.starts_with('@') => format!("${}", &e[1..]),
        e if e.starts_with('.') || e.starts_with('[') => format!("${e}"),
        // kubectl takes `{metadata.name}` too.
        e => format!("$.{e}"),
    };
    Ok(JsonPath::parse(&query)?)
}

/// A quoted string action: `"\n"`, `"\t"`, `", "`.
fn literal(a: &str) -> Result<String, ExprError> {
    let quote = a.chars().next().unwrap_or('"');
    let inner = a.strip_prefix(quote).and_then(|s| s.strip_suffix(quote)).ok_or(ExprError::Unterminated)?;
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(c @ ('\\' | '"' | '\'')) => out.push(c),
            Some(c) => return Err(ExprError::UnknownEscape(c)),
            None => return Err(ExprError::TrailingBackslash),
        }
    }
    Ok(out)
}

enum Piece {
    Text(String),
    Action(String),
}

/// The template split into text and `{...}` actions; braces inside quotes do not count.
fn pieces(template: &str) -> Result<Vec<Piece>, TemplateError> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut chars = template.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        if c != '{' {
            text.push(c);
            continue;
        }
        if !text.is_empty() {
            out.push(Piece::Text(std::mem::take(&mut text)));
        }
        let mut action = String::new();
        let mut quote: Option<char> = None;
        let mut closed = false;
        while let Some((_, c)) = chars.next() {
            match (quote, c) {
                (None, '}') => {
                    closed = true;
                    break;
                }
                (None, '"' | '\'') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                (Some(_), '\\') => {
                    action.push(c);
                    if let Some((_, next)) = chars.next() {
                        action.push(next);
                    }
                    continue;
                }
                _ => {}
            }
            action.push(c);
        }
        if !closed {
            return Err(TemplateError::Unclosed { template: template.to_string(), at });
        }
        out.push(Piece::Action(action));
    }
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "List",
            "items": [
                {"kind": "Workload", "metadata": {"name": "web", "labels": {"app": "shop"}}, "spec": {"replicas": 2}},
                {"kind": "Workload", "metadata": {"name": "api"}, "spec": {"replicas": 1}},
            ]
        })
    }

    fn render(t: &str, v: &Value) -> String {
        Template::parse(t).unwrap().render(v)
    }

    #[test]
    fn kubectl_paths_print_as_kubectl_prints_them() {
        let v = list();
        assert_eq!(render("{.items[*].metadata.name}", &v), "web api");
        assert_eq!(render("{.items[0].spec.replicas}", &v), "2");
        assert_eq!(render("{.items[0].metadata.labels}", &v), r#"{"app":"shop"}"#);
        assert_eq!(render("kind={.kind}!", &v), "kind=List!");
        assert_eq!(render("{.items[?(@.spec.replicas>1)].metadata.name}", &v), "web");
        assert_eq!(render("{..name}", &v), "web api");
        assert_eq!(render("{.items[*].nothing}", &v), "", "a missing key prints nothing");
        assert_eq!(render("{kind}", &v), "List");
    }

    #[test]
    fn range_renders_its_body_per_value_with_paths_relative_to_it() {
        let v = list();
        let t = r#"{range .items[*]}{.metadata.name}{"\t"}{.spec.replicas}{"\n"}{end}"#;
        assert_eq!(render(t, &v), "web\t2\napi\t1\n");
        assert_eq!(render("{range .items[*]}[{@.metadata.name}]{end}", &v), "[web][api]");
        assert_eq!(render(r#"{"a}b"}"#, &v), "a}b", "braces inside quotes");
    }

    #[test]
    fn bad_templates_are_errors_that_say_what_is_wrong() {
        let e = |t: &str| Template::parse(t).unwrap_err();
        assert!(matches!(e("{.items"), TemplateError::Unclosed { at: 0, .. }));
        assert!(matches!(e("{end}"), TemplateError::EndWithoutRange { .. }));
        assert!(matches!(e("{range .items[*]}{.x}"), TemplateError::RangeWithoutEnd { .. }));
        let bad = e("{.items[}");
        assert!(matches!(&bad, TemplateError::Expression { expr, .. } if expr == ".items["), "{bad}");
        assert!(bad.to_string().starts_with("jsonpath template \"{.items[}\": {.items[}: "), "{bad}");
        assert!(matches!(e(r#"{"\q"}"#), TemplateError::Expression { .. }));
    }
}
