//! The package itself: the files a new machine needs, a `template.env` that
//! lists every configuration variable of the README's "Configuration" table, and
//! documentation that cites only files the repository holds.

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
        "bench/Cargo.toml",
        "docs/ARCHITECTURE.md",
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

/// Every file git tracks, as text (binary files are skipped).
fn tracked_text_files() -> Vec<(String, String)> {
    let listing = std::process::Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(ROOT)
        .output()
        .expect("git ls-files");
    assert!(listing.status.success(), "git ls-files failed");
    listing
        .stdout
        .split(|&b| b == 0)
        .filter(|name| !name.is_empty())
        .filter_map(|name| {
            let name = String::from_utf8_lossy(name).into_owned();
            let text = std::fs::read_to_string(Path::new(ROOT).join(&name)).ok()?;
            Some((name, text))
        })
        .collect()
}

#[test]
fn nothing_cites_a_file_the_repository_does_not_hold() {
    // The design notes this project started from live outside the repository;
    // the code points to README.md and docs/ARCHITECTURE.md instead.
    let outside = ["DESIGN", ".md"].concat();
    let citing: Vec<String> = tracked_text_files()
        .into_iter()
        .filter(|(_, text)| text.contains(&outside))
        .map(|(name, _)| name)
        .collect();
    assert!(citing.is_empty(), "{citing:?} cite {outside}");

    // Relative Markdown links in the docs point at files that exist.
    for doc in [
        "README.md",
        "docs/ARCHITECTURE.md",
        "PERFORMANCE.md",
        "fuzz/README.md",
    ] {
        let path = Path::new(ROOT).join(doc);
        let text = std::fs::read_to_string(&path).expect("read doc");
        for target in text
            .split("](")
            .skip(1)
            .filter_map(|rest| rest.split(')').next())
        {
            let target = target.split('#').next().unwrap_or_default();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let linked = path.parent().expect("doc has a folder").join(target);
            assert!(
                linked.exists(),
                "{doc} links to {target}, which does not exist"
            );
        }
    }
}
