//! Bad input is refused before anything is set up: a non-zero exit, exactly one line on
//! stderr naming the problem, and nothing left behind. Run in a world's uplink all the same,
//! so that nothing here ever touches the machine's own namespace.

mod common;

use common::*;

/// Runs `portcullis run ARGS -- CMD` in a fresh world (`args` may write files into the world's
/// run directory) and checks what every refusal shares: exit `code`, nothing on stdout,
/// exactly one line on stderr, no residue and no lookup. Returns the line.
fn refused(args: impl FnOnce(&World) -> Vec<String>, cmd: &[&str], code: i32) -> String {
    let world = World::new(&Zone::new().a("x.test", [198, 51, 100, 10], 300));
    let args = args(&world);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let before = residue(&world);
    let out = run(&world, &args, cmd);
    assert_eq!(out.status.code(), Some(code));
    assert_eq!(stdout(&out), "");
    let err = stderr(&out);
    assert_eq!(
        err.lines().count(),
        1,
        "exactly one line on stderr: {err:?}"
    );
    assert!(err.ends_with('\n'));
    assert_eq!(
        residue(&world),
        before,
        "a refused run left something behind"
    );
    assert!(world.dns_log().is_empty(), "a refused run resolved names");
    err
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

#[test]
fn malformed_pattern() {
    let err = refused(|_| strings(&["--allow", "ex*ample.com"]), &["true"], 2);
    assert!(err.starts_with("portcullis: "), "{err}");
    assert!(err.contains("\"ex*ample.com\""), "names the pattern: {err}");
}

#[test]
fn malformed_policy_file_points_at_file_line_and_column() {
    let mut path = String::new();
    let err = refused(
        |world| {
            let file = world.run_dir().join("policy.toml");
            std::fs::write(&file, "version = 1\n\n[[allow]\ndomain = \"x.test\"\n").unwrap();
            path = file.to_str().unwrap().to_owned();
            strings(&["--policy", &path])
        },
        &["true"],
        2,
    );
    // Line 3, column 9: where `[[allow]` lacks its second `]`.
    assert!(
        err.starts_with(&format!("portcullis: {path}:3:9: ")),
        "file:line:column of the syntax error: {err}"
    );
}

#[test]
fn bad_upstream_address() {
    let err = refused(
        |_| strings(&["--allow", "x.test", "--upstream-dns", "not-an-address"]),
        &["true"],
        2,
    );
    assert!(
        err.contains("upstream DNS address \"not-an-address\""),
        "{err}"
    );
}

#[test]
fn missing_cmd_is_a_usage_error() {
    let err = refused(|_| strings(&["--allow", "x.test"]), &[], 2);
    assert!(err.contains("<CMD>"), "names what is missing: {err}");
}

#[test]
fn cmd_not_found() {
    let err = refused(
        |_| strings(&["--allow", "x.test"]),
        &["no-such-command-pc7"],
        127,
    );
    assert_eq!(err, "portcullis: command not found: no-such-command-pc7\n");
}
