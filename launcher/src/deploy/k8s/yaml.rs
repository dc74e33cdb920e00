//! A small YAML writer for Kubernetes objects built as JSON values: block
//! style for people reading `k8s/`, literal blocks for multi-line strings
//! (the job's TOML in the ConfigMap). Every other string is written as a
//! JSON string, which YAML reads the same, so "0", "true" or "on" never
//! turn into numbers or booleans.

use serde_json::Value;
use std::fmt::Write;

/// `value` as one YAML document (no leading `---`).
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    write_block(&mut out, value, 0);
    out
}

fn write_block(out: &mut String, value: &Value, indent: usize) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) => {
            for (key, item) in map {
                write!(out, "{pad}{}:", key_text(key)).unwrap();
                write_after_key(out, item, indent);
            }
        }
        Value::Array(items) => {
            for item in items {
                match item {
                    // A map in a list: its first key on the dash line.
                    Value::Object(map) if !map.is_empty() => {
                        let mut nested = String::new();
                        write_block(&mut nested, item, indent + 2);
                        out.push_str(&pad);
                        out.push_str("- ");
                        out.push_str(&nested[indent + 2..]);
                    }
                    _ => {
                        write!(out, "{pad}-").unwrap();
                        write_after_key(out, item, indent);
                    }
                }
            }
        }
        scalar => writeln!(out, "{pad}{}", scalar_text(scalar)).unwrap(),
    }
}

/// What follows `key:` (or `-`): an inline scalar or a nested block.
fn write_after_key(out: &mut String, item: &Value, indent: usize) {
    match item {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            write_block(out, item, indent + 2);
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            write_block(out, item, indent + 2);
        }
        // A leading space would need an indentation indicator: leave that to JSON quoting.
        Value::String(s) if s.contains('\n') && !s.contains('\r') && !s.starts_with([' ', '\n']) => {
            // `|` keeps the text's last newline; `|-` drops it (none there).
            let chomp = if s.ends_with('\n') { "|" } else { "|-" };
            writeln!(out, " {chomp}").unwrap();
            let pad = " ".repeat(indent + 2);
            for line in s.trim_end_matches('\n').split('\n') {
                if line.is_empty() {
                    out.push('\n');
                } else {
                    writeln!(out, "{pad}{line}").unwrap();
                }
            }
        }
        scalar => writeln!(out, " {}", scalar_text(scalar)).unwrap(),
    }
}

fn scalar_text(value: &Value) -> String {
    match value {
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
        other => other.to_string(),
    }
}

/// Plain keys stay plain (`nvidia.com/gpu` included); anything else is quoted.
fn key_text(key: &str) -> String {
    let plain = !key.is_empty()
        && key.chars().all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c))
        && key.starts_with(|c: char| c.is_ascii_alphabetic());
    if plain {
        key.to_string()
    } else {
        Value::String(key.into()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn writes_block_style_with_literal_text_and_quoted_strings() {
        let doc = json!({
            "kind": "ConfigMap",
            "data": {"job.toml": "a = 1\n\n[b]\nc = \"x\"\n"},
            "list": [{"name": "w", "value": "0"}, "on", 3, true],
            "empty": {},
        });
        // serde_json sorts keys.
        let want = "data:\n  job.toml: |\n    a = 1\n\n    [b]\n    c = \"x\"\nempty: {}\nkind: \"ConfigMap\"\n\
                    list:\n  - name: \"w\"\n    value: \"0\"\n  - \"on\"\n  - 3\n  - true\n";
        assert_eq!(to_yaml(&doc), want);
    }
}
