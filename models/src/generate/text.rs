//! Text out of generated tokens, piece by piece: an incremental detokenizer that never emits
//! half a character, and stop strings that never let a stop (or a prefix of one) reach the
//! client.
//!
//! Byte-level BPE splits multi-byte characters across tokens, and a random or unlucky model can
//! produce bytes that never form a valid character. The detokenizer decodes a window of recent
//! tokens (Hugging Face TGI's prefix/read offsets) and emits new text only when it does not end
//! in U+FFFD, i.e. when no character is still incomplete; at the end it flushes the rest as
//! `tokenizers` decodes it (U+FFFD for bytes that never completed). So the pieces of a stream
//! always concatenate to the non-streamed text, which is `decode(all generated ids)`.

/// Decodes ids to text (the model's tokenizer, special tokens skipped).
pub trait Decode {
    fn decode_ids(&self, ids: &[u32]) -> String;
}

/// Incremental detokenization of one sequence's generated ids.
#[derive(Debug, Default, Clone)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    /// Text emitted so far.
    emitted: String,
}

impl Detokenizer {
    /// Adds a token; returns the text that is now complete (possibly empty).
    pub fn push(&mut self, id: u32, tok: &impl Decode) -> String {
        self.ids.push(id);
        let prefix = tok.decode_ids(&self.ids[self.prefix_offset..self.read_offset]);
        let text = tok.decode_ids(&self.ids[self.prefix_offset..]);
        if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') && text.starts_with(&prefix) {
            let delta = text[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            self.emitted.push_str(&delta);
            delta
        } else {
            String::new()
        }
    }

    /// The rest of the text at the end of generation (incomplete bytes as U+FFFD).
    pub fn finish(&mut self, tok: &impl Decode) -> String {
        let full = tok.decode_ids(&self.ids);
        let rest = if full.starts_with(&self.emitted) {
            full[self.emitted.len()..].to_string()
        } else {
            // Cannot happen for byte-level or SentencePiece decoders; keep what was sent.
            tracing::warn!("incremental detokenization diverged from the full decode");
            String::new()
        };
        self.emitted.push_str(&rest);
        rest
    }
}

/// Holds back text that could be the start of a stop string, and cuts the output at the first
/// stop string that appears.
///
/// Each stop string is matched by its own Knuth–Morris–Pratt automaton fed only the new bytes,
/// so a token costs time in proportion to its text, whatever the stop strings' lengths (a
/// naive rescan of the tail at every character index would cost the square of their length on
/// every token, on the scheduler thread that every generation shares).
#[derive(Debug, Default, Clone)]
pub struct StopStrings {
    stops: Vec<StopMatcher>,
    /// All text seen (after any cut, nothing more is accepted).
    text: String,
    /// Bytes of `text` already released.
    released: usize,
    hit: bool,
}

/// One stop string's automaton: `state` is the length of the longest prefix of the stop string
/// that the text seen so far ends with.
#[derive(Debug, Default, Clone)]
struct StopMatcher {
    pattern: Vec<u8>,
    /// `fail[i]`: the longest proper prefix of `pattern[..=i]` that is also its suffix.
    fail: Vec<usize>,
    state: usize,
}

impl StopMatcher {
    fn new(pattern: &str) -> Self {
        let pattern = pattern.as_bytes().to_vec();
        let mut fail = vec![0; pattern.len()];
        let mut k = 0;
        for i in 1..pattern.len() {
            while k > 0 && pattern[i] != pattern[k] {
                k = fail[k - 1];
            }
            if pattern[i] == pattern[k] {
                k += 1;
            }
            fail[i] = k;
        }
        Self {
            pattern,
            fail,
            state: 0,
        }
    }

    /// Feeds one byte; true when the stop string now ends the text.
    fn feed(&mut self, b: u8) -> bool {
        if self.state == self.pattern.len() {
            self.state = self.fail[self.state - 1];
        }
        while self.state > 0 && self.pattern[self.state] != b {
            self.state = self.fail[self.state - 1];
        }
        if self.pattern[self.state] == b {
            self.state += 1;
        }
        self.state == self.pattern.len()
    }
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| StopMatcher::new(s))
                .collect(),
            ..Default::default()
        }
    }

    /// Adds text; returns what may be released now and whether a stop string was hit (then
    /// the text is cut before it and generation should end).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.hit {
            return (String::new(), true);
        }
        let base = self.text.len();
        self.text.push_str(piece);
        // The earliest start of any stop string that ends within the new piece. (Matches
        // always fall on character boundaries: both sides are UTF-8.)
        let mut cut: Option<usize> = None;
        for m in &mut self.stops {
            for (k, &b) in piece.as_bytes().iter().enumerate() {
                if m.feed(b) {
                    let start = base + k + 1 - m.pattern.len();
                    cut = Some(cut.map_or(start, |c| c.min(start)));
                    break; // later matches of the same string start later
                }
            }
        }
        if let Some(cut) = cut {
            self.text.truncate(cut);
            self.hit = true;
            let upto = self.text.len().max(self.released);
            return (self.release(upto), true);
        }
        // Hold back the longest tail that is a prefix of some stop string.
        let keep = self.stops.iter().map(|m| m.state).max().unwrap_or(0);
        let upto = self.text.len() - keep;
        (self.release(upto.max(self.released)), false)
    }

    /// Whether a stop string has been hit.
    pub fn is_hit(&self) -> bool {
        self.hit
    }

    /// Releases everything held back (generation ended for another reason).
    pub fn flush(&mut self) -> String {
        self.release(self.text.len())
    }

    fn release(&mut self, upto: usize) -> String {
        let out = self.text[self.released..upto].to_string();
        self.released = upto;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level "tokenizer": id = one byte; decoding is lossy UTF-8.
    struct Bytes;
    impl Decode for Bytes {
        fn decode_ids(&self, ids: &[u32]) -> String {
            let b: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
            String::from_utf8_lossy(&b).into_owned()
        }
    }

    fn stream(bytes: &[u8]) -> (Vec<String>, String) {
        let mut d = Detokenizer::default();
        let mut pieces: Vec<String> = bytes
            .iter()
            .map(|&b| d.push(u32::from(b), &Bytes))
            .collect();
        pieces.push(d.finish(&Bytes));
        let full = Bytes.decode_ids(&bytes.iter().map(|&b| u32::from(b)).collect::<Vec<_>>());
        (pieces, full)
    }

    #[test]
    fn split_characters_are_emitted_whole_and_pieces_add_up() {
        let (pieces, full) = stream("a€b".as_bytes());
        assert_eq!(pieces, ["a", "", "", "€", "b", ""]);
        assert_eq!(pieces.concat(), full);
    }

    #[test]
    fn bytes_that_never_complete_become_replacement_characters() {
        for bytes in [
            &[b'x', 0xE2, 0x82][..],
            &[0xE2, 0x82, b'y'],
            &[0xFF, 0xFE, b'z', 0xC3],
            &[0x80, 0x80, 0xE4, 0xBD, 0xA0],
        ] {
            let (pieces, full) = stream(bytes);
            assert_eq!(pieces.concat(), full, "{bytes:?}");
        }
    }

    #[test]
    fn stop_strings_cut_and_hold_back_prefixes() {
        let mut s = StopStrings::new(vec!["END".into()]);
        assert_eq!(s.push("hello E"), ("hello ".into(), false));
        assert_eq!(s.push("N"), (String::new(), false));
        assert_eq!(s.push("D tail"), (String::new(), true));
        let mut s = StopStrings::new(vec!["\n\n".into()]);
        assert_eq!(s.push("a\n"), ("a".into(), false));
        assert_eq!(s.push("b"), ("\nb".into(), false));
        assert_eq!(s.flush(), "");
        // A stop inside one piece.
        let mut s = StopStrings::new(vec!["x".into(), "yz".into()]);
        assert_eq!(s.push("abyzcx"), ("ab".into(), true));
    }

    /// The plain definition: rescan the text for every stop string, then hold back the longest
    /// tail that is a prefix of one.
    fn reference(stops: &[&str], pieces: &[String]) -> (Vec<String>, bool) {
        let mut text = String::new();
        let mut released = 0;
        let mut out = Vec::new();
        for p in pieces {
            text.push_str(p);
            if let Some(cut) = stops.iter().filter_map(|s| text.find(s)).min() {
                out.push(text[released.min(cut)..cut].to_string());
                return (out, true);
            }
            let keep = stops
                .iter()
                .flat_map(|s| {
                    (1..s.len()).filter(|&i| s.is_char_boundary(i) && text.ends_with(&s[..i]))
                })
                .max()
                .unwrap_or(0);
            let upto = (text.len() - keep).max(released);
            out.push(text[released..upto].to_string());
            released = upto;
        }
        (out, false)
    }

    #[test]
    fn stop_strings_match_the_plain_definition_on_random_text() {
        let alphabet = ["a", "b", "ab", "é", "aa", "ba", ""];
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = |n: usize| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as usize) % n
        };
        for _ in 0..3000 {
            let stops: Vec<String> = (0..1 + next(3))
                .map(|_| (0..1 + next(5)).map(|_| ["a", "b", "é"][next(3)]).collect())
                .collect();
            let pieces: Vec<String> = (0..1 + next(12))
                .map(|_| alphabet[next(alphabet.len())].to_string())
                .collect();
            let refs: Vec<&str> = stops.iter().map(String::as_str).collect();
            let (want, want_hit) = reference(&refs, &pieces);
            let mut s = StopStrings::new(stops.clone());
            let mut got = Vec::new();
            let mut hit = false;
            for p in &pieces {
                let (out, h) = s.push(p);
                got.push(out);
                if h {
                    hit = true;
                    break;
                }
            }
            assert_eq!(
                (got, hit),
                (want, want_hit),
                "stops {stops:?}, pieces {pieces:?}"
            );
        }
    }

    #[test]
    fn long_stop_strings_cost_time_in_proportion_to_the_text() {
        // 16 stop strings of 4 KiB that the text keeps almost matching: the automaton does a
        // bounded amount of work per byte (the rescanning version did ~10^10 comparisons here).
        let stop = format!("{}b", "a".repeat(4095));
        let mut s = StopStrings::new(vec![stop; 16]);
        for _ in 0..2000 {
            let (_, hit) = s.push("aaaa");
            assert!(!hit);
        }
        let (_, hit) = s.push("b");
        assert!(hit);
    }
}
