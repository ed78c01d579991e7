//! The agent crate's modules form layers without import circles: `model` (what trains) and
//! `data` (what it trains on) know nothing of each other or of anything above them; the site
//! joins them; the round state machine decides; the session drives it. Checked from the
//! sources: every `crate::<module>` a top-level module names in code (not in comments, where
//! a link may point up) is an edge.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Top-level module → the top-level modules it names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let text: String = std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let edges = graph.entry(module.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                edges.insert(name);
            }
        }
    }
    graph
}

/// A cycle through `from`, if there is one.
fn cycle(
    graph: &BTreeMap<String, BTreeSet<String>>,
    from: &str,
    path: &mut Vec<String>,
) -> Option<Vec<String>> {
    if let Some(at) = path.iter().position(|m| m == from) {
        let mut c = path[at..].to_vec();
        c.push(from.to_string());
        return Some(c);
    }
    path.push(from.to_string());
    for next in graph.get(from).into_iter().flatten() {
        if let Some(c) = cycle(graph, next, path) {
            return Some(c);
        }
    }
    path.pop();
    None
}

#[test]
fn the_agent_modules_import_each_other_without_a_circle() {
    let graph = graph();
    for module in graph.keys() {
        if let Some(c) = cycle(&graph, module, &mut Vec::new()) {
            panic!("import circle: {}", c.join(" → "));
        }
    }
}

#[test]
fn the_model_and_data_layers_depend_on_nothing_above_them() {
    let graph = graph();
    for (layer, allowed) in [
        ("model", &[][..]),
        ("data", &[][..]),
        // The site's privacy budget sits under the site, over the model (DP-SGD).
        ("privacy", &["model"][..]),
        ("site", &["model", "data", "privacy"][..]),
    ] {
        let uses = &graph[layer];
        let above: Vec<&String> = uses
            .iter()
            .filter(|m| !allowed.contains(&m.as_str()))
            .collect();
        assert!(above.is_empty(), "{layer} imports {above:?}");
    }
    // The round state machine is below its driver.
    assert!(!graph["round"].contains("session"), "{:?}", graph["round"]);
}
