//! Splitting long text into pieces Content Safety accepts, with an overlap so that no phrase is
//! lost at a cut.
//!
//! The service takes at most 10,000 characters per `text:analyze` text and per Prompt Shields
//! `userPrompt`, and at most five documents of 10,000 characters together per
//! `text:shieldPrompt` call. Which "character" it counts is not documented; we count UTF-16 code
//! units, which are never fewer than Unicode scalar values (an astral character such as 😀 is
//! two), so a piece within our count is within theirs either way.
//!
//! Consecutive pieces overlap by at least [`OVERLAP`] units: any stretch of the input up to that
//! length lies whole inside one piece (proof on [`split_ranges`]), so a flagged phrase that
//! straddles a cut, or a long word in text without whitespace, is still seen whole by one call.
//! Why 500: it holds several sentences (a harmful instruction or a jailbreak phrasing is rarely
//! longer, and the classifier needs the phrase with a little context), while costing about 5% more
//! text per 10,000-unit piece (one extra call per ~19 pieces).

use std::ops::Range;

/// UTF-16 units shared by consecutive pieces.
pub const OVERLAP: usize = 500;

/// Length of `s` in UTF-16 code units.
pub fn units(s: &str) -> usize {
    s.chars().map(char::len_utf16).sum()
}

/// The pieces of `text`, each at most `max` UTF-16 units; see [`split_ranges`].
pub fn split(text: &str, max: usize, overlap: usize) -> Vec<&str> {
    split_ranges(text, max, overlap)
        .into_iter()
        .map(|r| &text[r])
        .collect()
}

/// Byte ranges of the pieces of `text`: each at most `max` UTF-16 units (`max` below 2 counts as
/// 2, so every character fits), starting at 0, ending at `text.len()`, each starting after the
/// previous one starts and at least `overlap` units before it ends, and on char boundaries. Empty
/// text gives no pieces. A piece prefers to end just after whitespace in its last tenth, and to
/// start just after whitespace shortly before where the overlap requires.
///
/// Why every stretch `[a, b)` of at most `overlap` units lies inside one piece: take the last
/// piece `i` starting at or before `a`. If `b` were past its end `e_i`, piece `i + 1` would
/// exist and start at or before `e_i - overlap < b - overlap <= a`, so piece `i` was not the last
/// to start at or before `a`.
///
/// The overlap needs `max >= 2 * overlap + 4` to leave room for progress; with less, a piece
/// that cannot both overlap and advance is followed without overlap (never an endless loop).
pub fn split_ranges(text: &str, max: usize, overlap: usize) -> Vec<Range<usize>> {
    let max = max.max(2);
    let mut out = Vec::new();
    if text.is_empty() {
        return out;
    }
    // UTF-8 is never shorter than UTF-16 in units, so short text needs no counting.
    if text.len() <= max {
        out.push(0..text.len());
        return out;
    }
    let soft_from = max - max / 10;
    let mut start = 0;
    loop {
        let rest = &text[start..];
        let mut used = 0;
        let mut hard = rest.len();
        let mut soft = None;
        for (i, c) in rest.char_indices() {
            let u = c.len_utf16();
            if used + u > max {
                hard = i;
                break;
            }
            used += u;
            if used >= soft_from && c.is_whitespace() {
                soft = Some(i + c.len_utf8());
            }
        }
        if hard == rest.len() {
            out.push(start..text.len());
            return out;
        }
        let end = soft.unwrap_or(hard);
        out.push(start..start + end);
        start += next_start(&rest[..end], overlap).unwrap_or(end);
    }
}

/// Where the next piece starts inside `head` (the piece just cut): at least `overlap` units
/// before its end, moved back to just after whitespace when there is some within `overlap / 4`
/// more units. `None` when that would not advance past the piece's own start.
fn next_start(head: &str, overlap: usize) -> Option<usize> {
    if overlap == 0 {
        return None;
    }
    let mut chars = head.char_indices().rev();
    let mut back = 0;
    let mut next = None;
    for (i, c) in chars.by_ref() {
        back += c.len_utf16();
        if back >= overlap {
            next = Some(i);
            break;
        }
    }
    let mut next = next.filter(|&n| n > 0)?;
    let mut extra = 0;
    for (i, c) in chars {
        extra += c.len_utf16();
        if extra > overlap / 4 {
            break;
        }
        if c.is_whitespace() {
            next = i + c.len_utf8();
            break;
        }
    }
    Some(next)
}

/// Pack document pieces into Prompt Shields calls: at most `max_docs` a call and at most
/// `max_units` UTF-16 units together. Each piece must itself be within `max_units`.
pub fn batch<'a>(
    pieces: impl IntoIterator<Item = &'a str>,
    max_docs: usize,
    max_units: usize,
) -> Vec<Vec<&'a str>> {
    let mut batches: Vec<Vec<&str>> = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    let mut size = 0;
    for piece in pieces {
        let len = units(piece);
        if !current.is_empty() && (current.len() == max_docs || size + len > max_units) {
            batches.push(std::mem::take(&mut current));
            size = 0;
        }
        size += len;
        current.push(piece);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 10_000;

    /// Every property at once, for one input.
    fn check(text: &str, max: usize, overlap: usize) -> Result<(), TestCaseError> {
        let ranges = split_ranges(text, max, overlap);
        if text.is_empty() {
            prop_assert!(ranges.is_empty());
            return Ok(());
        }
        prop_assert_eq!(ranges[0].start, 0);
        prop_assert_eq!(ranges.last().unwrap().end, text.len());
        for r in &ranges {
            prop_assert!(units(&text[r.clone()]) <= max, "piece over the limit");
        }
        // in order, advancing, and joined back without the overlaps = the input
        let mut joined = String::with_capacity(text.len());
        let mut covered = 0;
        for (i, r) in ranges.iter().enumerate() {
            if i > 0 {
                prop_assert!(r.start > ranges[i - 1].start, "no progress");
                prop_assert!(r.start <= covered, "gap between pieces");
                prop_assert!(
                    units(&text[r.start..covered]) >= overlap,
                    "overlap too short"
                );
            }
            joined.push_str(&text[covered.max(r.start)..r.end]);
            covered = r.end;
        }
        prop_assert_eq!(joined.as_str(), text);
        // every window of up to `overlap` units lies whole in some piece: enough to check the
        // windows of exactly `overlap` units (shorter ones lie inside them) that end at a
        // char boundary, starting at every char boundary
        let bounds: Vec<usize> = text
            .char_indices()
            .map(|(i, _)| i)
            .chain([text.len()])
            .collect();
        let mut prefix = Vec::with_capacity(bounds.len());
        let mut acc = 0;
        for c in text.chars() {
            prefix.push(acc);
            acc += c.len_utf16();
        }
        prefix.push(acc);
        let mut hi = 0;
        for lo in 0..bounds.len() {
            hi = hi.max(lo);
            while hi + 1 < bounds.len() && prefix[hi + 1] - prefix[lo] <= overlap {
                hi += 1;
            }
            let (a, b) = (bounds[lo], bounds[hi]);
            // the last piece starting at or before `a` is the one that can hold the window
            let i = ranges.partition_point(|r| r.start <= a) - 1;
            prop_assert!(b <= ranges[i].end, "window {a}..{b} lies in no piece");
        }
        Ok(())
    }

    /// Text shapes that matter: words with spaces and newlines, no whitespace at all,
    /// astral characters (two UTF-16 units), multi-byte BMP characters.
    fn texts(max_len: usize) -> impl Strategy<Value = String> {
        // letters from a byte range, not a regex: generation stays fast in debug builds
        let word = |len: std::ops::Range<usize>| {
            prop::collection::vec(b'a'..=b'z', len).prop_map(|b| String::from_utf8(b).unwrap())
        };
        let atom = prop_oneof![
            4 => word(1..12),
            2 => Just(" ".to_string()),
            1 => Just("\n".to_string()),
            1 => Just("😀".to_string()),
            1 => Just("é".to_string()),
            1 => Just("中文".to_string()),
            1 => word(40..90),
        ];
        prop::collection::vec(atom, 0..max_len).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        #[test]
        fn small_limits_keep_every_property(text in texts(120), max in 24usize..80, overlap in 0usize..10) {
            check(&text, max, overlap)?;
        }

        #[test]
        fn overlap_close_to_half_the_limit(text in texts(120), overlap in 1usize..12) {
            check(&text, 2 * overlap + 4, overlap)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

        /// The real limits, on texts of a few pieces (up to ~60,000 units).
        #[test]
        fn service_limits_keep_every_property(text in texts(4_000)) {
            check(&text, MAX, OVERLAP)?;
        }

        #[test]
        fn documents_batch_within_limits(sizes in prop::collection::vec(0usize..12_000, 0..14)) {
            let docs: Vec<String> = sizes.iter().map(|n| "d".repeat(*n)).collect();
            let pieces: Vec<&str> = docs.iter().flat_map(|d| split(d, MAX, OVERLAP)).collect();
            let batches = batch(pieces.iter().copied(), 5, MAX);
            let flat: Vec<&str> = batches.iter().flatten().copied().collect();
            prop_assert_eq!(flat, pieces);
            for b in &batches {
                prop_assert!(!b.is_empty() && b.len() <= 5);
                prop_assert!(b.iter().map(|p| units(p)).sum::<usize>() <= MAX);
            }
        }
    }

    #[test]
    fn a_phrase_across_the_cut_is_seen_whole() {
        // no whitespace at all: the flagged word straddles the 10,000-unit cut
        let text = format!("{}bloodbath{}", "x".repeat(9_995), "y".repeat(9_000));
        let pieces = split(&text, MAX, OVERLAP);
        assert_eq!(pieces.len(), 2);
        assert!(!pieces[0].contains("bloodbath"));
        assert!(pieces[1].contains("bloodbath"));
        // with words, the cut falls after whitespace
        let words = "lorem ipsum ".repeat(2_000);
        let pieces = split(&words, MAX, OVERLAP);
        assert_eq!(pieces.len(), 3);
        assert!(pieces
            .iter()
            .all(|p| p.starts_with("lorem") || p.starts_with("ipsum")));
        assert!(pieces[..2].iter().all(|p| p.ends_with(' ')));
    }

    #[test]
    fn astral_characters_count_twice() {
        let emoji = "😀".repeat(6_000); // 12,000 units
        let pieces = split(&emoji, MAX, OVERLAP);
        assert_eq!(pieces.len(), 2);
        assert_eq!(units(pieces[0]), MAX);
        assert_eq!(pieces[0].chars().count(), 5_000);
        assert!(units(pieces[1]) <= MAX);
    }

    #[test]
    fn short_text_is_one_piece_and_empty_none() {
        assert_eq!(split("hello", MAX, OVERLAP), ["hello"]);
        assert!(split("", MAX, OVERLAP).is_empty());
        assert_eq!(split(&"a".repeat(MAX), MAX, OVERLAP).len(), 1);
        assert_eq!(split(&"a".repeat(MAX + 1), MAX, OVERLAP).len(), 2);
    }

    #[test]
    fn too_small_a_limit_still_ends() {
        let text = "ab".repeat(50);
        let pieces = split_ranges(&text, 3, 10);
        assert!(pieces.len() <= 100);
        assert_eq!(pieces.last().unwrap().end, text.len());
        assert_eq!(split("😀😀", 1, 0), ["😀", "😀"]);
    }
}
