//! The module graph points one way. Each top-level module of `src/` sits in a layer and may use
//! only modules in layers below it (and its own submodules); a `use crate::…` (or any
//! `crate::name` path) that points sideways or upwards fails this test, and so does any import
//! cycle between top-level modules. The layers are the module map of `docs/architecture.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top to bottom. A module may depend on modules in later entries only.
const LAYERS: &[&[&str]] = &[
    &["main", "cli"],
    &["demo"],
    &["gateway"],
    &["config"],
    &["proxy", "admin"],
    &["error"],
    &["connect"],
    &["callers", "tokens"],
    &["events"],
    &["store", "sim"],
    &[
        "telemetry",
        "secret",
        "clock",
        "server_thread",
        "metrics",
        "html",
        "allocator",
    ],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// The top-level modules named by `crate::<name>` in `text` (comments included: a doc link to
/// a module above is a dependency in the reader's head too).
fn crate_references(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        // `finx_gateway::crate::` never occurs; `$crate::` is a macro's own crate.
        if text[..at].ends_with('$') {
            continue;
        }
        let name: String = text[at + "crate::".len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if modules.contains(&name) {
            found.insert(name);
        }
    }
    found
}

/// Top-level module → the top-level modules it uses.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let module_of = |path: &Path| -> Option<String> {
        let relative = path.strip_prefix(&src).ok()?;
        let first = relative.components().next()?.as_os_str().to_str()?;
        let name = first.trim_end_matches(".rs");
        (name != "lib").then(|| name.to_owned())
    };
    let modules: BTreeSet<String> = files.iter().filter_map(|p| module_of(p)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let Some(module) = module_of(file) else {
            continue;
        };
        let text = std::fs::read_to_string(file).expect("readable source");
        let uses = crate_references(&text, &modules);
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(uses.into_iter().filter(|used| *used != module));
    }
    graph
}

#[test]
fn every_top_level_module_has_a_layer() {
    let unplaced: Vec<_> = module_graph()
        .into_keys()
        .filter(|module| layer_of(module).is_none())
        .collect();
    assert!(
        unplaced.is_empty(),
        "place these modules in LAYERS (and in docs/architecture.md's module map): {unplaced:?}"
    );
}

#[test]
fn modules_only_use_modules_below_them() {
    let mut upward = Vec::new();
    for (module, uses) in module_graph() {
        let Some(own) = layer_of(&module) else {
            continue;
        };
        for used in uses {
            if layer_of(&used).is_none_or(|layer| layer <= own) {
                upward.push(format!("{module} -> {used}"));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that point sideways or upwards: {upward:#?}"
    );
}

#[test]
fn there_is_no_import_cycle_between_top_level_modules() {
    let graph = module_graph();
    // Depth-first search with colours; a grey node met again closes a cycle.
    fn visit<'g>(
        node: &'g str,
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<&'g str, bool>,
        path: &mut Vec<&'g str>,
    ) -> Option<Vec<String>> {
        match state.get(node) {
            Some(true) => return None,
            Some(false) => {
                let start = path.iter().position(|n| *n == node).unwrap_or(0);
                let mut cycle: Vec<String> = path[start..].iter().map(|n| n.to_string()).collect();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        state.insert(node, false);
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, state, path) {
                return Some(cycle);
            }
        }
        path.pop();
        state.insert(node, true);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        let cycle = visit(node, &graph, &mut state, &mut Vec::new());
        assert!(
            cycle.is_none(),
            "import cycle: {}",
            cycle.unwrap().join(" -> ")
        );
    }
}

#[test]
fn the_checker_sees_references() {
    let modules: BTreeSet<String> = ["proxy", "store"].map(String::from).into();
    let found = crate_references(
        "use crate::store::X;\n/// [`crate::proxy`]\n$crate::proxy\ncrate::other",
        &modules,
    );
    assert_eq!(found, ["proxy", "store"].map(String::from).into());
}
