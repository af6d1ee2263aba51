//! Day-two operations (issue 17): the README's shell recipes run as written against a
//! real gateway, and the binary's own checks that an operator relies on.

mod common;
mod gateway;

use std::process::Command;

use gateway::{unique, Backend, Gateway};
use serde_json::json;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

/// The README's compare-and-set recipe (from its comment to the end of its `sh` block),
/// split before its write so that another writer can be slipped in between the read and
/// the write.
fn compare_and_set_recipe(base: &str) -> (String, String) {
    let readme = readme();
    let section = readme
        .split("### Optimistic concurrency")
        .nth(1)
        .expect("the README's optimistic concurrency section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let recipe = &block[block.find("# Compare-and-set").expect("the recipe")..];
    let write_at = recipe
        .rfind("\ncurl -si -X PUT")
        .expect("the recipe's write")
        + 1;
    let local = |text: &str| text.replace("http://127.0.0.1:8080", base);
    (local(&recipe[..write_at]), local(&recipe[write_at..]))
}

/// Runs the recipe with `between` (shell) between its read and its write; the status
/// line of the recipe's write.
fn run_recipe(gw: &Gateway, token: &str, asset: &str, between: &str) -> String {
    let (read, write) = compare_and_set_recipe(&gw.base);
    let script = format!("set -eu\n{read}\n{between}\n{write}");
    let output = Command::new("bash")
        .args(["-c", &script])
        .env("TOKEN", token)
        .env("A", asset)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    stdout.lines().next().unwrap_or_default().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_compare_and_set_recipe_never_overwrites_a_concurrent_write() {
    let gw = Gateway::start(Backend::Memory).await;
    let ti = gw.task().await;
    let name = unique("orders");
    gw.pg
        .insert_asset(&name, &format!("s3://bucket/{name}"), true)
        .await;
    let path = format!("/execution/store/asset/by-name/value?name={name}&key=watermark");
    let other_writer = format!(
        "curl -sf -o /dev/null -X PUT -H \"Authorization: Bearer $TOKEN\" \
         -H 'Content-Type: application/json' -d '{{\"value\": \"other\"}}' '{}{path}'",
        gw.base
    );
    let value = || async { gw.get(&path, &ti.token).await.body["value"].clone() };

    // No key yet, and another worker creates it between the read and the write.
    let status = tokio::task::block_in_place(|| run_recipe(&gw, &ti.token, &name, &other_writer));
    assert!(status.contains("412"), "{status}");
    assert_eq!(value().await, json!("other"));

    // The key exists and nobody writes in between: the write applies.
    let status = tokio::task::block_in_place(|| run_recipe(&gw, &ti.token, &name, ":"));
    assert!(status.contains("204"), "{status}");
    assert_eq!(value().await, json!("2026-05-01"));

    // The key exists and another worker writes in between: refused.
    let status = tokio::task::block_in_place(|| run_recipe(&gw, &ti.token, &name, &other_writer));
    assert!(status.contains("412"), "{status}");
    assert_eq!(value().await, json!("other"));

    // No key and nobody in between: created.
    gw.delete(&path, &ti.token).await;
    let status = tokio::task::block_in_place(|| run_recipe(&gw, &ti.token, &name, ":"));
    assert!(status.contains("204"), "{status}");
    assert_eq!(value().await, json!("2026-05-01"));
}

#[test]
fn the_license_file_is_the_one_cargo_toml_names() {
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    assert!(manifest.contains("license = \"Apache-2.0\""));
    let license = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/LICENSE")).unwrap();
    let words: Vec<&str> = license.split_whitespace().collect();
    assert_eq!(words[..4], ["Apache", "License", "Version", "2.0,"]);
    // The full text: its nine sections and the appendix, not just a header.
    assert!(license.contains("9. Accepting Warranty or Additional Liability."));
    assert!(license.contains("APPENDIX: How to apply the Apache License to your work."));
}
