//! Reads a stream of JSON documents, one at a time, so files of any size use
//! bounded memory. The layout is decided once per input (see [`Format`]):
//! NDJSON is one document per line and a line is never joined to the next;
//! an array or a run of concatenated documents is read with serde_json's
//! streaming deserializer.

use std::cell::Cell;
use std::fmt;
use std::io::{BufRead, Cursor, Read};
use std::ops::ControlFlow;
use std::path::Path;
use std::rc::Rc;

use serde::de::{Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// How the documents of an input are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One document per line; blank lines are skipped
    Ndjson,
    /// One JSON array of documents
    Array,
    /// Documents one after another, each over any number of lines
    Concatenated,
}

impl Format {
    /// The format a file name declares: `.ndjson` and `.jsonl` are NDJSON.
    pub fn of_path(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()? {
            "ndjson" | "jsonl" => Some(Self::Ndjson),
            _ => None,
        }
    }
}

/// One document of the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Document<'a> {
    Bytes(&'a [u8]),
    /// Longer than the limit: skipped, only its length is known.
    TooLarge {
        bytes: u64,
    },
}

/// What was read besides the documents.
#[derive(Debug, PartialEq, Eq)]
pub struct Summary {
    pub format: Format,
    /// NDJSON lines holding nothing but white space, skipped.
    pub blank_lines: u64,
}

const BYTE_ORDER_MARK: &[u8] = b"\xef\xbb\xbf";

/// Calls `each` with every document, in order, until it breaks.
///
/// Without a declared format, a leading `[` makes an array; a first line that
/// is a whole JSON value, or is not the start of one that continues on the
/// next lines, makes NDJSON; otherwise the documents are concatenated.
///
/// An NDJSON line that is not JSON is still a document (for the caller to
/// judge), and a line over `max_bytes` is measured and skipped. An array or a
/// concatenated stream cannot be read past a document that is not well-formed
/// or is over `max_bytes`: that is an error.
pub fn for_each_document<R: BufRead>(
    mut reader: R,
    declared: Option<Format>,
    max_bytes: usize,
    mut each: impl FnMut(Document<'_>) -> ControlFlow<()>,
) -> std::io::Result<Summary> {
    // A UTF-8 byte order mark that an editor put first is the file's, not
    // the first document's; left there it would hide a leading `[`.
    if reader.fill_buf()?.starts_with(BYTE_ORDER_MARK) {
        reader.consume(BYTE_ORDER_MARK.len());
    }
    let (format, seen) = match declared {
        Some(format) => (format, Vec::new()),
        None => detect(&mut reader, max_bytes)?,
    };
    let reader = Cursor::new(seen).chain(reader);
    let mut blank_lines = 0;
    match format {
        Format::Ndjson => for_each_line(reader, max_bytes, &mut blank_lines, &mut each)?,
        Format::Array => for_each_element(reader, max_bytes, &mut each)?,
        Format::Concatenated => for_each_value(reader, max_bytes, &mut each)?,
    }
    Ok(Summary {
        format,
        blank_lines,
    })
}

/// Reads lines until the layout is known; returns it with the bytes read.
fn detect(reader: &mut impl BufRead, max_bytes: usize) -> std::io::Result<(Format, Vec<u8>)> {
    let mut seen = Vec::new();
    // Reads the next line that is not blank; false at the end of the input
    // or of the bytes a document may take.
    let mut next_line = |seen: &mut Vec<u8>| -> std::io::Result<bool> {
        loop {
            let before = seen.len();
            let room = (max_bytes + 1).saturating_sub(before) as u64;
            if reader.take(room).read_until(b'\n', seen)? == 0 {
                return Ok(false);
            }
            if !seen[before..].trim_ascii().is_empty() {
                return Ok(true);
            }
        }
    };
    if !next_line(&mut seen)? {
        return Ok((Format::Ndjson, seen));
    }
    let first = seen.trim_ascii();
    let opens_array = first.first() == Some(&b'[');
    if serde_json::from_slice::<IgnoredAny>(first).is_ok() {
        // A whole array on one line is an array file only if nothing follows it.
        let format = if opens_array && !next_line(&mut seen)? {
            Format::Array
        } else {
            Format::Ndjson
        };
        return Ok((format, seen));
    }
    if opens_array {
        return Ok((Format::Array, seen));
    }
    // The first document goes on over the next lines, or the first line is broken.
    while next_line(&mut seen)? {
        match serde_json::from_slice::<IgnoredAny>(seen.trim_ascii()) {
            Ok(_) => return Ok((Format::Concatenated, seen)),
            Err(e) if e.is_eof() => {}
            Err(_) => break,
        }
    }
    Ok((Format::Ndjson, seen))
}

fn for_each_line(
    mut reader: impl BufRead,
    max_bytes: usize,
    blank_lines: &mut u64,
    each: &mut impl FnMut(Document<'_>) -> ControlFlow<()>,
) -> std::io::Result<()> {
    let mut line = Vec::new();
    loop {
        line.clear();
        // One byte over the limit is enough to know a line is too long.
        let limit = max_bytes as u64 + 1;
        if (&mut reader).take(limit).read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let document = if line.len() > max_bytes && line.last() != Some(&b'\n') {
            let rest = skip_line(&mut reader)?;
            Document::TooLarge {
                bytes: line.len() as u64 + rest,
            }
        } else {
            match line.trim_ascii() {
                [] => {
                    *blank_lines += 1;
                    continue;
                }
                text => Document::Bytes(text),
            }
        };
        if each(document).is_break() {
            return Ok(());
        }
    }
}

/// Consumes the rest of a line and its newline; returns the length without it.
fn skip_line(reader: &mut impl BufRead) -> std::io::Result<u64> {
    let mut skipped = 0;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(skipped);
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                return Ok(skipped + i as u64);
            }
            None => {
                let n = buf.len();
                reader.consume(n);
                skipped += n as u64;
            }
        }
    }
}

fn for_each_element(
    reader: impl Read,
    max_bytes: usize,
    each: &mut impl FnMut(Document<'_>) -> ControlFlow<()>,
) -> std::io::Result<()> {
    let read = Rc::new(Cell::new(0));
    let mut de = serde_json::Deserializer::from_reader(Metered {
        inner: reader,
        read: Rc::clone(&read),
        limit: max_bytes as u64,
    });
    let in_array = |e| invalid_data("JSON array", e);
    let stopped = de
        .deserialize_seq(EachElement { each, read })
        .map_err(in_array)?;
    if stopped.is_continue() {
        de.end().map_err(in_array)?;
    }
    Ok(())
}

fn for_each_value(
    reader: impl Read,
    max_bytes: usize,
    each: &mut impl FnMut(Document<'_>) -> ControlFlow<()>,
) -> std::io::Result<()> {
    let read = Rc::new(Cell::new(0));
    let values = serde_json::Deserializer::from_reader(Metered {
        inner: reader,
        read: Rc::clone(&read),
        limit: max_bytes as u64,
    })
    .into_iter::<Box<RawValue>>();
    for value in values {
        let value = value.map_err(|e| invalid_data("concatenated JSON", e))?;
        if each(Document::Bytes(value.get().as_bytes())).is_break() {
            break;
        }
        read.set(0);
    }
    Ok(())
}

fn invalid_data(layout: &str, e: serde_json::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{layout}: {e}"))
}

/// Counts what passes through, and fails once the count is over the limit.
struct Metered<R> {
    inner: R,
    read: Rc<Cell<u64>>,
    limit: u64,
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.read.get() > self.limit {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a document is over the limit of {} bytes", self.limit),
            ));
        }
        let n = self.inner.read(buf)?;
        self.read.set(self.read.get() + n as u64);
        Ok(n)
    }
}

struct EachElement<'f, F> {
    each: &'f mut F,
    /// Bytes read since the current element began.
    read: Rc<Cell<u64>>,
}

impl<'de, F: FnMut(Document<'_>) -> ControlFlow<()>> Visitor<'de> for EachElement<'_, F> {
    type Value = ControlFlow<()>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of orders")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        self.read.set(0);
        while let Some(element) = seq.next_element::<Box<RawValue>>()? {
            if (self.each)(Document::Bytes(element.get().as_bytes())).is_break() {
                return Ok(ControlFlow::Break(()));
            }
            self.read.set(0);
        }
        Ok(ControlFlow::Continue(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each document as text, or `too large: N` for a skipped one, and the
    /// error that ended the read, if any.
    fn read(
        input: &str,
        format: Option<Format>,
        max_bytes: usize,
    ) -> (Vec<String>, Option<String>) {
        let mut out = Vec::new();
        let result = for_each_document(input.as_bytes(), format, max_bytes, |doc| {
            out.push(match doc {
                Document::Bytes(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                Document::TooLarge { bytes } => format!("too large: {bytes}"),
            });
            ControlFlow::Continue(())
        });
        (out, result.err().map(|e| e.to_string()))
    }

    fn detected(input: &str) -> Format {
        for_each_document(input.as_bytes(), None, 1000, |_| ControlFlow::Continue(()))
            .unwrap()
            .format
    }

    const FIRST: &str = r#"{"order_uid":"first","n":1}"#;
    const LAST: &str = r#"{"order_uid":"last","n":2}"#;

    /// Lines that are not one whole document, each a kind seen in real inputs.
    const BROKEN_LINES: &[&str] = &[
        "{",
        "}",
        "[",
        "]",
        r#"{"order_uid":"#,
        r#"{"order_uid":"cut"#,
        "not json",
        r#"{"a":1} {"b":2}"#,
        "\u{fffd}\u{0}binary",
        r#""an unterminated string"#,
    ];

    /// Documents that are well-formed JSON but no order.
    const ODD_VALUES: &[&str] = &[
        "{}",
        "[]",
        "null",
        "42",
        r#""text""#,
        r#"{"a":[1,{"b":null}]}"#,
    ];

    #[test]
    fn ndjson_never_joins_a_line_to_its_neighbours() {
        for hostile in BROKEN_LINES.iter().chain(ODD_VALUES) {
            let input = format!("{FIRST}\n{hostile}\n{LAST}\n");
            for format in [None, Some(Format::Ndjson)] {
                let (docs, error) = read(&input, format, 1000);
                assert_eq!(docs, [FIRST, *hostile, LAST], "{hostile:?} with {format:?}");
                assert_eq!(error, None);
            }
            // First in the input, where the layout is decided (a leading `[` opens an array).
            if *hostile == "[" {
                continue;
            }
            let input = format!("{hostile}\n{FIRST}\n{LAST}\n");
            let (docs, error) = read(&input, None, 1000);
            assert_eq!(docs, [*hostile, FIRST, LAST], "{hostile:?} first");
            assert_eq!(error, None);
        }
    }

    #[test]
    fn arrays_and_concatenated_documents_keep_odd_values_apart() {
        let pretty = |s: &str| {
            serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(s).unwrap())
                .unwrap()
        };
        for hostile in ODD_VALUES {
            let array = format!("[\n{},\n{hostile},\n{}\n]\n", pretty(FIRST), pretty(LAST));
            let concatenated = format!("{}\n{hostile}\n{}\n", pretty(FIRST), pretty(LAST));
            for (input, format) in [(array, Format::Array), (concatenated, Format::Concatenated)] {
                for declared in [None, Some(format)] {
                    let (docs, error) = read(&input, declared, 1000);
                    assert_eq!(error, None, "{hostile:?} in {format:?}");
                    let docs: Vec<serde_json::Value> = docs
                        .iter()
                        .map(|d| serde_json::from_str(d).unwrap())
                        .collect();
                    let expected: Vec<serde_json::Value> = [FIRST, hostile, LAST]
                        .iter()
                        .map(|d| serde_json::from_str(d).unwrap())
                        .collect();
                    assert_eq!(docs, expected, "{hostile:?} in {format:?}");
                }
            }
        }
    }

    #[test]
    fn a_broken_document_ends_an_array_or_concatenated_stream_with_an_error() {
        for hostile in BROKEN_LINES.iter().filter(|h| !["[", "]"].contains(h)) {
            let array = format!("[{FIRST},\n{hostile},\n{LAST}]");
            let (docs, error) = read(&array, None, 1000);
            assert!(error.is_some(), "{hostile:?} in an array");
            assert!(!docs.contains(&LAST.to_owned()), "{docs:?}");
            if *hostile == r#"{"a":1} {"b":2}"# {
                continue; // two documents, well-formed when concatenated
            }

            let concatenated = format!("{{\n\"a\": 1\n}}\n{hostile}\n{LAST}\n");
            let (docs, error) = read(&concatenated, Some(Format::Concatenated), 1000);
            assert!(error.is_some(), "{hostile:?} concatenated: {docs:?}");
            assert_eq!(docs[0], "{\n\"a\": 1\n}");
        }
        let (_, error) = read(&format!("[{FIRST}] trailing"), None, 1000);
        assert!(error.unwrap().contains("trailing"));
    }

    #[test]
    fn the_layout_is_decided_from_the_name_or_the_start() {
        assert_eq!(
            Format::of_path(Path::new("a/orders.ndjson")),
            Some(Format::Ndjson)
        );
        assert_eq!(
            Format::of_path(Path::new("orders.jsonl")),
            Some(Format::Ndjson)
        );
        assert_eq!(Format::of_path(Path::new("orders.json")), None);
        assert_eq!(detected("\n\n  [1]"), Format::Array);
        assert_eq!(detected(&format!("\n{FIRST}\n{LAST}")), Format::Ndjson);
        assert_eq!(
            detected("{\n  \"a\": 1\n}\n{\"b\": 2}"),
            Format::Concatenated
        );
        assert_eq!(detected("{\n{\"b\": 2}"), Format::Ndjson);
        assert_eq!(detected("{\n  \"cut\": "), Format::Ndjson);
        assert_eq!(detected(""), Format::Ndjson);
        // A byte order mark first belongs to the file.
        assert_eq!(detected("\u{FEFF}[1]"), Format::Array);
        let (docs, _) = read(&format!("\u{FEFF}{FIRST}\n{LAST}"), None, 1000);
        assert_eq!(docs, [FIRST, LAST]);
        // A declared format is kept whatever the content.
        let (docs, _) = read("{\n  \"a\": 1\n}", Some(Format::Ndjson), 1000);
        assert_eq!(docs, ["{", "\"a\": 1", "}"]);
    }

    #[test]
    fn blank_lines_are_skipped_and_counted() {
        let summary = for_each_document(
            format!("\n{FIRST}\n \n\t\n{LAST}\n\n").as_bytes(),
            None,
            1000,
            |_| ControlFlow::Continue(()),
        )
        .unwrap();
        assert_eq!(
            summary,
            Summary {
                format: Format::Ndjson,
                blank_lines: 4
            }
        );
    }

    #[test]
    fn documents_over_the_limit_are_measured_not_kept() {
        let long = format!("{{\"a\":\"{}\"}}", "x".repeat(100));
        // NDJSON: the long line is skipped to its end, the next one is read.
        let ndjson = format!("{{\"a\":1}}\n{long}\n{{\"b\":2}}");
        assert_eq!(
            read(&ndjson, None, 20).0,
            vec![
                "{\"a\":1}".to_owned(),
                format!("too large: {}", long.len()),
                "{\"b\":2}".to_owned()
            ]
        );
        // First and last in the input, without a newline.
        assert_eq!(
            read(&long, None, 20).0,
            vec![format!("too large: {}", long.len())]
        );
        // Exactly at the limit is not over it.
        assert_eq!(read(&long, None, long.len()).0, vec![long.clone()]);
        // An array or concatenated stream cannot be read past it.
        for input in [
            format!("[{{\"a\":1}}, {long}, {{\"b\":2}}]"),
            format!("{{\n\"a\":1}}\n{long}\n{{\"b\":2}}"),
        ] {
            let (docs, error) = read(&input, None, 20);
            assert_eq!(docs.len(), 1, "{input}");
            let error = error.unwrap();
            assert!(error.contains("over the limit of 20 bytes"), "{error}");
        }
    }
}
