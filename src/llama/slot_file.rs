//! Reader for the header of llama-server slot save files.
//!
//! `POST /slots/{id}?action=save` makes llama-server write the slot's KV cache
//! with `llama_state_seq_save_file`. The file begins with a small header that
//! holds the token ids the slot had cached, followed by the (large) KV payload.
//! This module reads only that header, so the proxy can learn which prompt a
//! file holds without loading the payload, and it can write such a header for
//! tests.
//!
//! Layout (all integers little-endian, as written on the x86/ARM hosts
//! llama.cpp runs on), per llama.cpp b11434:
//!
//! ```text
//! u32 magic     = 0x67677371 ("ggsq")        include/llama.h LLAMA_STATE_SEQ_MAGIC
//! u32 version   = 4                          include/llama.h LLAMA_STATE_SEQ_VERSION
//! u32 n_packed                               src/llama-context.cpp state_seq_save_file
//! i32 packed[n_packed]                       server_tokens::serialize (tools/server/server-common.cpp)
//! ... KV state (never read here)
//! ```
//!
//! `packed` is either the current "server tokens state":
//!
//! ```text
//! i32 -1                  marker (LLAMA_TOKEN_NULL)
//! u32 1                   state version (SERVER_TOKENS_STATE_VERSION)
//! u32 n_tokens, i32 tokens[n_tokens]
//! u32 n_media, u32 media_start[n_media]
//! n_media x (u32 len, u8 bytes[len])          media chunks, then zero padding to 4 bytes
//! ```
//!
//! or, when it is empty or its first word is not -1, a plain token list as
//! written by older llama-server versions (`server_tokens::deserialize`).
//! Media positions appear as -1 in the returned token list.

use std::io::Read;
use std::path::Path;

/// Magic number at the start of a sequence state file ("ggsq").
pub const MAGIC: u32 = 0x6767_7371;
/// The only file version llama-server's loader accepts.
pub const VERSION: u32 = 4;
/// Marker word that starts the current token-state encoding.
pub const STATE_MARKER: i32 = -1;
/// Version of the token-state encoding inside the header.
pub const STATE_VERSION: u32 = 1;
/// Largest `n_packed` accepted (16 Mi words, 64 MiB), so a corrupt or hostile
/// file cannot make the reader allocate gigabytes.
pub const MAX_PACKED_WORDS: u32 = 16 * 1024 * 1024;

/// Size of the fixed part of the header: magic, version, n_packed.
const FIXED_LEN: usize = 12;

/// Why a slot file header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SlotFileError {
    /// The file could not be opened or read.
    #[error("slot file i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The file does not start with the "ggsq" magic.
    #[error("not a slot save file (magic {0:#010x})")]
    BadMagic(u32),
    /// The file version (must be 4) or the embedded token-state version
    /// (must be 1) is not supported.
    #[error("unsupported slot file version {0}")]
    UnsupportedVersion(u32),
    /// The file ends before the header does.
    #[error("slot file header is truncated")]
    Truncated,
    /// The header is complete but its contents are inconsistent.
    #[error("malformed slot file header: {0}")]
    Malformed(&'static str),
}

/// Reads only the header: the token ids the slot held. Never reads the KV payload.
pub fn read_tokens(path: &Path) -> Result<Vec<i32>, SlotFileError> {
    let mut file = std::fs::File::open(path)?;
    let mut fixed = [0u8; FIXED_LEN];
    read_exact_or_truncated(&mut file, &mut fixed)?;
    let n_packed = check_fixed(&fixed)?;
    let mut packed = vec![0u8; n_packed * 4];
    read_exact_or_truncated(&mut file, &mut packed)?;
    decode_packed(&packed)
}

/// Parses the header from a buffer holding at least the header (trailing
/// payload bytes are ignored).
pub fn parse_tokens(bytes: &[u8]) -> Result<Vec<i32>, SlotFileError> {
    let fixed = bytes.get(..FIXED_LEN);
    let Some(fixed) = fixed else {
        // Still report a wrong magic if we have enough bytes to see it.
        if bytes.len() >= 4 {
            let magic = u32_at(bytes, 0);
            if magic != MAGIC {
                return Err(SlotFileError::BadMagic(magic));
            }
        }
        return Err(SlotFileError::Truncated);
    };
    let n_packed = check_fixed(fixed)?;
    let packed = bytes
        .get(FIXED_LEN..FIXED_LEN + n_packed * 4)
        .ok_or(SlotFileError::Truncated)?;
    decode_packed(packed)
}

/// Encodes a header in exactly llama-server's current format: the fixed part
/// followed by the token state with no media. A real file continues with the
/// KV payload.
pub fn encode_header(tokens: &[i32]) -> Vec<u8> {
    let n_packed = u32::try_from(tokens.len() + 4).expect("token count fits in u32");
    let mut out = Vec::with_capacity(FIXED_LEN + n_packed as usize * 4);
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&n_packed.to_le_bytes());
    out.extend_from_slice(&STATE_MARKER.to_le_bytes());
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
    for t in tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    out.extend_from_slice(&0u32.to_le_bytes()); // no media chunks
    out
}

fn read_exact_or_truncated(file: &mut std::fs::File, buf: &mut [u8]) -> Result<(), SlotFileError> {
    file.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => SlotFileError::Truncated,
        _ => SlotFileError::Io(e),
    })
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Checks magic and version; returns `n_packed` (in words).
fn check_fixed(fixed: &[u8]) -> Result<usize, SlotFileError> {
    let magic = u32_at(fixed, 0);
    if magic != MAGIC {
        return Err(SlotFileError::BadMagic(magic));
    }
    let version = u32_at(fixed, 4);
    if version != VERSION {
        return Err(SlotFileError::UnsupportedVersion(version));
    }
    let n_packed = u32_at(fixed, 8);
    if n_packed > MAX_PACKED_WORDS {
        return Err(SlotFileError::Malformed("token state too large"));
    }
    Ok(n_packed as usize)
}

/// Decodes the packed token state (`n_packed` words as bytes), following
/// `server_tokens::deserialize`.
fn decode_packed(packed: &[u8]) -> Result<Vec<i32>, SlotFileError> {
    debug_assert!(packed.len() % 4 == 0);
    let words = || {
        packed
            .chunks_exact(4)
            .map(|w| i32::from_le_bytes([w[0], w[1], w[2], w[3]]))
    };
    if packed.is_empty() || words().next() != Some(STATE_MARKER) {
        // Plain token list, as written by older llama-server versions.
        return Ok(words().collect());
    }

    let mut r = Reader {
        data: packed,
        pos: 4,
    };
    let state_version = r.u32()?;
    if state_version != STATE_VERSION {
        return Err(SlotFileError::UnsupportedVersion(state_version));
    }
    let n_tokens = r.len(4)?;
    let tokens: Vec<i32> = r
        .take(n_tokens * 4)?
        .chunks_exact(4)
        .map(|w| i32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .collect();
    let n_media = r.len(4)?;
    let mut media_starts = Vec::with_capacity(n_media);
    for _ in 0..n_media {
        media_starts.push(r.u32()? as usize);
    }
    for start in media_starts {
        if start >= tokens.len() || tokens[start] != STATE_MARKER {
            return Err(SlotFileError::Malformed(
                "media chunk position is not a media token",
            ));
        }
        let len = r.len(1)?;
        if len == 0 {
            return Err(SlotFileError::Malformed("empty media chunk"));
        }
        r.take(len)?;
    }
    if r.data.len() - r.pos >= 4 {
        return Err(SlotFileError::Malformed("trailing data in token state"));
    }
    Ok(tokens)
}

/// Bounds-checked cursor over the packed token state.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SlotFileError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or(SlotFileError::Malformed("unexpected end of token state"))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, SlotFileError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Reads a vector length and checks that `len * elem_size` bytes remain,
    /// before anything is allocated (like llama.cpp's `read_vector`).
    fn len(&mut self, elem_size: usize) -> Result<usize, SlotFileError> {
        let n = self.u32()? as usize;
        if n > (self.data.len() - self.pos) / elem_size {
            return Err(SlotFileError::Malformed("unexpected end of token state"));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed(n_packed: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&MAGIC.to_le_bytes());
        v.extend_from_slice(&VERSION.to_le_bytes());
        v.extend_from_slice(&n_packed.to_le_bytes());
        v
    }

    fn push_words(v: &mut Vec<u8>, words: &[i32]) {
        for w in words {
            v.extend_from_slice(&w.to_le_bytes());
        }
    }

    #[test]
    fn round_trip() {
        let tokens = vec![1, 75, 3, 259, 0, 151_935];
        let mut bytes = encode_header(&tokens);
        assert_eq!(bytes.len(), 12 + 4 * (tokens.len() + 4));
        assert_eq!(parse_tokens(&bytes).unwrap(), tokens);
        // The payload that follows is ignored.
        bytes.extend_from_slice(&[0xAB; 1000]);
        assert_eq!(parse_tokens(&bytes).unwrap(), tokens);
    }

    #[test]
    fn round_trip_empty() {
        let bytes = encode_header(&[]);
        assert_eq!(bytes.len(), 12 + 16);
        assert_eq!(parse_tokens(&bytes).unwrap(), Vec::<i32>::new());
    }

    #[test]
    fn exact_layout() {
        let bytes = encode_header(&[7, 8]);
        let mut expected = fixed(6);
        push_words(&mut expected, &[-1, 1, 2, 7, 8, 0]);
        assert_eq!(bytes, expected);
        assert_eq!(&bytes[..4], b"qsgg");
    }

    #[test]
    fn read_from_file_ignores_payload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slot.bin");
        let tokens: Vec<i32> = (0..500).collect();
        let mut bytes = encode_header(&tokens);
        bytes.extend_from_slice(&[0x5Au8; 64 * 500]);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_tokens(&path).unwrap(), tokens);
    }

    #[test]
    fn missing_file_is_io() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_tokens(&dir.path().join("nope.bin")).unwrap_err();
        assert!(matches!(err, SlotFileError::Io(_)), "{err:?}");
    }

    #[test]
    fn truncated() {
        let bytes = encode_header(&[1, 2, 3, 4]);
        for cut in 0..bytes.len() {
            let err = parse_tokens(&bytes[..cut]).unwrap_err();
            assert!(
                matches!(err, SlotFileError::Truncated),
                "cut {cut}: {err:?}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        std::fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
        assert!(matches!(read_tokens(&path), Err(SlotFileError::Truncated)));
    }

    #[test]
    fn bad_magic() {
        let mut bytes = encode_header(&[1]);
        bytes[0] = b'x';
        assert!(matches!(
            parse_tokens(&bytes),
            Err(SlotFileError::BadMagic(_))
        ));
        assert!(matches!(
            parse_tokens(b"GGUF\x03\0"),
            Err(SlotFileError::BadMagic(0x4655_4747))
        ));
    }

    #[test]
    fn unsupported_versions() {
        let mut bytes = encode_header(&[1]);
        bytes[4] = 3;
        assert!(matches!(
            parse_tokens(&bytes),
            Err(SlotFileError::UnsupportedVersion(3))
        ));
        let mut bytes = encode_header(&[1]);
        bytes[16] = 2; // token-state version
        assert!(matches!(
            parse_tokens(&bytes),
            Err(SlotFileError::UnsupportedVersion(2))
        ));
    }

    #[test]
    fn legacy_plain_token_list() {
        let mut bytes = fixed(3);
        push_words(&mut bytes, &[1, 500, 42]);
        bytes.extend_from_slice(&[0; 32]);
        assert_eq!(parse_tokens(&bytes).unwrap(), vec![1, 500, 42]);
        // n_packed == 0 is an empty plain list.
        assert_eq!(parse_tokens(&fixed(0)).unwrap(), Vec::<i32>::new());
    }

    #[test]
    fn hostile_counts_rejected_without_allocating() {
        let bytes = fixed(MAX_PACKED_WORDS + 1);
        assert!(matches!(
            parse_tokens(&bytes),
            Err(SlotFileError::Malformed(_))
        ));
        let bytes = fixed(u32::MAX);
        assert!(matches!(
            parse_tokens(&bytes),
            Err(SlotFileError::Malformed(_))
        ));
        // An inner token count larger than the packed state.
        let mut bytes = fixed(4);
        push_words(&mut bytes, &[-1, 1, i32::MAX, 0]);
        assert!(matches!(
            parse_tokens(&bytes),
            Err(SlotFileError::Malformed(_))
        ));
    }

    #[test]
    fn trailing_words_rejected() {
        let mut bytes = fixed(5);
        push_words(&mut bytes, &[-1, 1, 0, 0, 99]);
        assert!(matches!(
            parse_tokens(&bytes),
            Err(SlotFileError::Malformed(_))
        ));
    }

    #[test]
    fn media_chunks_are_skipped() {
        // Tokens [5, -1, -1, 6] with one media chunk at 1 of 5 bytes (padded).
        let mut state = Vec::new();
        push_words(&mut state, &[-1, 1, 4, 5, -1, -1, 6, 1, 1]);
        state.extend_from_slice(&5u32.to_le_bytes());
        state.extend_from_slice(b"abcde");
        while state.len() % 4 != 0 {
            state.push(0);
        }
        let mut bytes = fixed((state.len() / 4) as u32);
        bytes.extend_from_slice(&state);
        assert_eq!(parse_tokens(&bytes).unwrap(), vec![5, -1, -1, 6]);

        // A media key pointing at a text token is malformed.
        let mut state = Vec::new();
        push_words(&mut state, &[-1, 1, 2, 5, -1, 1, 0, 1, 7]);
        let mut bytes = fixed((state.len() / 4) as u32);
        bytes.extend_from_slice(&state);
        assert!(matches!(
            parse_tokens(&bytes),
            Err(SlotFileError::Malformed(_))
        ));
    }
}
