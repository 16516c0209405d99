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
#[derive(Debug, Default, Clone)]
pub struct StopStrings {
    stops: Vec<String>,
    /// All text seen (after any cut, nothing more is accepted).
    text: String,
    /// Bytes of `text` already released.
    released: usize,
    hit: bool,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Default::default()
        }
    }

    /// Adds text; returns what may be released now and whether a stop string was hit (then
    /// the text is cut before it and generation should end).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.hit {
            return (String::new(), true);
        }
        // A stop string may straddle the old text and the new piece.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.text.len().saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.text.push_str(piece);
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(cut) = found {
            self.text.truncate(cut);
            self.hit = true;
            return (self.release(self.text.len()), true);
        }
        // Hold back the longest tail that is a prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if i > keep && self.text.ends_with(&s[..i]) {
                    keep = i;
                }
            }
        }
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
}
