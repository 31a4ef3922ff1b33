//! A plausible tokenizer for the simulators.
//!
//! Not a real BPE: it only needs to give counts in the right range (about four characters of
//! English per token, as the `cl100k`/`o200k` encodings do) and to be *consistent*: the text of
//! an answer is the concatenation of its tokens, a streamed answer sends one token per content
//! chunk, and `usage.completion_tokens` is the number of those tokens. So a test can check
//! usage against content exactly.
//!
//! Rules: a token is an optional single leading space followed by a run of up to
//! [`MAX_WORD_CHARS`] letters or digits; or a run of other whitespace; or one other character.

/// Longer words are split, as BPE splits rare words into pieces.
pub const MAX_WORD_CHARS: usize = 6;

/// Split `text` into tokens; their concatenation is `text`.
pub fn tokenize(text: &str) -> Vec<&str> {
    let mut out = Vec::with_capacity(text.len() / 4 + 1);
    let mut rest = text;
    // Each step consumes at least one character, so this ends after at most text.len() steps.
    while !rest.is_empty() {
        let len = next_token_len(rest);
        out.push(&rest[..len]);
        rest = &rest[len..];
    }
    out
}

/// Number of tokens in `text`.
pub fn count(text: &str) -> usize {
    tokenize(text).len()
}

fn next_token_len(s: &str) -> usize {
    let mut it = s.char_indices().peekable();
    let Some((_, first)) = it.next() else {
        return 0;
    };
    let mut end = first.len_utf8();
    let word_start = if first == ' ' {
        matches!(it.peek(), Some((_, c)) if c.is_alphanumeric())
    } else {
        first.is_alphanumeric()
    };
    if word_start {
        let mut letters = usize::from(first != ' ');
        if first == ' ' {
            // The space belongs to the word that follows.
            if let Some((i, c)) = it.next() {
                end = i + c.len_utf8();
                letters = 1;
            }
        }
        while letters < MAX_WORD_CHARS {
            match it.peek() {
                Some(&(i, c)) if c.is_alphanumeric() => {
                    end = i + c.len_utf8();
                    letters += 1;
                    it.next();
                }
                _ => break,
            }
        }
        return end;
    }
    if first.is_whitespace() {
        // A run of whitespace, leaving a final ' ' that starts a word for the next token.
        while let Some(&(i, c)) = it.peek() {
            if !c.is_whitespace() {
                break;
            }
            let mut ahead = it.clone();
            ahead.next();
            let starts_word =
                c == ' ' && matches!(ahead.peek(), Some((_, n)) if n.is_alphanumeric());
            if starts_word {
                break;
            }
            end = i + c.len_utf8();
            it.next();
        }
        return end;
    }
    end
}

/// The first `n` tokens of `text`, as one string.
pub fn truncate(text: &str, n: usize) -> String {
    tokenize(text).into_iter().take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_concatenate_to_the_text() {
        for text in [
            "",
            "Hello, world!",
            "  leading and trailing  ",
            "Antidisestablishmentarianism is long.\n\nNew paragraph\ttab",
            "naïve café — ünïcödé 東京 2024-10-21",
        ] {
            let toks = tokenize(text);
            assert_eq!(toks.concat(), text);
            assert!(toks.iter().all(|t| !t.is_empty()));
        }
    }

    #[test]
    fn counts_are_plausible() {
        assert_eq!(count("Hello, world!"), 4); // Hello , ␣world !
        assert_eq!(count("Hello"), 1);
        assert_eq!(count(" the cat sat"), 3);
        // ~4 characters per token on ordinary English.
        let text = "The quick brown fox jumps over the lazy dog while the farmer watches quietly.";
        let n = count(text);
        assert!((12..=24).contains(&n), "{n}");
        assert_eq!(count("abcdefghijkl"), 2);
    }

    #[test]
    fn truncate_keeps_whole_tokens() {
        assert_eq!(truncate("one two three four", 2), "one two");
        assert_eq!(truncate("one", 5), "one");
    }
}
