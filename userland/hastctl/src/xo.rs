//! Machine-readable output with FreeBSD's libxo conventions, written by
//! hand: the `--libxo` option (`--libxo json`, `--libxo=json,pretty`,
//! `--libxo xml`, `--libxo text`, and the short `--libxo:JP` form), JSON
//! whose first member is `"__version"` and XML whose top element carries a
//! `version` attribute, field names in lower case with dashes
//! (`underscores` turns the dashes of JSON names into underscores).
//! The data model and its version are described by
//! docs/hastctl.schema.json.

use std::fmt::Write;

/// The version of the data model (docs/hastctl.schema.json): raised when a
/// field changes meaning or goes away; new optional fields keep it.
pub const VERSION: &str = "1";

/// How to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Text,
    Json,
    Xml,
}

/// The `--libxo` options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub style: Style,
    pub pretty: bool,
    pub underscores: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            style: Style::Text,
            pretty: false,
            underscores: false,
        }
    }
}

/// Parse the value of `--libxo`: comma-separated words (`json`, `xml`,
/// `text`, `pretty`, `underscores`; `warn` and `no-humanize` are accepted
/// and change nothing), or after `:` the letters of the short form (`J`,
/// `X`, `T`, `P`, `U`, `W`).
pub fn parse(value: &str) -> Result<Options, String> {
    let mut o = Options::default();
    if let Some(letters) = value.strip_prefix(':') {
        for c in letters.chars() {
            match c {
                'J' => o.style = Style::Json,
                'X' => o.style = Style::Xml,
                'T' => o.style = Style::Text,
                'P' => o.pretty = true,
                'U' => o.underscores = true,
                'W' => {}
                other => {
                    return Err(format!(
                        "unknown --libxo flag '{other}' (J, X, T, P, U or W)"
                    ))
                }
            }
        }
        return Ok(o);
    }
    for word in value.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        match word {
            "json" => o.style = Style::Json,
            "xml" => o.style = Style::Xml,
            "text" => o.style = Style::Text,
            "pretty" => o.pretty = true,
            "underscores" => o.underscores = true,
            "warn" | "no-humanize" => {}
            "html" => return Err("--libxo html is not supported (json, xml or text)".into()),
            other => {
                return Err(format!(
                    "unknown --libxo option {other:?} (json, xml, text, pretty, underscores)"
                ))
            }
        }
    }
    Ok(o)
}

/// The arguments with `--libxo:FLAGS` turned into `--libxo=:FLAGS`, which
/// the option parser reads like any `--libxo=VALUE`.
pub fn normalize_args(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Vec<std::ffi::OsString> {
    args.into_iter()
        .map(
            |a| match a.to_str().and_then(|s| s.strip_prefix("--libxo:")) {
                Some(flags) => format!("--libxo=:{flags}").into(),
                None => a,
            },
        )
        .collect()
}

/// A value of the output.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Str(String),
    Num(u64),
    Int(i64),
    Bool(bool),
    /// Named members, in order.
    Obj(Vec<(String, Node)>),
    /// Instances of the member that holds it (repeated elements in XML).
    List(Vec<Node>),
}

/// Building an object member by member.
#[derive(Debug, Default)]
pub struct Obj(Vec<(String, Node)>);

impl Obj {
    pub fn new() -> Obj {
        Obj::default()
    }

    pub fn str(mut self, k: &str, v: impl Into<String>) -> Obj {
        self.0.push((k.to_string(), Node::Str(v.into())));
        self
    }

    pub fn num(mut self, k: &str, v: u64) -> Obj {
        self.0.push((k.to_string(), Node::Num(v)));
        self
    }

    pub fn int(mut self, k: &str, v: i64) -> Obj {
        self.0.push((k.to_string(), Node::Int(v)));
        self
    }

    pub fn bool(mut self, k: &str, v: bool) -> Obj {
        self.0.push((k.to_string(), Node::Bool(v)));
        self
    }

    pub fn node(mut self, k: &str, v: Node) -> Obj {
        self.0.push((k.to_string(), v));
        self
    }

    /// `v` when it is `Some`.
    pub fn opt(self, k: &str, v: Option<Node>) -> Obj {
        match v {
            Some(v) => self.node(k, v),
            None => self,
        }
    }

    pub fn done(self) -> Node {
        Node::Obj(self.0)
    }
}

/// One document: `{"__version": VERSION, "<top>": body}` in JSON,
/// `<top version="VERSION">body</top>` in XML; with a newline at the end.
pub fn document(o: &Options, top: &str, body: &Node) -> String {
    let mut out = String::new();
    match o.style {
        Style::Json => {
            let nl = if o.pretty { "\n" } else { "" };
            let _ = write!(
                out,
                "{{{nl}{}\"__version\": \"{VERSION}\", {nl}{}{}: ",
                indent(o, 1),
                indent(o, 1),
                json_str(&name(o, top))
            );
            json(o, &mut out, body, 1);
            let _ = writeln!(out, "{nl}}}");
        }
        Style::Xml => {
            let _ = write!(out, "<{top} version=\"{VERSION}\">");
            xml_children(o, &mut out, body, 1);
            if o.pretty {
                out.push('\n');
            }
            let _ = writeln!(out, "</{top}>");
        }
        Style::Text => {}
    }
    out
}

fn indent(o: &Options, depth: usize) -> String {
    if o.pretty {
        "  ".repeat(depth)
    } else {
        String::new()
    }
}

/// A member name as printed: dashes become underscores with `underscores`.
fn name(o: &Options, k: &str) -> String {
    if o.underscores {
        k.replace('-', "_")
    } else {
        k.to_string()
    }
}

fn json_str(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            '\r' => q.push_str("\\r"),
            '\t' => q.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(q, "\\u{:04x}", u32::from(c));
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

fn json(o: &Options, out: &mut String, n: &Node, depth: usize) {
    let nl = if o.pretty { "\n" } else { "" };
    match n {
        Node::Str(s) => out.push_str(&json_str(s)),
        Node::Num(v) => {
            let _ = write!(out, "{v}");
        }
        Node::Int(v) => {
            let _ = write!(out, "{v}");
        }
        Node::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Node::Obj(members) => {
            if members.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            for (i, (k, v)) in members.iter().enumerate() {
                let sep = if i > 0 { "," } else { "" };
                let _ = write!(
                    out,
                    "{sep}{nl}{}{}:{}",
                    indent(o, depth + 1),
                    json_str(&name(o, k)),
                    if o.pretty { " " } else { "" }
                );
                json(o, out, v, depth + 1);
            }
            let _ = write!(out, "{nl}{}}}", indent(o, depth));
        }
        Node::List(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                let sep = if i > 0 { "," } else { "" };
                let _ = write!(out, "{sep}{nl}{}", indent(o, depth + 1));
                json(o, out, v, depth + 1);
            }
            let _ = write!(out, "{nl}{}]", indent(o, depth));
        }
    }
}

fn xml_text(s: &str) -> String {
    let mut t = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => t.push_str("&amp;"),
            '<' => t.push_str("&lt;"),
            '>' => t.push_str("&gt;"),
            '"' => t.push_str("&quot;"),
            '\'' => t.push_str("&apos;"),
            // Characters XML 1.0 cannot carry at all.
            c if (u32::from(c) < 0x20 && !matches!(c, '\t' | '\n' | '\r')) => t.push('\u{fffd}'),
            c => t.push(c),
        }
    }
    t
}

/// The members of an object as child elements (a list member as one
/// element per item).
fn xml_children(o: &Options, out: &mut String, n: &Node, depth: usize) {
    let Node::Obj(members) = n else {
        xml_value(o, out, n, depth);
        return;
    };
    for (k, v) in members {
        match v {
            Node::List(items) => {
                for item in items {
                    xml_element(o, out, k, item, depth);
                }
            }
            v => xml_element(o, out, k, v, depth),
        }
    }
}

fn xml_element(o: &Options, out: &mut String, k: &str, v: &Node, depth: usize) {
    if o.pretty {
        let _ = write!(out, "\n{}", indent(o, depth));
    }
    let _ = write!(out, "<{k}>");
    xml_value(o, out, v, depth);
    if o.pretty && matches!(v, Node::Obj(m) if !m.is_empty()) {
        let _ = write!(out, "\n{}", indent(o, depth));
    }
    let _ = write!(out, "</{k}>");
}

fn xml_value(o: &Options, out: &mut String, v: &Node, depth: usize) {
    match v {
        Node::Str(s) => out.push_str(&xml_text(s)),
        Node::Num(n) => {
            let _ = write!(out, "{n}");
        }
        Node::Int(n) => {
            let _ = write!(out, "{n}");
        }
        Node::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Node::Obj(_) => xml_children(o, out, v, depth + 1),
        Node::List(items) => {
            for item in items {
                xml_element(o, out, "item", item, depth + 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Node {
        Obj::new()
            .node(
                "resource",
                Node::List(vec![
                    Obj::new()
                        .str("name", "a<b")
                        .num("dirty", 5)
                        .bool("split-brain", false)
                        .node("statistics", Obj::new().num("reads", 1).done())
                        .done(),
                    Obj::new().str("name", "q\"\n").int("code", -1).done(),
                ]),
            )
            .done()
    }

    #[test]
    fn options_in_both_syntaxes() {
        assert_eq!(parse("json").unwrap().style, Style::Json);
        let o = parse("json,pretty").unwrap();
        assert!(o.style == Style::Json && o.pretty && !o.underscores);
        let o = parse(":XP").unwrap();
        assert!(o.style == Style::Xml && o.pretty);
        assert_eq!(parse("text").unwrap(), Options::default());
        assert!(parse("yaml").is_err());
        assert!(parse(":Q").is_err());
        assert_eq!(
            normalize_args(["hastctl".into(), "--libxo:JP".into()]),
            vec![std::ffi::OsString::from("hastctl"), "--libxo=:JP".into()]
        );
    }

    #[test]
    fn json_compact_pretty_and_underscores() {
        let o = parse("json").unwrap();
        assert_eq!(
            document(&o, "list", &sample()),
            "{\"__version\": \"1\", \"list\": {\"resource\":[{\"name\":\"a<b\",\"dirty\":5,\
             \"split-brain\":false,\"statistics\":{\"reads\":1}},{\"name\":\"q\\\"\\n\",\"code\":-1}]}}\n"
        );
        let o = parse("json,pretty,underscores").unwrap();
        let text = document(&o, "list", &sample());
        assert!(text.starts_with("{\n  \"__version\": \"1\", \n  \"list\": {\n    \"resource\": ["));
        assert!(text.contains("\"split_brain\": false"));
    }

    #[test]
    fn xml_repeats_list_members_and_escapes() {
        let o = parse("xml").unwrap();
        assert_eq!(
            document(&o, "list", &sample()),
            "<list version=\"1\"><resource><name>a&lt;b</name><dirty>5</dirty>\
             <split-brain>false</split-brain><statistics><reads>1</reads></statistics>\
             </resource><resource><name>q&quot;\n</name><code>-1</code></resource></list>\n"
        );
    }
}
