//! The guest kernel's layering, enforced: every import between top-level modules of
//! `guest-kernel/src` goes down (or sideways) in the layer table `guest-kernel/layers.toml`,
//! the imports form no cycle, and `unsafe` appears only where the table allows it.
//!
//! Imports are read from the source text (comments and literals stripped): `crate::` and
//! `$crate::` paths, `use` groups (nested and over several lines), `super::` out of a
//! module, macros by path or name (mapped to the module whose `#[macro_export]` defines
//! them), bare module paths in `main.rs` (the crate root), and link-time symbols (a name in
//! a `.S` file or in an `extern` block that another module defines with `#[no_mangle]` or
//! `#[export_name]`). The checker itself is tested on synthetic kernels below.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

// ---------------------------------------------------------------------------------------
// Lexing: just enough Rust to tell code from comments and literals.

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
    /// A string literal (its contents, escapes left as written).
    Str(String),
    /// A number, char literal or lifetime: nothing the checker looks at.
    Other,
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    line: usize,
}

fn is_ident_start(c: char) -> bool {
    c == '_' || c.is_alphabetic()
}

fn is_ident_char(c: char) -> bool {
    c == '_' || c.is_alphanumeric()
}

/// Rust source to tokens, without comments; literals become `Str`/`Other`.
fn lex(src: &str) -> Vec<Token> {
    let c: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let mut line = 1;
    let at = |k: usize| c.get(k).copied().unwrap_or('\0');
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            // Block comments nest.
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if c[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if let Some((len, hashes)) = raw_string_prefix(&c, i) {
            // r"..", r#".."#, br"..": no escapes; ends at a quote and as many hashes.
            let start_line = line;
            i += len;
            let body_start = i;
            loop {
                if i >= c.len() {
                    break;
                }
                if c[i] == '"' && (0..hashes).all(|h| at(i + 1 + h) == '#') {
                    break;
                }
                if c[i] == '\n' {
                    line += 1;
                }
                i += 1;
            }
            let body: String = c[body_start..i.min(c.len())].iter().collect();
            i += 1 + hashes;
            out.push(Token {
                tok: Tok::Str(body),
                line: start_line,
            });
        } else if ch == '"' || (ch == 'b' && at(i + 1) == '"') {
            let start_line = line;
            i += if ch == 'b' { 2 } else { 1 };
            let body_start = i;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    i += 1;
                }
                if at(i) == '\n' {
                    line += 1;
                }
                i += 1;
            }
            let body: String = c[body_start..i.min(c.len())].iter().collect();
            i += 1;
            out.push(Token {
                tok: Tok::Str(body),
                line: start_line,
            });
        } else if ch == '\'' || (ch == 'b' && at(i + 1) == '\'') {
            // A char literal ('a', '\n', '\u{..}', b'x') or a lifetime/label ('a, 'static).
            let q = if ch == 'b' { i + 1 } else { i };
            if at(q + 1) == '\\' {
                i = q + 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(q + 2) == '\'' {
                i = q + 3;
            } else {
                // A lifetime or label, name included.
                i = q + 1;
                while i < c.len() && is_ident_char(c[i]) {
                    i += 1;
                }
            }
            out.push(Token {
                tok: Tok::Other,
                line,
            });
        } else if is_ident_start(ch) {
            let start = i;
            while i < c.len() && is_ident_char(c[i]) {
                i += 1;
            }
            let mut word: String = c[start..i].iter().collect();
            // Raw identifiers: r#name.
            if word == "r" && at(i) == '#' && is_ident_start(at(i + 1)) {
                let s2 = i + 1;
                i = s2;
                while i < c.len() && is_ident_char(c[i]) {
                    i += 1;
                }
                word = c[s2..i].iter().collect();
            }
            out.push(Token {
                tok: Tok::Ident(word),
                line,
            });
        } else if ch.is_ascii_digit() {
            while i < c.len() && is_ident_char(c[i]) {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Other,
                line,
            });
        } else if ch == ':' && at(i + 1) == ':' {
            out.push(Token {
                tok: Tok::PathSep,
                line,
            });
            i += 2;
        } else {
            out.push(Token {
                tok: Tok::Punct(ch),
                line,
            });
            i += 1;
        }
    }
    out
}

/// At `i`, a raw string's opening (`r"`, `r#"`, `br##"`...): its length and hash count.
fn raw_string_prefix(c: &[char], i: usize) -> Option<(usize, usize)> {
    let mut k = i;
    if c.get(k) == Some(&'b') {
        k += 1;
    }
    if c.get(k) != Some(&'r') {
        return None;
    }
    // Not the tail of an identifier (`bar"` is not a raw string).
    if i > 0 && is_ident_char(c[i - 1]) {
        return None;
    }
    k += 1;
    let mut hashes = 0;
    while c.get(k) == Some(&'#') {
        hashes += 1;
        k += 1;
    }
    (c.get(k) == Some(&'"')).then_some((k + 1 - i, hashes))
}

/// Assembly (GNU as, AT&T) to identifiers with their lines, without `/* */` and `#`
/// comments.
fn asm_idents(src: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let mut in_block = false;
    for (n, raw) in src.lines().enumerate() {
        let mut line = String::new();
        let mut rest = raw;
        loop {
            if in_block {
                match rest.find("*/") {
                    Some(p) => {
                        in_block = false;
                        rest = &rest[p + 2..];
                    }
                    None => break,
                }
            } else {
                match rest.find("/*") {
                    Some(p) => {
                        line.push_str(&rest[..p]);
                        line.push(' ');
                        in_block = true;
                        rest = &rest[p + 2..];
                    }
                    None => {
                        line.push_str(rest);
                        break;
                    }
                }
            }
        }
        let code = line.split('#').next().unwrap_or("");
        let mut word = String::new();
        for ch in code.chars().chain([' ']) {
            if ch == '_' || ch == '.' || ch == '$' || ch.is_ascii_alphanumeric() {
                word.push(ch);
            } else if !word.is_empty() {
                out.push((std::mem::take(&mut word), n + 1));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Sources, modules and imports.

/// One file of the kernel: its path under `src/` and its text.
struct SourceFile {
    path: String,
    text: String,
}

/// The top-level module of a file: `main.rs` -> main, `x.rs` and `x/...` -> x.
fn top_module(path: &str) -> String {
    let first = path.split('/').next().unwrap_or(path);
    first.strip_suffix(".rs").unwrap_or(first).to_string()
}

/// The module path of a Rust file: `main.rs` -> [], `mm/mod.rs` -> [mm],
/// `mm/aspace.rs` -> [mm, aspace].
fn module_path(path: &str) -> Vec<String> {
    let mut parts: Vec<String> = path.split('/').map(str::to_string).collect();
    let last = parts.pop().unwrap_or_default();
    if last != "mod.rs" && last != "main.rs" {
        parts.push(last.trim_end_matches(".rs").to_string());
    }
    parts
}

#[derive(Clone, Debug)]
struct Import {
    /// File under `src/`, e.g. `arch/idt.rs`.
    file: String,
    line: usize,
    /// What the source says, e.g. `crate::sched::tick` or `symbol ap_main`.
    text: String,
    from: String,
    to: String,
}

/// What the whole source tree defines that imports resolve against.
struct Defs {
    modules: BTreeSet<String>,
    /// Exported macro name -> defining module.
    macros: BTreeMap<String, String>,
    /// Link-time symbol -> defining module.
    symbols: BTreeMap<String, String>,
}

fn ident(t: Option<&Token>) -> Option<&str> {
    match t.map(|t| &t.tok) {
        Some(Tok::Ident(s)) => Some(s),
        _ => None,
    }
}

fn is(t: Option<&Token>, want: &Tok) -> bool {
    t.is_some_and(|t| &t.tok == want)
}

fn defs(files: &[SourceFile]) -> Defs {
    let mut d = Defs {
        modules: files.iter().map(|f| top_module(&f.path)).collect(),
        macros: BTreeMap::new(),
        symbols: BTreeMap::new(),
    };
    for f in files.iter().filter(|f| f.path.ends_with(".rs")) {
        let m = top_module(&f.path);
        let t = lex(&f.text);
        for i in 0..t.len() {
            match ident(t.get(i)) {
                Some("macro_export") => {
                    if let Some(k) = (i..t.len()).find(|&k| {
                        ident(t.get(k)) == Some("macro_rules") && is(t.get(k + 1), &Tok::Punct('!'))
                    }) {
                        if let Some(name) = ident(t.get(k + 2)) {
                            d.macros.insert(name.to_string(), m.clone());
                        }
                    }
                }
                Some("no_mangle") => {
                    if let Some(k) = (i..t.len())
                        .find(|&k| matches!(ident(t.get(k)), Some("fn") | Some("static")))
                    {
                        if let Some(name) = ident(t.get(k + 1)) {
                            d.symbols.insert(name.to_string(), m.clone());
                        }
                    }
                }
                Some("export_name") if is(t.get(i + 1), &Tok::Punct('=')) => {
                    if let Some(Tok::Str(name)) = t.get(i + 2).map(|t| &t.tok) {
                        d.symbols.insert(name.clone(), m.clone());
                    }
                }
                _ => {}
            }
        }
    }
    d
}

/// The path text from token `i` on (`a::b::c`), for messages.
fn path_text(t: &[Token], mut i: usize) -> String {
    let mut s = String::new();
    while let Some(tok) = t.get(i) {
        match &tok.tok {
            Tok::Ident(w) if s.is_empty() || s.ends_with("::") => s.push_str(w),
            Tok::PathSep if !s.is_empty() && !s.ends_with("::") => s.push_str("::"),
            Tok::Punct('!') => {
                s.push('!');
                break;
            }
            Tok::Punct('{') if s.ends_with("::") => {
                s.push_str("{..}");
                break;
            }
            _ => break,
        }
        i += 1;
    }
    s
}

/// The top-level module a crate-root name refers to: a module, an exported macro, or else
/// an item of the crate root (main).
fn resolve_root(name: &str, d: &Defs) -> String {
    if d.modules.contains(name) && name != "main" {
        name.to_string()
    } else if let Some(m) = d.macros.get(name) {
        m.clone()
    } else {
        "main".to_string()
    }
}

/// Every import of module `m` in file `f`.
fn file_imports(f: &SourceFile, d: &Defs) -> Vec<Import> {
    let from = top_module(&f.path);
    let mut out = Vec::new();
    let mut push = |line: usize, text: String, to: String| {
        if to != from {
            out.push(Import {
                file: f.path.clone(),
                line,
                text,
                from: from.clone(),
                to,
            });
        }
    };
    if !f.path.ends_with(".rs") {
        for (w, line) in asm_idents(&f.text) {
            if let Some(m) = d.symbols.get(&w) {
                push(line, format!("symbol {w}"), m.clone());
            }
        }
        return out;
    }
    let t = lex(&f.text);
    let here = module_path(&f.path);
    let is_root = f.path == "main.rs";
    let mut i = 0;
    while i < t.len() {
        let prev_sep = i > 0 && is(t.get(i - 1), &Tok::PathSep);
        let word = ident(t.get(i));
        let next_sep = is(t.get(i + 1), &Tok::PathSep);
        if prev_sep || word.is_none() {
            i += 1;
            continue;
        }
        let word = word.unwrap_or_default();
        let line = t[i].line;
        // The module path the path starts from, and where its next segment is.
        let base: Option<(Vec<String>, usize, String)> = match word {
            "crate" if next_sep => {
                let dollar = i > 0 && is(t.get(i - 1), &Tok::Punct('$'));
                let prefix = if dollar { "$crate::" } else { "crate::" };
                Some((Vec::new(), i + 2, prefix.to_string()))
            }
            "super" if next_sep => {
                let mut b = here.clone();
                let mut j = i;
                let mut prefix = String::new();
                while ident(t.get(j)) == Some("super") && is(t.get(j + 1), &Tok::PathSep) {
                    b.pop();
                    prefix.push_str("super::");
                    j += 2;
                }
                Some((b, j, prefix))
            }
            w if is_root && next_sep && d.modules.contains(w) && w != "main" => {
                Some((Vec::new(), i, String::new()))
            }
            _ => None,
        };
        if let Some((base, j, prefix)) = base {
            if let Some(first) = base.first() {
                push(line, format!("{prefix}{}", path_text(&t, j)), first.clone());
            } else if let Some(name) = ident(t.get(j)) {
                push(
                    line,
                    format!("{prefix}{}", path_text(&t, j)),
                    resolve_root(name, d),
                );
            } else if is(t.get(j), &Tok::Punct('{')) {
                // A group: the first identifier of each item at depth 1.
                let mut depth = 0;
                let mut k = j;
                let mut item_start = true;
                while let Some(tok) = t.get(k) {
                    match &tok.tok {
                        Tok::Punct('{') => {
                            depth += 1;
                            item_start = depth == 1;
                        }
                        Tok::Punct('}') => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        Tok::Punct(',') if depth == 1 => item_start = true,
                        Tok::Ident(name) if depth == 1 && item_start => {
                            item_start = false;
                            if name != "self" {
                                push(
                                    tok.line,
                                    format!("{prefix}{{{}}}", path_text(&t, k)),
                                    resolve_root(name, d),
                                );
                            }
                        }
                        _ => {}
                    }
                    k += 1;
                }
            } else if is(t.get(j), &Tok::Punct('*')) {
                push(line, format!("{prefix}*"), "main".to_string());
            }
            i = j.max(i + 1);
            continue;
        }
        // A macro by name (`println!`), imported or, in the crate root, in scope.
        if is(t.get(i + 1), &Tok::Punct('!'))
            && ident(t.get(i.wrapping_sub(1))) != Some("macro_rules")
        {
            if let Some(m) = d.macros.get(word) {
                push(line, format!("{word}!"), m.clone());
            }
        }
        // Symbols named in an `extern` block.
        if word == "extern" {
            let mut k = i + 1;
            if matches!(t.get(k).map(|t| &t.tok), Some(Tok::Str(_))) {
                k += 1;
            }
            if is(t.get(k), &Tok::Punct('{')) {
                let mut depth = 0;
                while let Some(tok) = t.get(k) {
                    match &tok.tok {
                        Tok::Punct('{') => depth += 1,
                        Tok::Punct('}') => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        Tok::Ident(kw) if kw == "fn" || kw == "static" => {
                            if let Some(name) = ident(t.get(k + 1)) {
                                if let Some(m) = d.symbols.get(name) {
                                    push(tok.line, format!("symbol {name}"), m.clone());
                                }
                            }
                        }
                        _ => {}
                    }
                    k += 1;
                }
                i = k;
                continue;
            }
        }
        i += 1;
    }
    out
}

/// Lines of `unsafe` in a Rust file.
fn unsafe_lines(f: &SourceFile) -> Vec<usize> {
    if !f.path.ends_with(".rs") {
        return Vec::new();
    }
    lex(&f.text)
        .into_iter()
        .filter(|t| t.tok == Tok::Ident("unsafe".into()))
        .map(|t| t.line)
        .collect()
}

// ---------------------------------------------------------------------------------------
// The table and the checks.

struct Layer {
    name: String,
    modules: Vec<String>,
}

struct Exception {
    file: String,
    to: String,
}

enum UnsafeAllow {
    Module(String),
    File { path: String, count: usize },
}

struct Table {
    layers: Vec<Layer>,
    exceptions: Vec<Exception>,
    unsafe_allow: Vec<UnsafeAllow>,
}

fn str_field(t: &toml::Table, key: &str, what: &str) -> String {
    t.get(key)
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("layers.toml: {what} needs a string `{key}`"))
        .to_string()
}

fn array<'a>(t: &'a toml::Table, key: &str) -> Vec<&'a toml::Table> {
    t.get(key)
        .map(|v| {
            v.as_array()
                .unwrap_or_else(|| panic!("layers.toml: `{key}` must be an array of tables"))
                .iter()
                .map(|e| {
                    e.as_table()
                        .unwrap_or_else(|| panic!("layers.toml: `{key}` entries are tables"))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn parse_table(text: &str) -> Table {
    let t: toml::Table = toml::from_str(text).expect("layers.toml is valid TOML");
    let layers = array(&t, "layer")
        .into_iter()
        .map(|l| {
            let name = str_field(l, "name", "a [[layer]]");
            let modules = l
                .get("modules")
                .and_then(|v| v.as_array())
                .unwrap_or_else(|| panic!("layers.toml: layer {name} needs `modules`"))
                .iter()
                .map(|m| m.as_str().expect("module names are strings").to_string())
                .collect();
            str_field(l, "why", "a [[layer]]");
            Layer { name, modules }
        })
        .collect();
    let exceptions = array(&t, "exception")
        .into_iter()
        .map(|e| {
            str_field(e, "why", "an [[exception]]");
            Exception {
                file: str_field(e, "file", "an [[exception]]"),
                to: str_field(e, "to", "an [[exception]]"),
            }
        })
        .collect();
    let unsafe_allow = array(&t, "unsafe")
        .into_iter()
        .map(|u| {
            str_field(u, "why", "an [[unsafe]] entry");
            match (u.get("module"), u.get("file")) {
                (Some(m), None) => UnsafeAllow::Module(m.as_str().expect("a string").into()),
                (None, Some(f)) => UnsafeAllow::File {
                    path: f.as_str().expect("a string").into(),
                    count: u
                        .get("count")
                        .and_then(|c| c.as_integer())
                        .and_then(|c| usize::try_from(c).ok())
                        .expect("layers.toml: a file's [[unsafe]] entry needs `count`"),
                },
                _ => panic!("layers.toml: an [[unsafe]] entry names a `module` or a `file`"),
            }
        })
        .collect();
    Table {
        layers,
        exceptions,
        unsafe_allow,
    }
}

/// A cycle through `scc` (module names), as a path that ends where it starts.
fn find_cycle(scc: &BTreeSet<String>, edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let start = scc.iter().next().expect("non-empty").clone();
    // Breadth-first from start's successors back to start, inside the component.
    let mut prev: BTreeMap<String, String> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start.clone()]);
    let mut seen = BTreeSet::new();
    while let Some(n) = queue.pop_front() {
        for m in edges
            .get(&n)
            .into_iter()
            .flatten()
            .filter(|m| scc.contains(*m))
        {
            if *m == start {
                // start -> ... -> n, back through `prev`, then the edge n -> start.
                let mut chain = vec![n.clone()];
                let mut cur = n.clone();
                while cur != start {
                    cur = prev[&cur].clone();
                    chain.push(cur.clone());
                }
                chain.reverse();
                chain.push(start.clone());
                return chain;
            }
            if seen.insert(m.clone()) {
                prev.insert(m.clone(), n.clone());
                queue.push_back(m.clone());
            }
        }
    }
    vec![start.clone(), start]
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    struct St<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<String, usize>,
        low: BTreeMap<String, usize>,
        stack: Vec<String>,
        on: BTreeSet<String>,
        out: Vec<BTreeSet<String>>,
    }
    fn visit(s: &mut St, v: &str) {
        let n = s.index.len();
        s.index.insert(v.into(), n);
        s.low.insert(v.into(), n);
        s.stack.push(v.into());
        s.on.insert(v.into());
        let succ: Vec<String> = s.edges.get(v).into_iter().flatten().cloned().collect();
        for w in succ {
            if !s.index.contains_key(&w) {
                visit(s, &w);
                let lw = s.low[&w];
                let lv = s.low[v];
                s.low.insert(v.into(), lv.min(lw));
            } else if s.on.contains(&w) {
                let iw = s.index[&w];
                let lv = s.low[v];
                s.low.insert(v.into(), lv.min(iw));
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = BTreeSet::new();
            while let Some(w) = s.stack.pop() {
                s.on.remove(&w);
                let done = w == v;
                comp.insert(w);
                if done {
                    break;
                }
            }
            if comp.len() > 1 {
                s.out.push(comp);
            }
        }
    }
    let mut s = St {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    let nodes: BTreeSet<String> = edges
        .iter()
        .flat_map(|(k, vs)| std::iter::once(k.clone()).chain(vs.iter().cloned()))
        .collect();
    for v in &nodes {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

/// Everything wrong with `files` (paths under `src/`) against `table`; empty when the
/// layering holds.
fn check(files: &[SourceFile], table: &Table) -> Vec<String> {
    let mut fail = Vec::new();
    let d = defs(files);

    // Every module in exactly one layer, every listed module present.
    let mut layer_of: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for (n, l) in table.layers.iter().enumerate() {
        for m in &l.modules {
            if let Some((_, other)) = layer_of.insert(m.clone(), (n, l.name.clone())) {
                fail.push(format!(
                    "module {m} is listed in layers \"{other}\" and \"{}\"",
                    l.name
                ));
            }
            if !d.modules.contains(m) {
                fail.push(format!(
                    "layer \"{}\" lists module {m}, which is not in guest-kernel/src",
                    l.name
                ));
            }
        }
    }
    for m in &d.modules {
        if !layer_of.contains_key(m) {
            fail.push(format!(
                "module {m} is in no layer: add it to guest-kernel/layers.toml"
            ));
        }
    }

    // Every import down or sideways, unless an exception allows it.
    let imports: Vec<Import> = files.iter().flat_map(|f| file_imports(f, &d)).collect();
    let excepted = |i: &Import| {
        table
            .exceptions
            .iter()
            .any(|e| e.file == i.file && e.to == i.to)
    };
    for i in &imports {
        let (Some((lf, nf)), Some((lt, nt))) = (layer_of.get(&i.from), layer_of.get(&i.to)) else {
            continue;
        };
        if lt > lf && !excepted(i) {
            fail.push(format!(
                "guest-kernel/src/{}:{}: `{}` imports {} (layer \"{nt}\") from {} (layer \"{nf}\"), a layer below it: an upward import. Call a hook the higher layer installs (arch::hook::Hook), or move the code.",
                i.file, i.line, i.text, i.to, i.from
            ));
        }
    }
    for e in &table.exceptions {
        let matching: Vec<&Import> = imports
            .iter()
            .filter(|i| i.file == e.file && i.to == e.to)
            .collect();
        let upward = matching.iter().any(|i| {
            matches!((layer_of.get(&i.from), layer_of.get(&i.to)), (Some((lf, _)), Some((lt, _))) if lt > lf)
        });
        if matching.is_empty() {
            fail.push(format!(
                "stale exception: guest-kernel/src/{} no longer imports {}; delete it from layers.toml",
                e.file, e.to
            ));
        } else if !upward {
            fail.push(format!(
                "needless exception: guest-kernel/src/{} -> {} goes down the layers; delete it from layers.toml",
                e.file, e.to
            ));
        }
    }

    // No cycle between modules (exceptions left out).
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for i in imports.iter().filter(|i| !excepted(i)) {
        edges
            .entry(i.from.clone())
            .or_default()
            .insert(i.to.clone());
    }
    for scc in cycles(&edges) {
        let path = find_cycle(&scc, &edges);
        let mut msg = format!("import cycle: {}", path.join(" -> "));
        for w in path.windows(2) {
            if let Some(i) = imports
                .iter()
                .find(|i| i.from == w[0] && i.to == w[1] && !excepted(i))
            {
                let _ = write!(
                    msg,
                    "\n    guest-kernel/src/{}:{}: `{}`",
                    i.file, i.line, i.text
                );
            }
        }
        fail.push(msg);
    }

    // `unsafe` only where allowed.
    for u in &table.unsafe_allow {
        match u {
            UnsafeAllow::Module(m) if !d.modules.contains(m) => fail.push(format!(
                "stale [[unsafe]] entry: no module {m} in guest-kernel/src"
            )),
            UnsafeAllow::Module(m)
                if files
                    .iter()
                    .filter(|f| top_module(&f.path) == *m)
                    .all(|f| unsafe_lines(f).is_empty()) =>
            {
                fail.push(format!(
                    "needless [[unsafe]] entry: module {m} has no `unsafe` any more; delete it from layers.toml"
                ))
            }
            UnsafeAllow::File { path, .. } if !files.iter().any(|f| &f.path == path) => {
                fail.push(format!(
                    "stale [[unsafe]] entry: no file guest-kernel/src/{path}"
                ))
            }
            _ => {}
        }
    }
    for f in files {
        let lines = unsafe_lines(f);
        let m = top_module(&f.path);
        if table
            .unsafe_allow
            .iter()
            .any(|u| matches!(u, UnsafeAllow::Module(a) if *a == m))
        {
            continue;
        }
        let allowed = table.unsafe_allow.iter().find_map(|u| match u {
            UnsafeAllow::File { path, count } if *path == f.path => Some(*count),
            _ => None,
        });
        match allowed {
            Some(n) if n == lines.len() => {}
            Some(n) => fail.push(format!(
                "guest-kernel/src/{} has {} `unsafe` (lines {:?}), layers.toml allows exactly {n}: move new unsafe code into arch/ or mm/ behind a safe function, or update the count",
                f.path,
                lines.len(),
                lines
            )),
            None if !lines.is_empty() => fail.push(format!(
                "guest-kernel/src/{}:{}: `unsafe` in module {m}, outside arch/, mm/ and shared/: move it behind a safe function there (or list the file in layers.toml with why)",
                f.path, lines[0]
            )),
            None => {}
        }
    }
    fail
}

// ---------------------------------------------------------------------------------------
// The real kernel.

fn read_tree(root: &Path, dir: &Path, out: &mut Vec<SourceFile>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            read_tree(root, &p, out);
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("rs" | "S")) {
            out.push(SourceFile {
                path: p
                    .strip_prefix(root)
                    .expect("under src")
                    .to_string_lossy()
                    .replace('\\', "/"),
                text: std::fs::read_to_string(&p)
                    .unwrap_or_else(|e| panic!("reading {}: {e}", p.display())),
            });
        }
    }
}

#[test]
fn guest_kernel_layers_hold() {
    let kernel = pvsync_tests::workspace_root().join("guest-kernel");
    let table = parse_table(
        &std::fs::read_to_string(kernel.join("layers.toml")).expect("guest-kernel/layers.toml"),
    );
    let src = kernel.join("src");
    let mut files = Vec::new();
    read_tree(&src, &src, &mut files);
    assert!(
        files.iter().any(|f| f.path == "main.rs") && files.len() > 20,
        "guest-kernel/src not found or nearly empty"
    );
    // The checker must have something to check: the kernel's imports are many.
    let d = defs(&files);
    let n: usize = files.iter().map(|f| file_imports(f, &d).len()).sum();
    assert!(n > 100, "only {n} imports found: the parser is broken");
    let fail = check(&files, &table);
    assert!(
        fail.is_empty(),
        "the guest kernel's layering (guest-kernel/layers.toml) is broken:\n{}",
        fail.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// The checker on synthetic kernels.

fn files(list: &[(&str, &str)]) -> Vec<SourceFile> {
    list.iter()
        .map(|(p, t)| SourceFile {
            path: p.to_string(),
            text: t.to_string(),
        })
        .collect()
}

const TABLE: &str = r#"
[[layer]]
name = "arch"
modules = ["arch"]
why = "floor"

[[layer]]
name = "console"
modules = ["console"]
why = "prints"

[[layer]]
name = "sched"
modules = ["sched", "irq"]
why = "tasks"

[[layer]]
name = "main"
modules = ["main"]
why = "top"
"#;

fn imports_of(list: &[(&str, &str)], file: &str) -> Vec<(String, String)> {
    let fs = files(list);
    let d = defs(&fs);
    let f = fs.iter().find(|f| f.path == file).expect("the file");
    file_imports(f, &d)
        .into_iter()
        .map(|i| (i.to, i.text))
        .collect()
}

#[test]
fn parser_reads_paths_groups_super_macros_and_symbols() {
    let kernel = [
        ("main.rs", "mod arch; mod console; mod sched; mod irq;\nfn main() { arch::go(); println!(\"x\"); }"),
        ("arch/mod.rs", "pub mod idt;\nuse super::console; // crate::sched in a comment\nconst S: &str = \"crate::irq\";"),
        ("arch/idt.rs", "use super::mod_level; use super::super::irq::x;"),
        ("arch/boot.S", "/* call sched_entry */\n    call kernel_main # and kernel_main again\n    lea ap_stack(%rip), %rax"),
        ("console.rs", "#[macro_export]\nmacro_rules! println { ($($a:tt)*) => { $crate::console::p(format_args!($($a)*)) }; }\npub fn p(_: core::fmt::Arguments) {}"),
        ("sched/mod.rs", "pub mod wait;\nuse crate::{\n    arch::{self, idt},\n    console,\n};\nfn f() { crate::println!(\"{}\", 'a'); let _: &'static str = r#\"crate::irq\"#; }\n#[no_mangle]\nextern \"C\" fn kernel_main() {}\n#[export_name = \"ap_stack\"]\nstatic A: u8 = 0;"),
        ("sched/wait.rs", "use super::f; use crate::irq as i;\nextern \"C\" { fn sched_entry(); }"),
        ("irq.rs", "use crate::println; fn g() { println!(\"\"); super::sched::f(); }"),
    ];
    let mut got = imports_of(&kernel, "sched/mod.rs");
    got.sort();
    assert_eq!(
        got,
        vec![
            ("arch".into(), "crate::{arch::{..}}".into()),
            ("console".into(), "crate::println!".into()),
            ("console".into(), "crate::{console}".into()),
        ],
        "group over several lines, nested group, macro by path; nothing from literals"
    );
    assert_eq!(
        imports_of(&kernel, "arch/mod.rs"),
        vec![("console".into(), "super::console".into())],
        "super:: from a mod.rs reaches the crate root; comments and strings ignored"
    );
    assert_eq!(
        imports_of(&kernel, "arch/idt.rs"),
        vec![("irq".into(), "super::super::irq::x".into())],
        "super:: inside the module stays in it; super::super:: leaves it"
    );
    let mut irq = imports_of(&kernel, "irq.rs");
    irq.sort();
    assert_eq!(
        irq,
        vec![
            ("console".into(), "crate::println".into()),
            ("console".into(), "println!".into()),
            ("sched".into(), "super::sched::f".into()),
        ]
    );
    assert_eq!(
        imports_of(&kernel, "sched/wait.rs"),
        vec![("irq".into(), "crate::irq".into())],
        "an extern block naming a symbol of its own module is no import"
    );
    let mut asm = imports_of(&kernel, "arch/boot.S");
    asm.sort();
    assert_eq!(
        asm,
        vec![
            ("sched".into(), "symbol ap_stack".into()),
            ("sched".into(), "symbol kernel_main".into()),
        ],
        "asm symbols defined elsewhere; comments ignored"
    );
    let mut main = imports_of(&kernel, "main.rs");
    main.sort();
    assert_eq!(
        main,
        vec![
            ("arch".into(), "arch::go".into()),
            ("console".into(), "println!".into()),
        ],
        "bare module paths and macros in the crate root"
    );
}

#[test]
fn checker_flags_an_upward_import_naming_file_import_and_layers() {
    let kernel = files(&[
        ("main.rs", "mod arch; mod console; mod sched; mod irq;"),
        ("arch/mod.rs", "pub fn go() {}"),
        (
            "arch/idt.rs",
            "fn trap() {\n    crate::sched::preempt();\n}",
        ),
        ("console.rs", "use crate::arch;"),
        ("sched.rs", "pub fn preempt() {}"),
        ("irq.rs", "use crate::sched;"),
    ]);
    let table = parse_table(TABLE);
    let fail = check(&kernel, &table);
    assert_eq!(fail.len(), 1, "{fail:#?}");
    let msg = &fail[0];
    for part in [
        "guest-kernel/src/arch/idt.rs:2",
        "`crate::sched::preempt`",
        "layer \"sched\"",
        "layer \"arch\"",
        "upward",
    ] {
        assert!(msg.contains(part), "{part:?} missing from: {msg}");
    }
    // The same import allowed by an exception passes; the exception must be used.
    let mut t = parse_table(TABLE);
    t.exceptions.push(Exception {
        file: "arch/idt.rs".into(),
        to: "sched".into(),
    });
    assert!(check(&kernel, &t).is_empty());
    t.exceptions.push(Exception {
        file: "console.rs".into(),
        to: "sched".into(),
    });
    let fail = check(&kernel, &t);
    assert!(
        fail.len() == 1 && fail[0].contains("stale exception"),
        "{fail:#?}"
    );
}

#[test]
fn checker_flags_a_cycle_within_a_layer() {
    let kernel = files(&[
        ("main.rs", "mod arch; mod console; mod sched; mod irq;"),
        ("arch/mod.rs", ""),
        ("console.rs", ""),
        ("sched.rs", "use crate::irq::tick;"),
        ("irq.rs", "fn timer() {\n    crate::sched::schedule();\n}"),
    ]);
    let fail = check(&kernel, &parse_table(TABLE));
    assert_eq!(fail.len(), 1, "{fail:#?}");
    let msg = &fail[0];
    assert!(
        msg.contains("import cycle: irq -> sched -> irq")
            && msg.contains("guest-kernel/src/irq.rs:2: `crate::sched::schedule`")
            && msg.contains("guest-kernel/src/sched.rs:1: `crate::irq::tick`"),
        "{msg}"
    );
}

#[test]
fn checker_flags_unsafe_outside_the_allowlist() {
    let kernel = files(&[
        ("main.rs", "mod arch; mod console; mod sched; mod irq;"),
        (
            "arch/mod.rs",
            "pub fn f() { unsafe { core::hint::unreachable_unchecked() } }",
        ),
        (
            "console.rs",
            "// unsafe in a comment\nconst S: &str = \"unsafe\";",
        ),
        (
            "sched.rs",
            "fn g() {\n    let x = unsafe { *(8 as *const u8) };\n}",
        ),
        ("irq.rs", ""),
    ]);
    let mut t = parse_table(TABLE);
    t.unsafe_allow.push(UnsafeAllow::Module("arch".into()));
    let fail = check(&kernel, &t);
    assert_eq!(fail.len(), 1, "{fail:#?}");
    assert!(
        fail[0].contains("guest-kernel/src/sched.rs:2") && fail[0].contains("unsafe"),
        "{}",
        fail[0]
    );
    // A module allowed unsafe that has none is a stale entry.
    let mut t = parse_table(TABLE);
    t.unsafe_allow.push(UnsafeAllow::Module("console".into()));
    assert!(check(&kernel, &t)
        .iter()
        .any(|f| f.contains("needless [[unsafe]] entry: module console")));
    // Allowed with its exact count; a wrong count fails.
    let mut t = parse_table(TABLE);
    t.unsafe_allow.push(UnsafeAllow::Module("arch".into()));
    t.unsafe_allow.push(UnsafeAllow::File {
        path: "sched.rs".into(),
        count: 1,
    });
    assert!(check(&kernel, &t).is_empty());
    t.unsafe_allow.pop();
    t.unsafe_allow.push(UnsafeAllow::File {
        path: "sched.rs".into(),
        count: 2,
    });
    assert!(check(&kernel, &t)[0].contains("allows exactly 2"));
}

#[test]
fn checker_flags_an_unlisted_module() {
    let kernel = files(&[
        (
            "main.rs",
            "mod arch; mod console; mod sched; mod irq; mod extra;",
        ),
        ("arch/mod.rs", ""),
        ("console.rs", ""),
        ("sched.rs", ""),
        ("irq.rs", ""),
        ("extra.rs", ""),
    ]);
    let fail = check(&kernel, &parse_table(TABLE));
    assert!(
        fail.len() == 1 && fail[0].contains("module extra is in no layer"),
        "{fail:#?}"
    );
}
