//! `flotilla explain`: a manifest kind or field described from the manifest schema
//! (`proto::schema`), as `kubectl explain` does, and `--json-schema`, the schema itself.
//! Client-only: it reads no config and talks to no hub. Rendering is a pure function of the
//! schema's tree, tested below.

use std::fmt::Write as _;
use std::process::ExitCode;

use proto::schema::{ExplainError, Field, show_value};

/// Text width descriptions are wrapped to.
const WIDTH: usize = 80;

/// Runs the verb: the text on stdout, or an error on stderr and exit code 1.
pub fn main(path: Option<&str>, recursive: bool, json_schema: bool) -> ExitCode {
    let text = if json_schema {
        let schema = proto::schema::json_schema();
        serde_json::to_string_pretty(&schema).expect("a JSON value serializes") + "\n"
    } else {
        match render(&proto::schema::kinds(), path, recursive) {
            Ok(text) => text,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    use std::io::Write as _;
    match std::io::stdout().write_all(text.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: writing to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The kinds (no path), or the kind or field `path` names with its fields: one level, or
/// with `recursive` every level below as an indented tree.
pub fn render(kinds: &[Field], path: Option<&str>, recursive: bool) -> Result<String, ExplainError> {
    let mut out = String::new();
    let Some(path) = path else {
        out.push_str("Manifest kinds (flotilla explain KIND[.FIELD]...):\n\n");
        let width = kinds.iter().map(|k| k.name.len()).max().unwrap_or(0);
        for k in kinds {
            wrap_hanging(&mut out, &format!("{:width$}  ", k.name.to_ascii_lowercase()), &k.summary(), 2);
        }
        return Ok(out);
    };
    let (kind, trail) = proto::schema::find(kinds, path)?;
    let field = trail.last().copied().unwrap_or(kind);
    let _ = writeln!(out, "KIND:     {}", kind.name);
    let _ = writeln!(out, "VERSION:  {}", proto::manifest::API_VERSION);
    if !trail.is_empty() {
        let dotted: Vec<&str> = trail.iter().map(|f| f.name.as_str()).collect();
        let required = if field.required { " -required-" } else { "" };
        let _ = writeln!(out, "\nFIELD:    {} <{}>{required}", dotted.join("."), field.ty);
    }
    if let Some(default) = &field.default {
        let _ = writeln!(out, "DEFAULT:  {}", show_value(default));
    }
    out.push_str("\nDESCRIPTION:\n");
    for (i, p) in field.description.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        wrap(&mut out, p, 4);
    }
    if let Some(format) = &field.format {
        out.push_str("\nFORMAT:\n");
        wrap(&mut out, format, 4);
    }
    if !field.values.is_empty() {
        out.push_str("\nVALUES:\n");
        let width = field.values.iter().map(|v| v.0.len()).max().unwrap_or(0);
        for (value, description) in &field.values {
            match description {
                Some(d) => wrap_hanging(&mut out, &format!("{value:width$}  "), d, 4),
                None => {
                    let _ = writeln!(out, "    {value}");
                }
            }
        }
    }
    if !field.fields.is_empty() {
        out.push_str("\nFIELDS:\n");
        if recursive {
            tree(&mut out, &field.fields, 1);
        } else {
            for (i, f) in field.fields.iter().enumerate() {
                if i > 0 {
                    out.push('\n');
                }
                let _ = writeln!(out, "  {} {}", f.name, type_tag(f));
                wrap(&mut out, &f.summary(), 4);
            }
        }
    }
    Ok(out)
}

/// `<type>`, then `-required-` or the default.
fn type_tag(f: &Field) -> String {
    let mut tag = format!("<{}>", f.ty);
    if f.required {
        tag.push_str(" -required-");
    } else if let Some(d) = &f.default {
        let _ = write!(tag, " (default {})", show_value(d));
    }
    tag
}

fn tree(out: &mut String, fields: &[Field], depth: usize) {
    for f in fields {
        let _ = writeln!(out, "{}{} {}", "  ".repeat(depth), f.name, type_tag(f));
        tree(out, &f.fields, depth + 1);
    }
}

/// `text` as lines of at most [`WIDTH`] columns (a longer word stands alone), each indented.
fn wrap(out: &mut String, text: &str, indent: usize) {
    wrap_hanging(out, "", text, indent);
}

/// [`wrap`] with `head` before the first line and the lines after it aligned under the text.
fn wrap_hanging(out: &mut String, head: &str, text: &str, indent: usize) {
    let indent = indent + head.len();
    let mut line = String::new();
    let mut first = true;
    let mut flush = |line: &str| {
        let lead = if first { format!("{}{head}", " ".repeat(indent - head.len())) } else { " ".repeat(indent) };
        let _ = writeln!(out, "{lead}{line}");
        first = false;
    };
    for word in text.split_whitespace() {
        if !line.is_empty() && indent + line.len() + 1 + word.len() > WIDTH {
            flush(&line);
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        flush(&line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explain(path: Option<&str>, recursive: bool) -> Result<String, ExplainError> {
        render(&proto::schema::kinds(), path, recursive)
    }

    #[test]
    fn a_field_shows_its_description_type_default_and_fields() {
        let text = explain(Some("workload.spec.readinessProbe"), false).unwrap();
        assert!(text.starts_with("KIND:     Workload\nVERSION:  flotilla.dev/v1\n"), "{text}");
        assert!(text.contains("FIELD:    spec.readinessProbe <object>\n"), "{text}");
        assert!(text.contains("DESCRIPTION:\n    Whether the replica should get work; reported to the hub and gating\n    rollouts.\n\n    A health check"), "{text}");
        // Each field with its type and the first sentence of its description.
        assert!(text.contains("\n  period <duration> (default 10s)\n    Time between checks"), "{text}");
        assert!(text.contains("\n  httpGet <object>\n    Check with an HTTP GET"), "{text}");
        // One level only.
        assert!(!text.contains("  path <string>"), "{text}");

        let text = explain(Some("workload.spec.readinessProbe.period"), false).unwrap();
        assert!(text.contains("DEFAULT:  10s\n"), "{text}");
        // Kubernetes' name for it is mentioned, and the format explained.
        assert!(text.contains("`periodSeconds`"), "{text}");
        assert!(text.contains("FORMAT:\n    A duration:"), "{text}");
        assert!(text.lines().all(|l| l.len() <= WIDTH || !l.contains(' ')), "{text}");

        let text = explain(Some("workload.spec.restartPolicy"), false).unwrap();
        assert!(text.contains("VALUES:\n    Always     Whenever it ends.\n"), "{text}");
        let text = explain(Some("workload.spec.network"), false).unwrap();
        assert!(
            text.contains(
                "    bridge  The node's container network: a bridge, an address from the node's\n            subnet,"
            ),
            "{text}"
        );
        let text = explain(Some("service.spec.selector"), false).unwrap();
        assert!(text.contains("FIELD:    spec.selector <map[string]string> -required-\n"), "{text}");
    }

    #[test]
    fn a_kind_lists_its_top_fields_and_recursive_the_whole_tree() {
        let text = explain(Some("service"), false).unwrap();
        assert!(text.starts_with("KIND:     Service\n"), "{text}");
        assert!(text.contains("`kind: Service`: one name and one virtual address"), "{text}");
        assert!(text.contains("\n  spec <object> -required-\n"), "{text}");
        assert!(!text.contains("targetPort"), "{text}");

        let text = explain(Some("service"), true).unwrap();
        assert!(text.contains("\n  spec <object> -required-\n    ports <[]object> -required-\n"), "{text}");
        assert!(text.contains("\n      targetPort <integer or string>\n"), "{text}");
        let text = explain(Some("workload.spec"), true).unwrap();
        assert!(text.contains("\n    httpGet <object>\n      path <string> (default /)\n"), "{text}");
        assert!(
            text.contains("\n  env <map[string](string or object)>\n    valueFrom <object> -required-\n"),
            "{text}"
        );

        let text = explain(None, false).unwrap();
        for kind in ["workload", "service", "route", "config", "secret"] {
            assert!(text.contains(&format!("\n  {kind} ")), "{text}");
        }
    }

    #[test]
    fn unknown_kinds_and_fields_list_the_valid_names() {
        let e = explain(Some("pod"), false).unwrap_err().to_string();
        assert_eq!(e, "unknown kind \"pod\"; the kinds are workload, service, route, config, secret");
        let e = explain(Some("workload.spec.readinessProbe.periodSeconds"), false).unwrap_err().to_string();
        assert!(
            e.starts_with("workload.spec.readinessProbe has no field \"periodSeconds\" (did you mean \"period\"?)"),
            "{e}"
        );
        assert!(e.ends_with("its fields are exec, failureThreshold, httpGet, initialDelay, period, successThreshold, tcpSocket, timeout"), "{e}");
        let e = explain(Some("secret.data.x"), false).unwrap_err().to_string();
        assert_eq!(e, "secret.data is a map[string]string and has no fields");
    }
}
