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
