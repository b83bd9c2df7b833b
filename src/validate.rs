//! `order-service validate`: the domain's verdict on every document of a file.

use std::io::{BufRead, BufReader, Write};
use std::ops::ControlFlow;

use serde_json::json;

use crate::cli::ValidateArgs;
use crate::documents::{for_each_document, Document, Format};
use crate::domain::{parse_order, Limits, Rejection};

/// Exit status: 0 all valid, 1 some invalid, 2 usage or I/O error.
pub fn run(args: &ValidateArgs, limits: &Limits) -> u8 {
    let input: Box<dyn BufRead> = match args.input.as_deref() {
        None => Box::new(std::io::stdin().lock()),
        Some(path) if path.as_os_str() == "-" => Box::new(std::io::stdin().lock()),
        Some(path) => match std::fs::File::open(path) {
            Ok(file) => Box::new(BufReader::new(file)),
            Err(e) => {
                eprintln!("error: cannot open {}: {e}", path.display());
                return 2;
            }
        },
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let (mut valid, mut invalid, mut position) = (0u64, 0u64, 0u64);
    let mut write_error = None;
    let format = args
        .format
        .or_else(|| args.input.as_deref().and_then(Format::of_path));
    let read = for_each_document(input, format, limits.max_message_bytes, |doc| {
        position += 1;
        let verdict = match doc {
            Document::Bytes(bytes) => parse_order(bytes, limits),
            // Skipped unread, so memory stays bounded whatever the input.
            Document::TooLarge { bytes } => {
                Err(Rejection::too_large(bytes, limits.max_message_bytes))
            }
        };
        let line = match verdict {
            Ok(order) => {
                valid += 1;
                if args.json {
                    json!({ "position": position, "valid": true, "order_uid": order.uid() })
                        .to_string()
                } else {
                    format!("#{position} ok {}", order.uid())
                }
            }
            Err(rejection) => {
                invalid += 1;
                if args.json {
                    json!({
                        "position": position,
                        "valid": false,
                        "stage": rejection.stage().as_str(),
                        "reasons": rejection.reasons(),
                    })
                    .to_string()
                } else {
                    format!("#{position} invalid {rejection}")
                }
            }
        };
        match writeln!(out, "{line}") {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                write_error = Some(e);
                ControlFlow::Break(())
            }
        }
    });
    let summary = if args.json {
        json!({ "valid": valid, "invalid": invalid }).to_string()
    } else {
        format!("{valid} valid, {invalid} invalid")
    };
    let flushed = writeln!(out, "{summary}").and_then(|()| out.flush());
    if let Some(e) = write_error.or(flushed.err()) {
        eprintln!("error: cannot write the report: {e}");
        return 2;
    }
    match read {
        Ok(summary) if summary.blank_lines > 0 => {
            eprintln!("{} blank lines skipped", summary.blank_lines);
        }
        Ok(_) => {}
        Err(e) => {
            eprintln!("error: reading input after document #{position}: {e}");
            return 2;
        }
    }
    u8::from(invalid > 0)
}
