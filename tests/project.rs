//! The package itself (issue 2 item 1): the files a new machine needs, and a
//! `template.env` that lists every configuration variable of the README's
//! "Configuration" table.

use std::path::Path;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn project_files_exist() {
    for path in [
        "Cargo.toml",
        "src/main.rs",
        "src/lib.rs",
        "README.md",
        "template.env",
        ".ci/run",
        "Dockerfile",
        "fuzz",
    ] {
        assert!(Path::new(ROOT).join(path).exists(), "{path} is missing");
    }
}

#[test]
fn template_env_lists_every_variable() {
    let template =
        std::fs::read_to_string(Path::new(ROOT).join("template.env")).expect("read template.env");
    let variables = ws_notify::config::VARIABLES;
    let missing: Vec<&str> = variables
        .iter()
        .copied()
        .filter(|v| {
            !template.lines().any(|l| {
                l.trim_start_matches(['#', ' '])
                    .starts_with(&format!("{v}="))
            })
        })
        .collect();
    assert!(missing.is_empty(), "template.env does not list {missing:?}");
}
