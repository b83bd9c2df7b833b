use std::io::Write;
use std::process::{Child, Command, Stdio};

use crate::helpers::SAMPLE;

/// `order-service validate ARGS`, its input and output piped.
fn validator(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_order-service"))
        .arg("validate")
        .args(args)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn validate(args: &[&str], stdin: &str) -> (Option<i32>, String, String) {
    let mut child = validator(args);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn validate_reports_each_document_and_sets_the_exit_status() {
    let sample: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
    let mut bad = sample.clone();
    bad["delivery"]["email"] = "nope".into();
    bad["payment"]["currency"] = "XYZ".into();
    let ndjson = format!("{sample}\n{bad}\nnot json\n");

    let (code, out, _) = validate(&[], &ndjson);
    assert_eq!(code, Some(1));
    assert_eq!(
        out,
        "#1 ok b563feb7b2b84b6test\n\
         #2 invalid delivery.email: \"nope\" is not an email address; payment.currency: \"XYZ\" is not an ISO 4217 code\n\
         #3 invalid not JSON: expected ident at line 1 column 2\n\
         1 valid, 2 invalid\n"
    );

    let (code, out, _) = validate(&["-", "--json"], &ndjson);
    assert_eq!(code, Some(1));
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines[0],
        serde_json::json!({"position": 1, "valid": true, "order_uid": "b563feb7b2b84b6test"})
    );
    assert_eq!(lines[1]["reasons"].as_array().unwrap().len(), 2);
    assert_eq!(lines[2]["stage"], "parse");
    assert_eq!(lines[3], serde_json::json!({"valid": 1, "invalid": 2}));

    let (code, out, _) = validate(&[], &format!("[{sample}, {sample}]"));
    assert_eq!(code, Some(0));
    assert!(out.ends_with("2 valid, 0 invalid\n"), "{out}");

    let (code, _, err) = validate(&["/no/such/file.json"], "");
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot open /no/such/file.json"), "{err}");
    let (code, _, err) = validate(&[], "[{\"a\": 1}, oops]");
    assert_eq!(code, Some(2));
    assert!(err.contains("JSON array"), "{err}");
}

/// A document over the size limit is measured and skipped, never held: the
/// validator's peak memory stays far below the size of the line.
#[test]
fn an_oversized_line_is_reported_without_being_held_in_memory() {
    const LINE: usize = 100 * 1024 * 1024;
    let mut child = validator(&[]);
    let mut stdin = child.stdin.take().unwrap();
    let chunk = vec![b'x'; 1024 * 1024];
    stdin.write_all(b"{\"order_uid\":\"").unwrap();
    for _ in 0..LINE / chunk.len() {
        stdin.write_all(&chunk).unwrap();
    }
    stdin.flush().unwrap();
    // Still running, waiting for the rest of the line: its peak so far.
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    writeln!(stdin, "\"}}\n{}", SAMPLE.replace('\n', "")).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out,
        format!(
            "#1 invalid message is {} bytes, the limit is 1048576\n\
             #2 ok b563feb7b2b84b6test\n\
             1 valid, 1 invalid\n",
            LINE + 16
        )
    );
    assert!(
        peak_kib < 40 * 1024,
        "peak {peak_kib} KiB for a {LINE}-byte line"
    );
}

/// Two valid orders as one line each, and the same pretty-printed.
fn neighbours() -> ([String; 2], [String; 2]) {
    let first: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
    let mut last = first.clone();
    last["order_uid"] = "neighbour-last".into();
    (
        [first.to_string(), last.to_string()],
        [
            serde_json::to_string_pretty(&first).unwrap(),
            serde_json::to_string_pretty(&last).unwrap(),
        ],
    )
}

/// The JSON verdicts of `validate --json ARGS` on `input`, summary last.
fn verdicts(args: &[&str], input: &str) -> Vec<serde_json::Value> {
    let (code, out, err) = validate(&[&["--json"], args].concat(), input);
    assert_eq!(code, Some(1), "{out}{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn assert_judged_apart(verdicts: &[serde_json::Value], hostile: &str) {
    assert_eq!(verdicts.len(), 4, "{hostile:?}: {verdicts:?}");
    assert_eq!(verdicts[0]["position"], 1);
    assert_eq!(
        verdicts[0]["order_uid"], "b563feb7b2b84b6test",
        "{hostile:?}"
    );
    assert_eq!(verdicts[1]["position"], 2);
    assert_eq!(verdicts[1]["valid"], false, "{hostile:?}");
    assert_eq!(verdicts[2]["position"], 3);
    assert_eq!(verdicts[2]["order_uid"], "neighbour-last", "{hostile:?}");
    assert_eq!(verdicts[3], serde_json::json!({"valid": 2, "invalid": 1}));
}

/// A broken line between two valid orders is judged on its own: NDJSON never
/// joins lines, whether the layout is declared, named by the file or read
/// from the content.
#[test]
fn ndjson_neighbours_of_a_broken_line_keep_their_verdicts() {
    let ([first, last], _) = neighbours();
    let dir = tempfile::tempdir().unwrap();
    for hostile in [
        "{",
        "}",
        "[",
        "{\"order_uid\":",
        "{\"order_uid\":\"cut",
        "not json",
        "{} {}",
        "null",
        "{}",
        "[1, 2]",
    ] {
        let input = format!("{first}\n{hostile}\n{last}\n");
        assert_judged_apart(&verdicts(&[], &input), hostile);
        assert_judged_apart(&verdicts(&["--format", "ndjson"], &input), hostile);
        let file = dir.path().join("orders.jsonl");
        std::fs::write(&file, &input).unwrap();
        assert_judged_apart(&verdicts(&[file.to_str().unwrap()], ""), hostile);
    }
}

/// Well-formed documents that are no order, between two valid ones in an
/// array or a run of pretty-printed documents.
#[test]
fn array_and_concatenated_neighbours_keep_their_verdicts() {
    let (_, [first, last]) = neighbours();
    for hostile in ["null", "42", "\"text\"", "{}", "[]", "{\"order_uid\": 7}"] {
        let array = format!("[\n{first},\n{hostile},\n{last}\n]\n");
        assert_judged_apart(&verdicts(&[], &array), hostile);
        assert_judged_apart(&verdicts(&["--format", "array"], &array), hostile);
        let concatenated = format!("{first}\n{hostile}\n{last}\n");
        assert_judged_apart(&verdicts(&[], &concatenated), hostile);
        let declared = verdicts(&["--format", "concatenated"], &concatenated);
        assert_judged_apart(&declared, hostile);
    }
    // A broken document ends the read with its position; what came before stands.
    let (code, out, err) = validate(&[], &format!("{first}\n{{\n\"cut\": \n{last}\n"));
    assert_eq!(code, Some(2));
    assert!(out.starts_with("#1 ok b563feb7b2b84b6test\n"), "{out}");
    assert!(
        err.contains("after document #1: concatenated JSON"),
        "{err}"
    );
}

#[test]
fn blank_lines_are_skipped_and_counted() {
    let ([first, last], _) = neighbours();
    let (code, out, err) = validate(&[], &format!("\n{first}\n\n  \n{last}\n"));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.ends_with("2 valid, 0 invalid\n"), "{out}");
    assert_eq!(err, "3 blank lines skipped\n");
}
