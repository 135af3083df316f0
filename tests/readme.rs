//! The README shows whole programs that are compiled: its Rust snippets are
//! doc tests, and its test example is `tests/readme_test_server.rs`, word for
//! word.

#[test]
fn the_readme_shows_the_test_server_example_as_it_is_compiled() {
    let readme = include_str!("../README.md");
    let example = include_str!("readme_test_server.rs");
    assert!(
        readme.contains(example),
        "README.md must hold tests/readme_test_server.rs verbatim"
    );
}

#[test]
fn the_readme_snippets_hide_no_lines() {
    // Hidden doc-test lines (`# ...`) show as text on GitHub and crates.io,
    // and a pasted snippet would not compile.
    let readme = include_str!("../README.md");
    let mut in_rust = false;
    for line in readme.lines() {
        if line.starts_with("```") {
            in_rust = line.starts_with("```rust");
            continue;
        }
        assert!(
            !(in_rust && (line.trim_start().starts_with("# ") || line.trim() == "#")),
            "a hidden line in a README snippet: {line}"
        );
    }
}
