//! Logging: tracing, one JSON object per line on stdout (the Functions host collects stdout into
//! Application Insights).
//!
//! The default filter keeps the HTTP and TLS libraries at `warn`: at debug level some of them
//! print headers, and headers carry keys. `RUST_LOG` overrides the filter for a deliberate
//! debugging session.
//!
//! Lines are written by [`JsonLines`], a direct JSON writer with the same shape as
//! tracing-subscriber's flattened JSON format (`timestamp`, `level`, the event's fields,
//! `target`): it formats straight into the line buffer instead of going through serde and a
//! calendar library, which halves the cost of the one line every request writes.
//!
//! # Batched writes, and what a kill can lose
//! [`init`] writes through [`BatchedStdout`]: a line logged on a runtime worker thread waits in
//! one process-wide buffer and goes out with the lines after it in one `write(2)`, instead of
//! one `write` per line. The buffer is written out
//! - when a worker thread is about to go idle ([`on_worker_park`], a runtime hook set in
//!   `main`): an idle handler holds no line;
//! - when it holds [`BATCH_MAX_BYTES`], or a line arrives [`BATCH_MAX_AGE`] or more after the
//!   oldest waiting one (a busy thread that never idles still writes every few milliseconds);
//! - before a line from any other thread (the audit journal's, a blocking task's, start-up's),
//!   which is written at once, after the waiting ones, so lines keep their order;
//! - by [`flush`], which `main` calls once the server has drained (SIGTERM loses nothing).
//!
//! SIGKILL loses what the buffer holds at that instant: the lines of requests that ended since
//! the worker last went idle, at most [`BATCH_MAX_BYTES`] and in practice a few milliseconds of
//! requests (one write per line lost only the lines of requests still in flight, which a kill
//! loses either way, as it loses their answers).

use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The filter used when `RUST_LOG` is unset.
pub const DEFAULT_FILTER: &str = "info,hyper=warn,hyper_util=warn,h2=warn,reqwest=warn,rustls=warn";

/// Install the global JSON subscriber writing to stdout through [`BatchedStdout`].
pub fn init() {
    init_with_writer(BatchedStdout);
}

/// Lines waiting to be written out: at most this many bytes (about 40 request lines).
pub const BATCH_MAX_BYTES: usize = 16 * 1024;
/// A line logged this long after the oldest waiting one writes the batch out.
pub const BATCH_MAX_AGE: Duration = Duration::from_millis(5);

struct Batch {
    buf: Vec<u8>,
    /// When the oldest waiting line arrived.
    oldest: Option<Instant>,
}

static BATCH: Mutex<Batch> = Mutex::new(Batch {
    buf: Vec::new(),
    oldest: None,
});

thread_local! {
    /// Set on runtime worker threads (by their first [`on_worker_park`]): only their lines
    /// wait, since only they are sure to pass through the hook that writes them out.
    static WORKER: Cell<bool> = const { Cell::new(false) };
}

/// The stdout writer of [`init`]: see the module doc for when a line goes out.
pub struct BatchedStdout;

/// One line's writer (tracing-subscriber hands it the whole line in one `write_all`).
pub struct BatchedLine;

impl<'a> MakeWriter<'a> for BatchedStdout {
    type Writer = BatchedLine;

    fn make_writer(&'a self) -> BatchedLine {
        BatchedLine
    }
}

impl std::io::Write for BatchedLine {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut batch = BATCH.lock().unwrap_or_else(|e| e.into_inner());
        if !WORKER.get() {
            write_out(&mut batch);
            let _ = std::io::stdout().lock().write_all(line);
            return Ok(line.len());
        }
        let now = Instant::now();
        let oldest = *batch.oldest.get_or_insert(now);
        batch.buf.extend_from_slice(line);
        if batch.buf.len() >= BATCH_MAX_BYTES || now.duration_since(oldest) >= BATCH_MAX_AGE {
            write_out(&mut batch);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn write_out(batch: &mut Batch) {
    if !batch.buf.is_empty() {
        // Errors are dropped as `println!`-style logging would: there is nowhere to report them.
        let _ = std::io::stdout().lock().write_all(&batch.buf);
        batch.buf.clear();
        if batch.buf.capacity() > 4 * BATCH_MAX_BYTES {
            batch.buf.shrink_to(BATCH_MAX_BYTES);
        }
    }
    batch.oldest = None;
}

/// The runtime's `on_thread_park` hook: marks the thread as a worker (its lines may wait) and
/// writes out every waiting line before the thread goes idle.
pub fn on_worker_park() {
    WORKER.set(true);
    flush();
}

/// Write out every waiting line now.
pub fn flush() {
    let mut batch = BATCH.lock().unwrap_or_else(|e| e.into_inner());
    write_out(&mut batch);
}

/// Install the global JSON subscriber writing to `writer` (tests capture logs with this).
pub fn init_with_writer<W>(writer: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let _ = tracing_subscriber::fmt()
        .event_format(JsonLines)
        .with_env_filter(filter)
        .with_writer(writer)
        .try_init();
}

/// `{"timestamp":"…Z","level":"INFO",<fields>,"target":"…"}` per event, no spans.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        w.write_str("{\"timestamp\":\"")?;
        rfc3339_micros(&mut w, SystemTime::now())?;
        w.write_str("\",\"level\":\"")?;
        w.write_str(event.metadata().level().as_str())?;
        w.write_char('"')?;
        let mut fields = Fields {
            w: &mut w,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        w.write_str(",\"target\":")?;
        json_str(&mut w, event.metadata().target())?;
        w.write_str("}\n")
    }
}

struct Fields<'a, 'w> {
    w: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    fn key(&mut self, field: &Field) -> fmt::Result {
        self.w.write_char(',')?;
        json_str(self.w, field.name())?;
        self.w.write_char(':')
    }

    fn raw(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|_| self.w.write_fmt(value));
        }
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|_| json_str(self.w, value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|_| {
                self.w.write_char('"')?;
                write!(Escape(self.w), "{value:?}")?;
                self.w.write_char('"')
            });
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|_| write_u64(self.w, value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|_| {
                if value < 0 {
                    self.w.write_char('-')?;
                }
                write_u64(self.w, value.unsigned_abs())
            });
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.result.is_ok() {
            self.result = self
                .key(field)
                .and_then(|_| self.w.write_str(if value { "true" } else { "false" }));
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.raw(field, format_args!("{value}"));
        } else {
            self.raw(field, format_args!("null"));
        }
    }
}

/// Writes through, escaping for a JSON string.
struct Escape<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for Escape<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Nearly every value (ids, names, paths) has nothing to escape: one scan, one write.
        if !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
            return self.0.write_str(s);
        }
        let mut start = 0;
        for (i, b) in s.bytes().enumerate() {
            let esc: &str = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f => {
                    self.0.write_str(&s[start..i])?;
                    write!(self.0, "\\u{:04x}", b)?;
                    start = i + 1;
                    continue;
                }
                _ => continue,
            };
            self.0.write_str(&s[start..i])?;
            self.0.write_str(esc)?;
            start = i + 1;
        }
        self.0.write_str(&s[start..])
    }
}

/// `value` in decimal, as `{}` writes it, without the formatting machinery (status codes and
/// token counts are on every request line).
fn write_u64(w: &mut Writer<'_>, mut value: u64) -> fmt::Result {
    let mut buf = [0u8; 20];
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    // only ASCII digits were written
    w.write_str(std::str::from_utf8(&buf[at..]).map_err(|_| fmt::Error)?)
}

fn json_str(w: &mut Writer<'_>, s: &str) -> fmt::Result {
    w.write_char('"')?;
    Escape(w).write_str(s)?;
    w.write_char('"')
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC), as tracing-subscriber writes it.
fn rfc3339_micros(w: &mut Writer<'_>, now: SystemTime) -> fmt::Result {
    let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if !(0..=9999).contains(&year) {
        return write!(
            w,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
            rem / 3_600,
            rem / 60 % 60,
            rem % 60,
            d.subsec_micros()
        );
    }
    // The same text as the format string above, digit by digit: `write!` with width and fill
    // cost ~2 k instructions per line, a fifth of the line.
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year as u64);
    put(5, 2, month as u64);
    put(8, 2, day as u64);
    put(11, 2, rem / 3_600);
    put(14, 2, rem / 60 % 60);
    put(17, 2, rem % 60);
    put(20, 6, u64::from(d.subsec_micros()));
    w.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_the_flattened_json_shape() {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .event_format(JsonLines)
            .with_writer(move || w.clone())
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::info!(
                target: "request",
                request_id = "r-1",
                caller = Some("a\"b\\c\n"),
                status = 200u16,
                upstream_ms = 1.5f64,
                bad = f64::NAN,
                completed = true,
                error = tracing::field::Empty,
                "done {}",
                7
            );
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(text.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["target"], "request");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["request_id"], "r-1");
        assert_eq!(v["caller"], "a\"b\\c\n");
        assert_eq!(v["status"], 200);
        assert_eq!(v["upstream_ms"], 1.5);
        assert!(v["bad"].is_null());
        assert_eq!(v["completed"], true);
        assert_eq!(v["message"], "done 7");
        assert!(v.get("error").is_none());
        let ts = v["timestamp"].as_str().unwrap();
        assert_eq!(ts.len(), "2026-01-01T00:00:00.000000Z".len());
        time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).unwrap();
    }

    #[test]
    fn integers_are_written_as_display_writes_them() {
        for v in [
            0u64,
            1,
            9,
            10,
            99,
            200,
            429,
            65_535,
            1 << 32,
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut s = String::new();
            write_u64(&mut Writer::new(&mut s), v).unwrap();
            assert_eq!(s, v.to_string());
        }
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .event_format(JsonLines)
            .with_writer(move || w.clone())
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::info!(neg = i64::MIN, zero = 0i64, pos = 7i64, big = u64::MAX);
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.contains(&format!(
                r#""neg":{},"zero":0,"pos":7,"big":{}"#,
                i64::MIN,
                u64::MAX
            )),
            "{text}"
        );
    }

    #[test]
    fn dates_match_the_calendar() {
        let mut s = String::new();
        let t = UNIX_EPOCH + std::time::Duration::from_micros(951_782_400_000_001); // 2000-02-29
        rfc3339_micros(&mut Writer::new(&mut s), t).unwrap();
        assert_eq!(s, "2000-02-29T00:00:00.000001Z");
        let mut s = String::new();
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_795_219_199); // 2026-11-20T23:59:59
        rfc3339_micros(&mut Writer::new(&mut s), t).unwrap();
        assert_eq!(s, "2026-11-20T23:59:59.000000Z");
    }

    /// The digit-by-digit text equals the `write!` text it replaced, at every field's edges
    /// (the calendar itself is checked above) and past year 9999, where it falls back.
    #[test]
    fn dates_equal_the_formatted_text() {
        fn formatted(t: SystemTime) -> String {
            let d = t.duration_since(UNIX_EPOCH).unwrap();
            let secs = d.as_secs();
            let (days, rem) = (secs / 86_400, secs % 86_400);
            let z = days as i64 + 719_468;
            let era = z.div_euclid(146_097);
            let doe = z - era * 146_097;
            let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
            let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
            let mp = (5 * doy + 2) / 153;
            let day = doy - (153 * mp + 2) / 5 + 1;
            let month = if mp < 10 { mp + 3 } else { mp - 9 };
            let year = yoe + era * 400 + i64::from(month <= 2);
            format!(
                "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
                rem / 3_600,
                rem / 60 % 60,
                rem % 60,
                d.subsec_micros()
            )
        }
        let mut micros: u64 = 0;
        let end = 260_000_000_000_000_000; // past year 10000
        let mut n = 0;
        while micros < end && n < 200_000 {
            let t = UNIX_EPOCH + std::time::Duration::from_micros(micros);
            let mut s = String::new();
            rfc3339_micros(&mut Writer::new(&mut s), t).unwrap();
            assert_eq!(s, formatted(t));
            // an irregular stride, so every digit position takes many values
            micros += 1_299_999_999_979 + (micros % 1_000_003);
            n += 1;
        }
        assert!(n > 100_000, "{n}");
    }
}
