//! The library crates' top-level modules depend on each other in one
//! direction: no import cycle, so each module (and `builder/src/host/`, the
//! host tools) can be read, tested and replaced from the bottom up. A new
//! `crate::x` reference that closes a circle fails here, naming it.
//!
//! The graph is read from the sources: a top-level module `m` depends on
//! `n` when code in `m` (its file or folder, tests and comments left out)
//! names `crate::n`, directly or in a `use crate::{…}` group.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_owned()];
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(path).unwrap() {
        out.extend(rust_files(&e.unwrap().path()));
    }
    out.retain(|p| p.extension().is_some_and(|e| e == "rs"));
    out
}

/// The code of a file that counts: no unit tests, no comments.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| l.split_once("//").map_or(l, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules `code` names through `crate::`.
fn named(code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        let words: Vec<String> = match rest.strip_prefix('{') {
            // `use crate::{a, b::c, d::{e, f}}`: the first word of each
            // item at the group's top level.
            Some(group) => {
                let mut depth = 0;
                let mut items = vec![String::new()];
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => items.push(String::new()),
                        c => items.last_mut().unwrap().push(c),
                    }
                }
                items.iter().map(|s| ident(s.trim())).collect()
            }
            None => vec![ident(rest)],
        };
        out.extend(words.into_iter().filter(|w| modules.contains(w)));
    }
    out
}

fn graph(src: &Path) -> Graph {
    let mut modules = BTreeMap::new();
    for e in std::fs::read_dir(src).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        if name == "lib" || name == "main" || name == "snapshots" {
            continue;
        }
        // `run.rs` and `run/` are one module.
        modules
            .entry(name)
            .or_insert_with(Vec::new)
            .extend(rust_files(&path));
    }
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    modules
        .into_iter()
        .map(|(m, files)| {
            let mut deps = BTreeSet::new();
            for f in files.iter().filter(|f| !f.ends_with("tests.rs")) {
                deps.extend(named(&code(&std::fs::read_to_string(f).unwrap()), &names));
            }
            deps.remove(&m);
            (m, deps)
        })
        .collect()
}

/// The graph's cycles: its strongly connected components of more than one
/// module (Tarjan).
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        out: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            for w in self.g.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    self.low.insert(v, self.low[v].min(self.low[w]));
                } else if self.stack.contains(&w) {
                    self.low.insert(v, self.low[v].min(self.index[w]));
                }
            }
            if self.low[v] == self.index[v] {
                let at = self.stack.iter().position(|&s| s == v).unwrap();
                let scc: Vec<String> = self.stack.drain(at..).map(str::to_owned).collect();
                if scc.len() > 1 {
                    self.out.push(scc);
                }
            }
        }
    }
    let mut t = Tarjan {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out
}

fn assert_acyclic(krate: &str) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(krate)
        .join("src");
    let g = graph(&src);
    assert!(g.len() > 10, "{}: read {} modules", src.display(), g.len());
    let found = cycles(&g);
    let edges = |scc: &Vec<String>| -> Vec<String> {
        scc.iter()
            .flat_map(|m| {
                g[m].iter()
                    .filter(|n| scc.contains(n))
                    .map(move |n| format!("{m} -> {n}"))
            })
            .collect()
    };
    assert!(
        found.is_empty(),
        "import cycles in {krate}: {:#?}",
        found.iter().map(edges).collect::<Vec<_>>()
    );
}

#[test]
fn the_builder_has_no_import_cycle() {
    assert_acyclic("builder");
}

/// `builder/src/host/` is the bottom layer: of the modules above it, it
/// uses only the pure `fstab` parser (mountinfo's unescaping).
#[test]
fn the_host_tools_use_nothing_above_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("builder/src");
    let g = graph(&src);
    let above: Vec<&String> = g["host"].iter().filter(|m| *m != "fstab").collect();
    assert!(above.is_empty(), "builder/src/host uses {above:?}");
}

#[test]
fn vmtest_has_no_import_cycle() {
    assert_acyclic("vmtest");
}

/// The reader finds a cycle where there is one, in a group import too.
#[test]
fn a_cycle_is_found() {
    let names: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
    assert_eq!(
        named(&code("use crate::{b::X, c};\n// crate::a\n"), &names),
        ["b", "c"].map(String::from).into()
    );
    let g: Graph = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(m, d)| (m.to_owned(), d.into_iter().map(String::from).collect()))
    .collect();
    let mut found = cycles(&g);
    assert_eq!(found.len(), 1);
    found[0].sort();
    assert_eq!(found[0], ["a", "b", "c"]);
}
