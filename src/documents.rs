//! Reads a stream of JSON documents, one at a time, from a JSON array or from
//! NDJSON (one document per line), so files of any size use bounded memory:
//! a document longer than the limit is measured and skipped, never kept.

use std::cell::Cell;
use std::fmt;
use std::io::{BufRead, Cursor, Read};
use std::ops::ControlFlow;
use std::rc::Rc;

use serde::de::{Deserialize, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// One document of the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Document<'a> {
    Bytes(&'a [u8]),
    /// Longer than the limit: skipped, only its length is known.
    TooLarge {
        bytes: u64,
    },
}

/// Calls `each` with every document, in order, until it breaks. An NDJSON
/// line that is not JSON is still a document (for the caller to judge); a
/// JSON array that is not well-formed, or holds a document over `max_bytes`,
/// is an error, as the array cannot be read past it.
pub fn for_each_document<R: BufRead>(
    mut reader: R,
    max_bytes: usize,
    mut each: impl FnMut(Document<'_>) -> ControlFlow<()>,
) -> std::io::Result<()> {
    let first = loop {
        let buf = reader.fill_buf()?;
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => {
                let first = buf[i];
                reader.consume(i);
                break Some(first);
            }
            None if buf.is_empty() => break None,
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    };
    match first {
        None => Ok(()),
        Some(b'[') => for_each_element(reader, max_bytes, each),
        Some(_) => {
            let (mut line, mut pending) = (Vec::new(), Vec::new());
            loop {
                line.clear();
                // One byte over the limit is enough to know a line is too long.
                let limit = max_bytes as u64 + 1;
                if (&mut reader).take(limit).read_until(b'\n', &mut line)? == 0 {
                    // An unfinished pretty-printed document is still a document, to be judged.
                    if !pending.is_empty() {
                        let _ = each(Document::Bytes(pending.trim_ascii()));
                    }
                    return Ok(());
                }
                let cut = line.len() > max_bytes && line.last() != Some(&b'\n');
                let document = if pending.is_empty() {
                    let trimmed = line.trim_ascii();
                    if cut {
                        let rest = skip_line(&mut reader)?;
                        Some(Document::TooLarge {
                            bytes: (line.len() as u64 + rest),
                        })
                    } else if trimmed.is_empty() {
                        continue;
                    } else if trimmed != b"{" {
                        Some(Document::Bytes(trimmed))
                    } else {
                        // A line that is just "{" opens a pretty-printed object; NDJSON never has one.
                        pending.extend_from_slice(&line);
                        None
                    }
                } else if cut || pending.len() + line.len() > max_bytes {
                    let seen = Cursor::new(&pending).chain(Cursor::new(&line));
                    let bytes = skip_value(seen.chain(&mut reader))?;
                    pending.clear();
                    Some(Document::TooLarge { bytes })
                } else {
                    pending.extend_from_slice(&line);
                    match serde_json::from_slice::<IgnoredAny>(&pending) {
                        Err(e) if e.is_eof() => None,
                        _ => Some(Document::Bytes(pending.trim_ascii())),
                    }
                };
                if let Some(document) = document {
                    let done = each(document).is_break();
                    pending.clear();
                    if done {
                        return Ok(());
                    }
                }
            }
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

/// Reads one JSON value without keeping it; returns how many bytes it took.
/// A value that is not well-formed ends where the error was found.
fn skip_value(reader: impl Read) -> std::io::Result<u64> {
    let read = Rc::new(Cell::new(0));
    let metered = Metered {
        inner: reader,
        read: Rc::clone(&read),
        limit: u64::MAX,
    };
    let _ = IgnoredAny::deserialize(&mut serde_json::Deserializer::from_reader(metered));
    Ok(read.get())
}

fn for_each_element<R: BufRead>(
    reader: R,
    max_bytes: usize,
    mut each: impl FnMut(Document<'_>) -> ControlFlow<()>,
) -> std::io::Result<()> {
    let read = Rc::new(Cell::new(0));
    let metered = Metered {
        inner: reader,
        read: Rc::clone(&read),
        limit: max_bytes as u64,
    };
    let mut de = serde_json::Deserializer::from_reader(metered);
    de.deserialize_seq(EachElement {
        each: &mut each,
        read,
    })
    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("JSON array: {e}")))
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
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of orders")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.read.set(0);
        while let Some(element) = seq.next_element::<Box<RawValue>>()? {
            if (self.each)(Document::Bytes(element.get().as_bytes())).is_break() {
                return Ok(());
            }
            self.read.set(0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each document as text, or `too large: N` for a skipped one.
    fn collect(input: &str, max_bytes: usize) -> std::io::Result<Vec<String>> {
        let mut out = Vec::new();
        for_each_document(input.as_bytes(), max_bytes, |doc| {
            out.push(match doc {
                Document::Bytes(bytes) => String::from_utf8(bytes.to_vec()).unwrap(),
                Document::TooLarge { bytes } => format!("too large: {bytes}"),
            });
            ControlFlow::Continue(())
        })?;
        Ok(out)
    }

    #[test]
    fn reads_arrays_and_ndjson() {
        assert_eq!(
            collect(" [ {\"a\":1}, {\"b\": [2]} ] ", 100).unwrap(),
            vec!["{\"a\":1}", "{\"b\": [2]}"]
        );
        assert_eq!(
            collect("{\"a\":1}\n\n{\"b\":2}\nnot json\n", 100).unwrap(),
            vec!["{\"a\":1}", "{\"b\":2}", "not json"]
        );
        assert!(collect("", 100).unwrap().is_empty());
        let pretty = "{\n  \"a\": 1,\n  \"b\": {\"c\": 2}\n}\n{\n\"d\": 3\n}\n";
        assert_eq!(collect(pretty, 100).unwrap().len(), 2);
        assert_eq!(collect("{\n \"cut\": ", 100).unwrap(), vec!["{\n \"cut\":"]);
        assert!(collect("[{\"a\":1}, oops]", 100).is_err());
    }

    #[test]
    fn documents_over_the_limit_are_measured_not_kept() {
        let long = format!("{{\"a\":\"{}\"}}", "x".repeat(100));
        // NDJSON: the long line is skipped to its end, the next one is read.
        let ndjson = format!("{{\"a\":1}}\n{long}\n{{\"b\":2}}");
        assert_eq!(
            collect(&ndjson, 20).unwrap(),
            vec![
                "{\"a\":1}".to_owned(),
                format!("too large: {}", long.len()),
                "{\"b\":2}".to_owned()
            ]
        );
        // At the end of the input, without a newline.
        assert_eq!(
            collect(&long, 20).unwrap(),
            vec![format!("too large: {}", long.len())]
        );
        // Exactly at the limit is not over it.
        assert_eq!(collect(&long, long.len()).unwrap(), vec![long.clone()]);
        // A pretty-printed document is skipped to its closing brace.
        let pretty = format!(
            "{{\n\"a\": 1,\n\"b\": \"{}\"\n}}\n{{\"c\":3}}\n",
            "y".repeat(50)
        );
        let first_len = pretty.find("}\n").unwrap() + 1;
        assert_eq!(
            collect(&pretty, 30).unwrap(),
            vec![format!("too large: {first_len}"), "{\"c\":3}".to_owned()]
        );
        // An array cannot be read past an element over the limit.
        let array = format!("[{{\"a\":1}}, {long}, {{\"b\":2}}]");
        let error = collect(&array, 20).unwrap_err().to_string();
        assert!(error.contains("over the limit of 20 bytes"), "{error}");
    }
}
