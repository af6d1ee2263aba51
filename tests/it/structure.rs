//! The source tree's shape: no two modules of `src/` import each other, directly or through
//! others. A helper two modules need lives below both (issue 18); this keeps it so.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `src/a/b.rs` and `src/a/b/mod.rs` are module `a::b`; `lib.rs` and `main.rs` the root "".
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments and without its `#[cfg(test)] mod tests` (tests
/// may reach anywhere).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path that starts with `prefix` (`crate::` or `super::`) in `code`, as segments,
/// with `use` groups expanded: `crate::store::{rules, version::Tags}` gives
/// `store::rules` and `store::version::Tags`.
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    for (at, _) in code.match_indices(prefix) {
        if code[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        expand(&code[at + prefix.len()..], Vec::new(), &mut paths);
    }
    paths
}

fn expand(rest: &str, mut head: Vec<String>, out: &mut Vec<Vec<String>>) {
    let end = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(rest.len());
    head.extend(
        rest[..end]
            .split("::")
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
    );
    let after = &rest[end..];
    if !(rest[..end].ends_with("::") && after.starts_with('{')) {
        out.push(head);
        return;
    }
    // The group's items, split at its top-level commas.
    let (mut depth, mut item_start) = (0, 1);
    for (i, c) in after.char_indices() {
        match c {
            '{' => depth += 1,
            '}' | ',' if depth == 1 => {
                expand(after[item_start..i].trim_start(), head.clone(), out);
                item_start = i + 1;
                if c == '}' {
                    return;
                }
            }
            '}' => depth -= 1,
            _ => {}
        }
    }
}

/// Which module each module imports, by the longest module prefix of each `crate::` path.
/// A module's use of its own ancestors (`crate::store` from `store::redis`) is not an edge:
/// a parent owns its children.
fn import_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeMap<String, PathBuf> = files
        .iter()
        .map(|f| (module_of(src, f), f.clone()))
        .collect();
    let mut graph = BTreeMap::new();
    for (module, file) in &modules {
        let code = code(&std::fs::read_to_string(file).unwrap());
        let parent: Vec<String> = match module.rsplit_once("::") {
            Some((parent, _)) => parent.split("::").map(str::to_owned).collect(),
            None => Vec::new(),
        };
        let from_super = paths_after(&code, "super::").into_iter().map(|path| {
            let mut full = parent.clone();
            full.extend(path);
            full
        });
        let mut targets = BTreeSet::new();
        for path in paths_after(&code, "crate::").into_iter().chain(from_super) {
            let target = (1..=path.len())
                .rev()
                .map(|n| path[..n].join("::"))
                .find(|candidate| modules.contains_key(candidate));
            if let Some(target) = target {
                let ancestor = module.starts_with(&format!("{target}::"));
                if &target != module && !ancestor {
                    targets.insert(target);
                }
            }
        }
        graph.insert(module.clone(), targets);
    }
    graph
}

/// The modules from which `start` is reachable again, if any: one cycle through it.
fn cycle_through(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_owned(), vec![start.to_owned()])];
    let mut seen = BTreeSet::new();
    while let Some((module, path)) = stack.pop() {
        for next in graph.get(&module).into_iter().flatten() {
            if next == start {
                return Some(path);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push((next.clone(), longer));
            }
        }
    }
    None
}

#[test]
fn no_module_of_src_imports_itself_through_others() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = import_graph(&src);
    assert!(graph.len() > 30, "modules found: {:?}", graph.keys());
    // Plain, grouped and `super::` imports are all seen.
    assert!(
        graph["http::task"].contains("http::conditional"),
        "{graph:?}"
    );
    assert!(
        graph["identity::metastore"].contains("identity::tls"),
        "{graph:?}"
    );
    assert!(graph["http::admin"].contains("store::rules"), "{graph:?}");
    let cycles: Vec<Vec<String>> = graph
        .keys()
        .filter_map(|module| cycle_through(&graph, module))
        .collect();
    assert!(cycles.is_empty(), "import cycles: {cycles:?}");
}

/// The checker itself finds a cycle where there is one, and reads `use` groups.
#[test]
fn the_cycle_check_finds_a_cycle() {
    let paths = paths_after("use crate::store::{rules, version::{Tags, X}};", "crate::");
    assert_eq!(
        paths,
        [
            vec!["store", "rules"],
            vec!["store", "version", "Tags"],
            vec!["store", "version", "X"]
        ]
    );
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(m, to)| (m.to_owned(), to.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(
        cycle_through(&graph, "a"),
        Some(vec!["a".to_owned(), "b".to_owned(), "c".to_owned()])
    );
    assert_eq!(cycle_through(&graph, "d"), None);
}
