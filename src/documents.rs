//! Reads a stream of JSON documents, one at a time, from a JSON array or from
//! NDJSON (one document per line), so files of any size use bounded memory.

use std::fmt;
use std::io::BufRead;
use std::ops::ControlFlow;

use serde::de::{Deserializer, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// Calls `each` with the bytes of every document, in order, until it breaks.
/// An NDJSON line that is not JSON is still a document (for the caller to
/// judge); a JSON array that is not well-formed is an error.
pub fn for_each_document<R: BufRead>(
    mut reader: R,
    mut each: impl FnMut(&[u8]) -> ControlFlow<()>,
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
        Some(b'[') => {
            let mut de = serde_json::Deserializer::from_reader(reader);
            de.deserialize_seq(EachElement(&mut each)).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("JSON array: {e}"))
            })
        }
        Some(_) => {
            let (mut line, mut pending) = (Vec::new(), Vec::new());
            loop {
                line.clear();
                if reader.read_until(b'\n', &mut line)? == 0 {
                    // An unfinished pretty-printed document is still a document, to be judged.
                    if !pending.is_empty() {
                        let _ = each(pending.trim_ascii());
                    }
                    return Ok(());
                }
                let trimmed = line.trim_ascii();
                if pending.is_empty() {
                    if trimmed.is_empty() {
                        continue;
                    }
                    // A line that is just "{" opens a pretty-printed object; NDJSON never has one.
                    if trimmed != b"{" {
                        if each(trimmed).is_break() {
                            return Ok(());
                        }
                        continue;
                    }
                }
                pending.extend_from_slice(&line);
                match serde_json::from_slice::<serde::de::IgnoredAny>(&pending) {
                    Err(e) if e.is_eof() => continue,
                    _ => {
                        let done = each(pending.trim_ascii()).is_break();
                        pending.clear();
                        if done {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
}

struct EachElement<'f, F>(&'f mut F);

impl<'de, F: FnMut(&[u8]) -> ControlFlow<()>> Visitor<'de> for EachElement<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of orders")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(element) = seq.next_element::<Box<RawValue>>()? {
            if (self.0)(element.get().as_bytes()).is_break() {
                return Ok(());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(input: &str) -> std::io::Result<Vec<String>> {
        let mut out = Vec::new();
        for_each_document(input.as_bytes(), |doc| {
            out.push(String::from_utf8(doc.to_vec()).unwrap());
            ControlFlow::Continue(())
        })?;
        Ok(out)
    }

    #[test]
    fn reads_arrays_and_ndjson() {
        assert_eq!(
            collect(" [ {\"a\":1}, {\"b\": [2]} ] ").unwrap(),
            vec!["{\"a\":1}", "{\"b\": [2]}"]
        );
        assert_eq!(
            collect("{\"a\":1}\n\n{\"b\":2}\nnot json\n").unwrap(),
            vec!["{\"a\":1}", "{\"b\":2}", "not json"]
        );
        assert!(collect("").unwrap().is_empty());
        let pretty = "{\n  \"a\": 1,\n  \"b\": {\"c\": 2}\n}\n{\n\"d\": 3\n}\n";
        assert_eq!(collect(pretty).unwrap().len(), 2);
        assert_eq!(collect("{\n \"cut\": ").unwrap(), vec!["{\n \"cut\":"]);
        assert!(collect("[{\"a\":1}, oops]").is_err());
    }
}
