//! JSON log lines, written straight into the line buffer.
//!
//! The same lines as tracing-subscriber's JSON format with flattened
//! events and the current span (`timestamp`, `level`, the event's fields
//! with `message`, `target`, `span` with the span's fields and `name`), at
//! about half its cost: that format keeps a span's fields as a JSON object
//! in text and parses it back into a map for every line, and formats each
//! field through serde. A scan logs two lines, and on a small file that
//! was a tenth of avgate's CPU.
//!
//! Strings are escaped as RFC 8259 requires (`"`, `\` and every control
//! character), so a hostile filename or error text cannot end a line or
//! forge a field; the tests parse what comes out.

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Formats events as one JSON object per line.
pub struct JsonLines;

/// Formats a span's fields as the inside of a JSON object (`"k":v,...`),
/// ready to be put into each line written within the span.
pub struct JsonFieldList;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        w.write_str("{\"timestamp\":\"")?;
        SystemTime.format_time(&mut w)?;
        w.write_str("\",\"level\":\"")?;
        w.write_str(meta.level().as_str())?;
        w.write_char('"')?;
        let mut fields = FieldWriter {
            w: &mut w,
            first: false,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        w.write_str(",\"target\":")?;
        string(&mut w, meta.target())?;
        let span = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current());
        if let Some(span) = span {
            w.write_str(",\"span\":{")?;
            let extensions = span.extensions();
            if let Some(fields) = extensions.get::<FormattedFields<N>>() {
                if !fields.fields.is_empty() {
                    w.write_str(&fields.fields)?;
                    w.write_char(',')?;
                }
            }
            w.write_str("\"name\":")?;
            string(&mut w, span.name())?;
            w.write_char('}')?;
        }
        w.write_str("}\n")
    }
}

impl<'w> FormatFields<'w> for JsonFieldList {
    fn format_fields<R: RecordFields>(&self, mut w: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = FieldWriter {
            w: &mut w,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let first = current.fields.is_empty();
        let mut w = current.as_writer();
        let mut visitor = FieldWriter {
            w: &mut w,
            first,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

/// Writes each field as `,"name":value` (no comma before the first one
/// when `first`).
struct FieldWriter<'a, 'w> {
    w: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl FieldWriter<'_, '_> {
    fn write(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            if !std::mem::take(&mut self.first) {
                self.w.write_char(',')?;
            }
            string(self.w, field.name())?;
            self.w.write_char(':')?;
            value(self.w)
        })();
    }
}

impl Visit for FieldWriter<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.write(field, |w| string(w, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, |w| {
            w.write_char('"')?;
            write!(Escaped(w), "{value:?}")?;
            w.write_char('"')
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.write(field, |w| write!(w, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.write(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.write(field, |w| write!(w, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity.
        self.write(field, |w| match value.is_finite() {
            true => write!(w, "{value}"),
            false => w.write_str("null"),
        });
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.write(field, |w| {
            w.write_char('"')?;
            write!(Escaped(w), "{value}")?;
            w.write_char('"')
        });
    }
}

/// `s` as a JSON string.
fn string(w: &mut impl Write, s: &str) -> fmt::Result {
    w.write_char('"')?;
    Escaped(w).write_str(s)?;
    w.write_char('"')
}

/// Escapes what is written through it for the inside of a JSON string.
struct Escaped<'a, W: Write>(&'a mut W);

impl<W: Write> Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, b) in s.bytes().enumerate() {
            let short = match b {
                b'"' => Some("\\\""),
                b'\\' => Some("\\\\"),
                b'\n' => Some("\\n"),
                b'\r' => Some("\\r"),
                b'\t' => Some("\\t"),
                0..=0x1f => None,
                _ => continue,
            };
            self.0.write_str(&s[plain..i])?;
            match short {
                Some(escape) => self.0.write_str(escape)?,
                None => write!(self.0, "\\u{b:04x}")?,
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The lines logged while `f` runs, each parsed.
    fn lines(f: impl FnOnce()) -> Vec<Value> {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .event_format(JsonLines)
            .fmt_fields(JsonFieldList)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert!(text.ends_with('\n'), "{text:?}");
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    }

    const HOSTILE: &str = "a\"b\\c\nd\re\tf\0g\u{1}h\u{1f}i\u{7f}j\u{202e}k😀l</script>";

    #[test]
    fn hostile_strings_come_back_unchanged_and_end_no_line() {
        let error = std::io::Error::other(HOSTILE);
        let got = lines(|| {
            tracing::info!(filename = HOSTILE, reason = %HOSTILE, error = ?HOSTILE, "{HOSTILE}");
            tracing::warn!(error = &error as &dyn std::error::Error, "x");
        });
        assert_eq!(got.len(), 2);
        assert_eq!(got[0]["message"], HOSTILE);
        assert_eq!(got[0]["filename"], HOSTILE);
        assert_eq!(got[0]["reason"], HOSTILE);
        assert_eq!(got[0]["error"], format!("{HOSTILE:?}"));
        assert_eq!(got[1]["error"], HOSTILE);
        assert_eq!(got[1]["level"], "WARN");
    }

    #[test]
    fn lines_have_the_layout_of_the_documented_format() {
        let got = lines(|| {
            tracing::info!(
                size = 1024u64,
                delta = -3i64,
                ok = true,
                ratio = 0.5,
                nan = f64::NAN,
                "outside"
            );
            let span = tracing::info_span!("request", request_id = "abc", client = %"127.0.0.1");
            span.in_scope(|| tracing::info!(status = 200u64, "request"));
            let empty = tracing::info_span!("quiet");
            empty.in_scope(|| tracing::info!("inside"));
        });
        let first = &got[0];
        let timestamp = first["timestamp"].as_str().unwrap();
        assert!(
            timestamp.len() == 27 && timestamp.ends_with('Z') && &timestamp[10..11] == "T",
            "RFC 3339 with microseconds: {timestamp}"
        );
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["message"], "outside");
        assert_eq!(first["size"], 1024);
        assert_eq!(first["delta"], -3);
        assert_eq!(first["ok"], true);
        assert_eq!(first["ratio"], 0.5);
        assert_eq!(first["nan"], Value::Null);
        assert_eq!(first["target"], module_path!());
        assert!(first.get("span").is_none(), "{first}");

        assert_eq!(got[1]["status"], 200);
        assert_eq!(
            got[1]["span"],
            serde_json::json!({"request_id": "abc", "client": "127.0.0.1", "name": "request"})
        );
        assert_eq!(got[2]["span"], serde_json::json!({"name": "quiet"}));
    }

    #[test]
    fn fields_recorded_later_join_the_span() {
        let got = lines(|| {
            let span = tracing::info_span!("request", a = 1u64, b = tracing::field::Empty);
            span.record("b", "two");
            span.in_scope(|| tracing::info!("x"));
            let late = tracing::info_span!("late", c = tracing::field::Empty);
            late.record("c", 3u64);
            late.in_scope(|| tracing::info!("y"));
        });
        assert_eq!(
            got[0]["span"],
            serde_json::json!({"a": 1, "b": "two", "name": "request"})
        );
        assert_eq!(got[1]["span"], serde_json::json!({"c": 3, "name": "late"}));
    }
}
