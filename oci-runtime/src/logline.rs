//! The record format of a node's log files, shared by the two processes that write them (the
//! agent for Wasm output and its own notes, a container's shim for the container's output)
//! and read by the agent. It lives here, the lowest crate both depend on; it is pure (the
//! caller passes the time in) and must never panic on what it reads back, since a log file
//! may hold anything a workload printed, and files of older agents hold no records at all.
//!
//! Each record is one line, CRI-style:
//!
//! ```text
//! 2026-12-07T00:14:44.123456789Z F the workload's line
//! 2026-12-07T00:14:45.000000001Z P a chunk without its newline yet
//! 2026-12-07T00:14:46.000000000Z F , continued and ended here
//! ```
//!
//! a fixed-width RFC 3339 UTC timestamp with nanoseconds (when the bytes were written), a
//! space, a tag, a space, and the payload. Tag `F`: the record's newline is the workload's
//! own (its line ends here). Tag `P`: the workload wrote bytes without a newline; the record's
//! newline is only the framing, and the next record continues the same line. So writing is
//! stateless (each chunk is framed by itself, whichever writer wrote the one before), and the
//! workload's bytes come back exactly: every payload, plus a newline after each `F` record.
//! A line's time is that of its first record. Tag `S` (empty payload) marks where a run of the
//! workload started ([`run_start`]); it is never printed, and it is what tells the agent that
//! a log holds a run even when that run wrote nothing.
//!
//! A line that does not start with a valid header (written by an agent or shim older than
//! this format, or a shim's own message on its stderr) is a raw line: its bytes and its
//! newline are the workload's, and it has no time of its own (see [`Decoder`]).

/// Length of a timestamp: `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
pub const TIMESTAMP_LEN: usize = 30;
/// Length of a record's header: timestamp, space, tag, space.
pub const HEADER_LEN: usize = TIMESTAMP_LEN + 3;

/// Appends `bytes`, written at `now` (nanoseconds since the Unix epoch), to `out` as records.
pub fn frame(now_ns: u64, bytes: &[u8], out: &mut Vec<u8>) {
    let ts = format_timestamp(now_ns);
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        out.extend_from_slice(ts.as_bytes());
        if line.ends_with(b"\n") {
            out.extend_from_slice(b" F ");
            out.extend_from_slice(line);
        } else {
            out.extend_from_slice(b" P ");
            out.extend_from_slice(line);
            out.push(b'\n');
        }
    }
}

/// Appends the record marking that a run started at `now_ns` (tag `S`, no payload).
pub fn run_start(now_ns: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(format_timestamp(now_ns).as_bytes());
    out.extend_from_slice(b" S \n");
}

/// The bytes [`frame`] writes for `bytes`, without building them.
pub fn framed_len(bytes: &[u8]) -> u64 {
    let records = bytes.split_inclusive(|&b| b == b'\n').count() as u64;
    let partial = u64::from(!bytes.is_empty() && !bytes.ends_with(b"\n"));
    bytes.len() as u64 + records * HEADER_LEN as u64 + partial
}

/// One line of a log file, its newline left off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// When it was written; `None` for a raw line.
    pub at_ns: Option<u64>,
    /// The payload continues on the next record (tag `P`).
    pub partial: bool,
    /// A run's start (tag `S`): nothing to print.
    pub run_start: bool,
    pub payload: &'a [u8],
}

/// Reads a line of a log file (without its newline): a record, or a raw line.
pub fn parse_record(line: &[u8]) -> Record<'_> {
    let raw = Record { at_ns: None, partial: false, run_start: false, payload: line };
    let Some(header) = line.get(..HEADER_LEN) else { return raw };
    let (partial, run_start) = match &header[TIMESTAMP_LEN..] {
        b" F " => (false, false),
        b" P " => (true, false),
        b" S " if line.len() == HEADER_LEN => (false, true),
        _ => return raw,
    };
    match parse_timestamp(&header[..TIMESTAMP_LEN]) {
        Some(at) => Record { at_ns: Some(at), partial, run_start, payload: &line[HEADER_LEN..] },
        None => raw,
    }
}

/// Turns records back into what `flotilla logs` prints, chunk by chunk as a file is read
/// (a record may be cut between two reads).
///
/// Without options the output is the workload's bytes exactly. With `timestamps` each line
/// is prefixed with its time and a space (as `kubectl logs --timestamps` does); a raw line
/// has no time and is printed as it is. With `since_ns` only lines written at or after it
/// are printed; a raw line goes with the line before it (it was written after that one), and
/// raw lines at the start of the file (an older agent's) are left out, as older than any.
#[derive(Debug, Default)]
pub struct Decoder {
    timestamps: bool,
    since_ns: Option<u64>,
    /// Bytes of a record not yet ended by its newline.
    pending: Vec<u8>,
    /// The last record was partial: the next continues its line.
    open: bool,
    /// Whether the current (or last) line is printed.
    included: bool,
}

impl Decoder {
    pub fn new(timestamps: bool, since_ns: Option<u64>) -> Decoder {
        Decoder { timestamps, since_ns, included: since_ns.is_none(), ..Decoder::default() }
    }

    /// Decodes the next bytes of the file into `out`; a record not yet complete waits for
    /// the bytes that complete it.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        let Some(last) = bytes.iter().rposition(|&b| b == b'\n') else {
            self.pending.extend_from_slice(bytes);
            return;
        };
        let (whole, rest) = bytes.split_at(last + 1);
        let mut pending = std::mem::take(&mut self.pending);
        let mut lines = whole.split_inclusive(|&b| b == b'\n');
        if !pending.is_empty() {
            // The first line completes the record the previous chunk began.
            pending.extend_from_slice(lines.next().unwrap_or_default());
            self.line(&pending[..pending.len() - 1], true, out);
            pending.clear();
        }
        for line in lines {
            self.line(&line[..line.len() - 1], true, out);
        }
        pending.extend_from_slice(rest);
        self.pending = pending;
    }

    /// The end of the file: a record without its newline (being written, or a raw file's
    /// last line) is printed as far as it goes, without a newline.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let pending = std::mem::take(&mut self.pending);
        if !pending.is_empty() {
            self.line(&pending, false, out);
        }
    }

    /// Forgets a cut record, as when the file was replaced (rotated) under the reader.
    pub fn restart(&mut self) {
        self.pending.clear();
    }

    fn line(&mut self, line: &[u8], ended: bool, out: &mut Vec<u8>) {
        let r = parse_record(line);
        if r.run_start {
            return;
        }
        if !self.open {
            if let Some(since) = self.since_ns {
                // A raw line keeps the decision of the line before it.
                if let Some(at) = r.at_ns {
                    self.included = at >= since;
                }
            }
            if self.included
                && self.timestamps
                && let Some(at) = r.at_ns
            {
                out.extend_from_slice(format_timestamp(at).as_bytes());
                out.push(b' ');
            }
        }
        if self.included {
            out.extend_from_slice(r.payload);
            // A raw line's newline is the workload's; a partial record's is framing only.
            if ended && !r.partial {
                out.push(b'\n');
            }
        }
        self.open = r.partial;
    }
}

/// Decodes a whole log (or its end) at once; see [`Decoder`].
pub fn decode(bytes: &[u8], timestamps: bool, since_ns: Option<u64>) -> Vec<u8> {
    let mut d = Decoder::new(timestamps, since_ns);
    let mut out = Vec::with_capacity(bytes.len());
    d.push(bytes, &mut out);
    d.finish(&mut out);
    out
}

/// Where the last `lines` lines of a `len`-byte log start, reading backwards in blocks. A
/// line is a raw line or a run of records ending with an `F` one (so a line written in
/// several chunks counts once); a final line not ended yet counts as a line, a run's start
/// marker as none.
pub fn tail_offset(
    mut read_at: impl FnMut(u64, &mut [u8]) -> std::io::Result<usize>,
    len: u64,
    lines: u64,
) -> std::io::Result<u64> {
    if lines == 0 {
        return Ok(len);
    }
    // Whether the record starting at `at` is partial (its line goes on in the next record),
    // and whether it is a run's start marker.
    fn kind_at(
        read_at: &mut impl FnMut(u64, &mut [u8]) -> std::io::Result<usize>,
        at: u64,
    ) -> std::io::Result<(bool, bool)> {
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match read_at(at + got as u64, &mut header[got..])? {
                0 => break,
                n => got += n,
            }
        }
        // A marker is a header and its newline; anything longer is no marker.
        let line = match header[..got].iter().position(|&b| b == b'\n') {
            Some(end) => &header[..end],
            None => &header[..got],
        };
        let r = parse_record(line);
        Ok((r.partial, r.run_start))
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut end = len;
    let mut found = 0u64;
    // The start of the record after the one being looked at, and whether it is a marker: a
    // line starts there unless it is a marker or the record before it is partial.
    let mut later: Option<(u64, bool)> = None;
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = {
            let chunk = &mut buf[..(end - start) as usize];
            read_at(start, chunk)?
        };
        for i in (0..n).rev() {
            let record = start + i as u64 + 1;
            // The newline that ends the file's last record starts nothing.
            if buf[i] != b'\n' || record >= len {
                continue;
            }
            let (partial, marker) = kind_at(&mut read_at, record)?;
            if let Some((l, false)) = later
                && !partial
            {
                found += 1;
                if found == lines {
                    return Ok(l);
                }
            }
            later = Some((record, marker));
        }
        end = start;
    }
    // The file's first record, before `later`; it starts a line itself, whatever it is, and
    // that is as far back as the file goes.
    if let Some((l, false)) = later
        && !kind_at(&mut read_at, 0)?.0
        && found + 1 == lines
    {
        return Ok(l);
    }
    Ok(0)
}

/// `2026-12-07T00:14:44.123456789Z` for `ns` nanoseconds since the Unix epoch.
pub fn format_timestamp(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let nanos = ns % 1_000_000_000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z", s / 3600, s / 60 % 60, s % 60)
}

/// The nanoseconds since the Unix epoch of a timestamp as [`format_timestamp`] writes it;
/// `None` for anything else.
pub fn parse_timestamp(s: &[u8]) -> Option<u64> {
    if s.len() != TIMESTAMP_LEN {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<u64> {
        let digits = &s[from..to];
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
    };
    for (at, sep) in [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':'), (19, b'.'), (29, b'Z')] {
        if s[at] != sep {
            return None;
        }
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, sec, nanos) = (num(11, 13)?, num(14, 16)?, num(17, 19)?, num(20, 29)?);
    if y < 1970 || !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    let days = days_from_civil(y as i64, mo as u32, d as u32);
    // February 30th and the like.
    if civil_from_days(days) != (y as i64, mo as u32, d as u32) {
        return None;
    }
    let secs = days as u64 * 86_400 + h * 3600 + mi * 60 + sec;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

/// Year, month, day of a day counted from 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: u64 = 1_796_602_484_123_456_789; // 2026-12-07T00:14:44.123456789Z

    fn framed(chunks: &[(u64, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (at, bytes) in chunks {
            frame(*at, bytes, &mut out);
        }
        out
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_nanoseconds() {
        assert_eq!(format_timestamp(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(format_timestamp(T0), "2026-12-07T00:14:44.123456789Z");
        // A leap day and the last nanosecond of a year.
        assert_eq!(format_timestamp(951_782_400_000_000_007), "2000-02-29T00:00:00.000000007Z");
        assert_eq!(format_timestamp(1_704_067_199_999_999_999), "2023-12-31T23:59:59.999999999Z");
        assert_eq!(parse_timestamp(b"2026-12-07T00:14:44.123456789Z"), Some(T0));
        for bad in [
            &b"2026-02-30T00:00:00.000000000Z"[..],
            b"2026-13-01T00:00:00.000000000Z",
            b"2026-12-07 00:14:44.123456789Z",
            b"2026-12-07T00:14:44.12345678Z",
            b"2026-12-07T24:00:00.000000000Z",
            b"+026-12-07T00:14:44.123456789Z",
            b"1969-12-31T23:59:59.000000000Z",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn records_give_back_the_workloads_bytes_exactly() {
        let log = framed(&[(T0, b"one\ntwo\nthr"), (T0 + 1, b"ee\n"), (T0 + 2, b"\n"), (T0 + 3, b"no newline")]);
        let text = String::from_utf8(log.clone()).unwrap();
        assert_eq!(
            text,
            "2026-12-07T00:14:44.123456789Z F one\n\
             2026-12-07T00:14:44.123456789Z F two\n\
             2026-12-07T00:14:44.123456789Z P thr\n\
             2026-12-07T00:14:44.123456790Z F ee\n\
             2026-12-07T00:14:44.123456791Z F \n\
             2026-12-07T00:14:44.123456792Z P no newline\n"
        );
        assert_eq!(framed_len(b"one\ntwo\nthr"), 3 * HEADER_LEN as u64 + 12);
        assert_eq!(decode(&log, false, None), b"one\ntwo\nthree\n\nno newline");
        // A line's time is its first chunk's.
        assert_eq!(
            String::from_utf8(decode(&log, true, None)).unwrap(),
            "2026-12-07T00:14:44.123456789Z one\n\
             2026-12-07T00:14:44.123456789Z two\n\
             2026-12-07T00:14:44.123456789Z three\n\
             2026-12-07T00:14:44.123456791Z \n\
             2026-12-07T00:14:44.123456792Z no newline"
        );
    }

    #[test]
    fn since_keeps_lines_written_from_then_on_and_raw_lines_follow_the_line_before() {
        let mut log = b"old agent line\n".to_vec();
        log.extend(framed(&[(T0, b"early\n"), (T0 + 10, b"late "), (T0 + 20, b"line\n")]));
        log.extend_from_slice(b"shim message\n");
        log.extend(framed(&[(T0 + 5, b"clock went back\n")]));
        assert_eq!(decode(&log, false, Some(T0 + 10)), b"late line\nshim message\n");
        // Each line by its own time, even when the clock stepped back between them.
        assert_eq!(decode(&log, false, Some(T0 + 1)), b"late line\nshim message\nclock went back\n");
        assert_eq!(decode(&log, false, Some(T0)), b"early\nlate line\nshim message\nclock went back\n");
        assert_eq!(decode(&log, false, Some(T0 + 21)), b"");
        // Without --since every line, raw ones as written.
        assert_eq!(decode(&log, false, None), b"old agent line\nearly\nlate line\nshim message\nclock went back\n");
        let stamped = String::from_utf8(decode(&log, true, None)).unwrap();
        assert!(stamped.starts_with("old agent line\n2026-12-07T00:14:44.123456789Z early\n"), "{stamped}");
        assert!(stamped.contains("\nshim message\n"), "{stamped}");
    }

    #[test]
    fn an_old_raw_file_reads_as_it_is() {
        let raw = b"a\n[flotilla] starting\n2026-12-07 not a header\npartial";
        assert_eq!(decode(raw, false, None), raw);
        assert_eq!(decode(raw, true, None), raw);
        assert_eq!(decode(raw, false, Some(0)), b"");
        // Short lines, and a valid timestamp with an unknown tag, are raw too.
        assert_eq!(parse_record(b"2026-12-07T00:14:44.123456789Z X y").at_ns, None);
        assert_eq!(parse_record(b"2026-12-07T00:14:44.123456789Z F").at_ns, None);
    }

    #[test]
    fn a_run_start_marker_is_never_printed_nor_counted() {
        let mut log = Vec::new();
        run_start(T0, &mut log);
        assert_eq!(log, b"2026-12-07T00:14:44.123456789Z S \n");
        assert!(parse_record(&log[..log.len() - 1]).run_start);
        // With a payload it is no marker: a raw line.
        assert_eq!(parse_record(b"2026-12-07T00:14:44.123456789Z S x").at_ns, None);
        log.extend(framed(&[(T0 + 1, b"a\nb\n")]));
        run_start(T0 + 2, &mut log);
        log.extend(framed(&[(T0 + 3, b"c\n")]));
        assert_eq!(decode(&log, false, None), b"a\nb\nc\n");
        assert_eq!(decode(&log, true, Some(T0 + 2)), b"2026-12-07T00:14:44.123456792Z c\n");
        let tail = |n| decode(&log[tail_at(&log, n)..], false, None);
        assert_eq!(tail(1), b"c\n");
        assert_eq!(tail(2), b"b\nc\n");
        assert_eq!(tail(3), b"a\nb\nc\n");
        let mut only = Vec::new();
        run_start(T0, &mut only);
        assert_eq!(decode(&only[tail_at(&only, 1)..], false, None), b"");
    }

    #[test]
    fn tail_counts_lines_not_records() {
        let log = framed(&[(T0, b"a\nb"), (T0, b"b"), (T0, b"b\nc\n"), (T0, b"open")]);
        let tail = |n| decode(&log[tail_at(&log, n)..], false, None);
        assert_eq!(tail(1), b"open");
        assert_eq!(tail(2), b"c\nopen");
        assert_eq!(tail(3), b"bbb\nc\nopen");
        assert_eq!(tail(4), b"a\nbbb\nc\nopen");
        assert_eq!(tail(9), b"a\nbbb\nc\nopen");
        assert_eq!(tail_at(&log, 0), log.len());
    }

    fn tail_at(bytes: &[u8], lines: u64) -> usize {
        let read_at = |off: u64, buf: &mut [u8]| {
            let off = (off as usize).min(bytes.len());
            let n = buf.len().min(bytes.len() - off);
            buf[..n].copy_from_slice(&bytes[off..off + n]);
            Ok(n)
        };
        tail_offset(read_at, bytes.len() as u64, lines).unwrap() as usize
    }

    fn tail(text: &str, lines: u64) -> &str {
        &text[tail_at(text.as_bytes(), lines)..]
    }

    #[test]
    fn tails_whole_raw_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(tail("a\nb\nc\n", 1), "c\n");
        assert_eq!(tail("a\nb\nc\n", 9), "a\nb\nc\n");
        assert_eq!(tail("a\nb\npartial", 1), "partial");
        assert_eq!(tail("a\nb\npartial", 2), "b\npartial");
        assert_eq!(tail("a\n\n", 1), "\n");
        assert_eq!(tail("", 3), "");
        assert_eq!(tail("a\nb\n", 0), "");
    }

    #[test]
    fn tails_across_read_blocks() {
        let text: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(tail(&text, 3), "line 19997\nline 19998\nline 19999\n");
        assert_eq!(tail(&text, 20_000).len(), text.len());
        let mut log = Vec::new();
        for i in 0..20_000u64 {
            frame(T0 + i, format!("line {i}").as_bytes(), &mut log);
            frame(T0 + i, b"\n", &mut log);
        }
        assert_eq!(decode(&log[tail_at(&log, 2)..], false, None), b"line 19998\nline 19999\n");
    }

    proptest! {
        #[test]
        fn any_chunks_decode_to_their_concatenation_however_the_file_is_read(
            chunks in proptest::collection::vec(proptest::collection::vec(
                prop_oneof![Just(b'\n'), Just(b'x'), Just(b' '), Just(b'F'), any::<u8>()], 0..40), 0..12),
            cut in 1usize..50,
            at in 0u64..4_102_444_800_000_000_000,
        ) {
            let mut log = Vec::new();
            for c in &chunks {
                let before = log.len();
                frame(at, c, &mut log);
                prop_assert_eq!((log.len() - before) as u64, framed_len(c));
            }
            let mut d = Decoder::new(false, None);
            let mut out = Vec::new();
            for piece in log.chunks(cut) {
                d.push(piece, &mut out);
            }
            d.finish(&mut out);
            prop_assert_eq!(out, chunks.concat());
            prop_assert_eq!(parse_timestamp(format_timestamp(at).as_bytes()), Some(at));
        }
    }
}
