//! Writes a tiny, random-weight GGUF model that a real `llama-server` loads.
//!
//! End-to-end tests need a model, but a real one is hundreds of megabytes and
//! slow on a CPU. This module writes a complete `llama`-architecture model in
//! GGUF v3 with F32 tensors whose weights come from a small seeded PRNG, so the
//! same [`TinyModelSpec`] always yields the same bytes. The weights are random:
//! the model loads, tokenizes, evaluates prompts and fills its KV cache like any
//! other, but everything it generates is gibberish. That is all a test of slot
//! handling and cache persistence needs.
//!
//! # Vocabulary
//!
//! The vocabulary is byte-level and SentencePiece-style
//! (`tokenizer.ggml.model = "llama"`): `<unk>`, `<s>`, `</s>`, the 256 byte
//! tokens `<0x00>`..`<0xFF>` and the word-boundary piece `▁` (which the
//! tokenizer substitutes for a space). No multi-byte pieces exist, so any
//! UTF-8 text tokenizes to exactly one token per byte (plus BOS). That makes
//! prompt lengths predictable: a test that wants a 3000-token prompt sends
//! about 3000 bytes, and the cache counters llama-server reports can be checked
//! against byte counts. `add_space_prefix` is off so no hidden leading token is
//! added either.
//!
//! # Size
//!
//! The default spec has 115,520 weights (a 470 KB file); llama-server loads it
//! in about 10 ms and evaluates a 3000-token prompt in a few tens of
//! milliseconds on two CPU threads. Bigger specs (`n_embd: 256, n_layer: 4,
//! n_head: 4, n_ff: 512` is 2.8M weights, 11 MB) make prompt processing
//! dominate request time, which benchmarks want.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// Required alignment of the tensor data section and of every tensor in it.
const ALIGNMENT: u64 = 32;

/// Token ids of the special tokens at the front of the vocabulary.
const UNK_ID: u32 = 0;
const BOS_ID: u32 = 1;
const EOS_ID: u32 = 2;

/// llama.cpp token types (`llama_token_type`).
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_BYTE: i32 = 6;

/// GGUF value types (`gguf_type`).
const GGUF_TYPE_UINT32: u32 = 4;
const GGUF_TYPE_INT32: u32 = 5;
const GGUF_TYPE_FLOAT32: u32 = 6;
const GGUF_TYPE_BOOL: u32 = 7;
const GGUF_TYPE_STRING: u32 = 8;
const GGUF_TYPE_ARRAY: u32 = 9;

/// ggml tensor type F32, and `general.file_type` "all F32".
const GGML_TYPE_F32: u32 = 0;
const FILE_TYPE_ALL_F32: u32 = 0;

/// Shape and seed of a tiny model.
#[derive(Debug, Clone)]
pub struct TinyModelSpec {
    /// Width of the residual stream; must be a multiple of `n_head`.
    pub n_embd: u32,
    /// Number of transformer blocks.
    pub n_layer: u32,
    /// Attention heads (the KV heads are as many: no grouped-query attention).
    pub n_head: u32,
    /// Hidden width of the SwiGLU feed-forward network.
    pub n_ff: u32,
    /// Context length the model claims to be trained for; llama-server caps
    /// per-slot context at this.
    pub n_ctx_train: u32,
    /// Seed of the weight PRNG: the same seed gives the same file.
    pub seed: u64,
}

impl Default for TinyModelSpec {
    fn default() -> Self {
        Self {
            n_embd: 64,
            n_layer: 2,
            n_head: 2,
            n_ff: 128,
            n_ctx_train: 8192,
            seed: 1,
        }
    }
}

// === impl TinyModelSpec ===

impl TinyModelSpec {
    /// Number of weights (all tensors, F32) in the model this spec describes.
    pub fn n_params(&self) -> u64 {
        self.tensors().iter().map(|t| t.n_elements()).sum()
    }

    /// Size of the vocabulary: the special tokens, 256 bytes and `▁`.
    pub fn n_vocab(&self) -> u32 {
        vocab().len() as u32
    }

    fn validate(&self) -> io::Result<()> {
        let bad = |msg: &str| Err(io::Error::new(io::ErrorKind::InvalidInput, msg.to_owned()));
        if self.n_embd == 0 || self.n_layer == 0 || self.n_head == 0 || self.n_ff == 0 {
            return bad("tiny model: every dimension must be non-zero");
        }
        if self.n_embd % self.n_head != 0 {
            return bad("tiny model: n_embd must be a multiple of n_head");
        }
        if self.n_ctx_train == 0 {
            return bad("tiny model: n_ctx_train must be non-zero");
        }
        Ok(())
    }

    /// Every tensor in file order, with its ggml shape (`ne[0]` first).
    fn tensors(&self) -> Vec<TensorDesc> {
        let (e, f, v) = (
            u64::from(self.n_embd),
            u64::from(self.n_ff),
            u64::from(self.n_vocab()),
        );
        let mut out = vec![
            TensorDesc::matrix("token_embd.weight", e, v),
            TensorDesc::norm("output_norm.weight", e),
            TensorDesc::matrix("output.weight", e, v),
        ];
        for i in 0..self.n_layer {
            out.push(TensorDesc::norm(&format!("blk.{i}.attn_norm.weight"), e));
            for w in ["attn_q", "attn_k", "attn_v", "attn_output"] {
                out.push(TensorDesc::matrix(&format!("blk.{i}.{w}.weight"), e, e));
            }
            out.push(TensorDesc::norm(&format!("blk.{i}.ffn_norm.weight"), e));
            out.push(TensorDesc::matrix(
                &format!("blk.{i}.ffn_gate.weight"),
                e,
                f,
            ));
            out.push(TensorDesc::matrix(
                &format!("blk.{i}.ffn_down.weight"),
                f,
                e,
            ));
            out.push(TensorDesc::matrix(&format!("blk.{i}.ffn_up.weight"), e, f));
        }
        out
    }
}

/// One tensor: name, ggml dimensions and how its values are made.
#[derive(Debug)]
struct TensorDesc {
    name: String,
    ne: Vec<u64>,
    /// RMS-norm weights are all ones; everything else is random.
    is_norm: bool,
}

impl TensorDesc {
    fn matrix(name: &str, ne0: u64, ne1: u64) -> Self {
        Self {
            name: name.to_owned(),
            ne: vec![ne0, ne1],
            is_norm: false,
        }
    }

    fn norm(name: &str, ne0: u64) -> Self {
        Self {
            name: name.to_owned(),
            ne: vec![ne0],
            is_norm: true,
        }
    }

    fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }

    fn n_bytes(&self) -> u64 {
        self.n_elements() * 4
    }
}

/// Token texts and types, in id order.
fn vocab() -> Vec<(String, i32)> {
    let mut v = vec![
        ("<unk>".to_owned(), TOKEN_TYPE_UNKNOWN),
        ("<s>".to_owned(), TOKEN_TYPE_CONTROL),
        ("</s>".to_owned(), TOKEN_TYPE_CONTROL),
    ];
    v.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), TOKEN_TYPE_BYTE)));
    // The tokenizer turns spaces into U+2581; without this piece a space
    // would fall back to its three UTF-8 bytes.
    v.push(("\u{2581}".to_owned(), TOKEN_TYPE_NORMAL));
    v
}

/// Writes the model described by `spec` to `path`.
///
/// The file is written next to `path` under a temporary name and renamed into
/// place, so a reader never sees a half-written model.
pub fn write_tiny_model(path: &Path, spec: &TinyModelSpec) -> io::Result<()> {
    spec.validate()?;
    let tmp = temp_path(path);
    let result = File::create(&tmp).and_then(|file| {
        let mut w = BufWriter::new(file);
        write_gguf(&mut w, spec)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    });
    match result.and_then(|()| fs::rename(&tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}", std::process::id()));
    path.with_file_name(name)
}

/// Writes the whole GGUF file: header, metadata, tensor infos, tensor data.
fn write_gguf<W: Write>(w: &mut W, spec: &TinyModelSpec) -> io::Result<()> {
    let mut g = GgufWriter { w, written: 0 };
    let tensors = spec.tensors();
    let vocab = vocab();
    let scalars = ScalarKvs::of(spec, vocab.len());
    write_header(&mut g, tensors.len(), scalars.len() + VOCAB_AND_NAME_KVS)?;
    write_metadata(&mut g, &scalars, &vocab)?;
    write_tensor_infos(&mut g, &tensors)?;
    write_tensor_data(&mut g, &tensors, spec.seed)
}

/// Metadata keys [`write_metadata`] writes besides the [`ScalarKvs`]:
/// architecture, name, tokenizer model, tokens, scores, token types.
const VOCAB_AND_NAME_KVS: usize = 6;

/// The numeric and boolean metadata, grouped by GGUF value type.
struct ScalarKvs {
    u32s: [(&'static str, u32); 13],
    f32s: [(&'static str, f32); 2],
    bools: [(&'static str, bool); 3],
}

impl ScalarKvs {
    /// The values for `spec`, whose vocabulary has `n_vocab` tokens.
    fn of(spec: &TinyModelSpec, n_vocab: usize) -> ScalarKvs {
        let head_dim = spec.n_embd / spec.n_head;
        ScalarKvs {
            u32s: [
                ("general.alignment", ALIGNMENT as u32),
                ("general.file_type", FILE_TYPE_ALL_F32),
                ("llama.vocab_size", n_vocab as u32),
                ("llama.context_length", spec.n_ctx_train),
                ("llama.embedding_length", spec.n_embd),
                ("llama.block_count", spec.n_layer),
                ("llama.feed_forward_length", spec.n_ff),
                ("llama.attention.head_count", spec.n_head),
                ("llama.attention.head_count_kv", spec.n_head),
                ("llama.rope.dimension_count", head_dim),
                ("tokenizer.ggml.unknown_token_id", UNK_ID),
                ("tokenizer.ggml.bos_token_id", BOS_ID),
                ("tokenizer.ggml.eos_token_id", EOS_ID),
            ],
            f32s: [
                ("llama.rope.freq_base", 10_000.0),
                ("llama.attention.layer_norm_rms_epsilon", 1e-5),
            ],
            bools: [
                ("tokenizer.ggml.add_bos_token", true),
                ("tokenizer.ggml.add_eos_token", false),
                ("tokenizer.ggml.add_space_prefix", false),
            ],
        }
    }

    /// How many keys these are.
    fn len(&self) -> usize {
        self.u32s.len() + self.f32s.len() + self.bools.len()
    }
}

/// Writes the magic, the version (3) and the tensor and key counts.
fn write_header<W: Write>(
    g: &mut GgufWriter<'_, W>,
    n_tensors: usize,
    n_kv: usize,
) -> io::Result<()> {
    g.bytes(b"GGUF")?;
    g.u32(3)?;
    g.u64(n_tensors as u64)?;
    g.u64(n_kv as u64)
}

/// Writes every metadata key: names, the scalars, then the tokenizer and
/// its vocabulary arrays.
fn write_metadata<W: Write>(
    g: &mut GgufWriter<'_, W>,
    scalars: &ScalarKvs,
    vocab: &[(String, i32)],
) -> io::Result<()> {
    g.kv_str("general.architecture", "llama")?;
    g.kv_str("general.name", "kvgate-tiny")?;
    for (k, v) in scalars.u32s {
        g.key(k, GGUF_TYPE_UINT32)?;
        g.u32(v)?;
    }
    for (k, v) in scalars.f32s {
        g.key(k, GGUF_TYPE_FLOAT32)?;
        g.f32(v)?;
    }
    for (k, v) in scalars.bools {
        g.key(k, GGUF_TYPE_BOOL)?;
        g.bytes(&[u8::from(v)])?;
    }
    g.kv_str("tokenizer.ggml.model", "llama")?;
    g.array_header("tokenizer.ggml.tokens", GGUF_TYPE_STRING, vocab.len())?;
    for (text, _) in vocab {
        g.str(text)?;
    }
    g.array_header("tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, vocab.len())?;
    for _ in vocab {
        g.f32(0.0)?;
    }
    g.array_header("tokenizer.ggml.token_type", GGUF_TYPE_INT32, vocab.len())?;
    for (_, ty) in vocab {
        g.bytes(&ty.to_le_bytes())?;
    }
    Ok(())
}

/// Writes each tensor's name, shape, type and data offset, then pads to the
/// data section. Offsets are relative to the data section and each tensor
/// starts on an ALIGNMENT boundary.
fn write_tensor_infos<W: Write>(
    g: &mut GgufWriter<'_, W>,
    tensors: &[TensorDesc],
) -> io::Result<()> {
    let mut offset = 0u64;
    for t in tensors {
        g.str(&t.name)?;
        g.u32(t.ne.len() as u32)?;
        for &d in &t.ne {
            g.u64(d)?;
        }
        g.u32(GGML_TYPE_F32)?;
        g.u64(offset)?;
        offset += pad_to(t.n_bytes(), ALIGNMENT);
    }
    g.pad()
}

/// Writes every tensor's values, each padded to ALIGNMENT: ones for the
/// norms, seeded random weights for the rest.
fn write_tensor_data<W: Write>(
    g: &mut GgufWriter<'_, W>,
    tensors: &[TensorDesc],
    seed: u64,
) -> io::Result<()> {
    let mut rng = SplitMix64::new(seed);
    for t in tensors {
        // Uniform in ±1/sqrt(fan_in) keeps activations of the random network
        // in a sane range, so no NaN or inf can reach the sampler.
        let scale = 1.0 / (t.ne[0] as f32).sqrt();
        for _ in 0..t.n_elements() {
            let v = if t.is_norm {
                1.0
            } else {
                rng.next_f32_signed() * scale
            };
            g.f32(v)?;
        }
        g.pad()?;
    }
    Ok(())
}

fn pad_to(n: u64, align: u64) -> u64 {
    n.div_ceil(align) * align
}

/// Little-endian GGUF primitives over a writer, counting bytes for padding.
struct GgufWriter<'a, W: Write> {
    w: &'a mut W,
    written: u64,
}

impl<W: Write> GgufWriter<'_, W> {
    fn bytes(&mut self, b: &[u8]) -> io::Result<()> {
        self.written += b.len() as u64;
        self.w.write_all(b)
    }

    fn u32(&mut self, v: u32) -> io::Result<()> {
        self.bytes(&v.to_le_bytes())
    }

    fn u64(&mut self, v: u64) -> io::Result<()> {
        self.bytes(&v.to_le_bytes())
    }

    fn f32(&mut self, v: f32) -> io::Result<()> {
        self.bytes(&v.to_le_bytes())
    }

    fn str(&mut self, s: &str) -> io::Result<()> {
        self.u64(s.len() as u64)?;
        self.bytes(s.as_bytes())
    }

    fn key(&mut self, key: &str, ty: u32) -> io::Result<()> {
        self.str(key)?;
        self.u32(ty)
    }

    fn kv_str(&mut self, key: &str, value: &str) -> io::Result<()> {
        self.key(key, GGUF_TYPE_STRING)?;
        self.str(value)
    }

    fn array_header(&mut self, key: &str, elem_ty: u32, n: usize) -> io::Result<()> {
        self.key(key, GGUF_TYPE_ARRAY)?;
        self.u32(elem_ty)?;
        self.u64(n as u64)
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = pad_to(self.written, ALIGNMENT) - self.written;
        self.bytes(&[0u8; ALIGNMENT as usize][..n as usize])
    }
}

/// SplitMix64: tiny, fast and good enough for random weights.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn next_f32_signed(&mut self) -> f32 {
        // 24 high bits fill an f32 mantissa exactly.
        let unit = (self.next_u64() >> 40) as f32 / (1u32 << 24) as f32;
        unit * 2.0 - 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_to_vec(spec: &TinyModelSpec) -> Vec<u8> {
        let mut buf = Vec::new();
        write_gguf(&mut buf, spec).unwrap();
        buf
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn header_has_magic_version_and_counts() {
        let spec = TinyModelSpec::default();
        let b = write_to_vec(&spec);
        assert_eq!(&b[0..4], b"GGUF");
        assert_eq!(u32_at(&b, 4), 3);
        assert_eq!(u64_at(&b, 8), 3 + 9 * u64::from(spec.n_layer));
        assert_eq!(u64_at(&b, 16), 24);
        // First key is general.architecture = "llama".
        assert_eq!(u64_at(&b, 24), "general.architecture".len() as u64);
        assert_eq!(&b[32..52], b"general.architecture");
        assert_eq!(u32_at(&b, 52), GGUF_TYPE_STRING);
        assert_eq!(u64_at(&b, 56), 5);
        assert_eq!(&b[64..69], b"llama");
    }

    #[test]
    fn file_is_aligned_and_holds_every_weight() {
        let spec = TinyModelSpec::default();
        let b = write_to_vec(&spec);
        assert_eq!(b.len() as u64 % ALIGNMENT, 0);
        // The data section is at least every weight, four bytes each.
        assert!(b.len() as u64 > spec.n_params() * 4);
        assert!((b.len() as u64) < spec.n_params() * 4 + 64 * 1024);
    }

    #[test]
    fn n_params_matches_shapes() {
        let spec = TinyModelSpec::default();
        let (e, f, v, l) = (64u64, 128u64, 260u64, 2u64);
        assert_eq!(spec.n_vocab(), 260);
        assert_eq!(
            spec.n_params(),
            2 * v * e + e + l * (2 * e + 4 * e * e + 3 * e * f)
        );
    }

    #[test]
    fn size_grows_with_spec() {
        let small = write_to_vec(&TinyModelSpec::default());
        let big = write_to_vec(&TinyModelSpec {
            n_embd: 128,
            n_layer: 3,
            n_head: 4,
            n_ff: 256,
            ..TinyModelSpec::default()
        });
        assert!(big.len() > small.len());
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_weights() {
        let a = write_to_vec(&TinyModelSpec::default());
        let b = write_to_vec(&TinyModelSpec::default());
        assert_eq!(a, b);
        let c = write_to_vec(&TinyModelSpec {
            seed: 2,
            ..TinyModelSpec::default()
        });
        assert_eq!(a.len(), c.len());
        assert_ne!(a, c);
    }

    #[test]
    fn vocab_is_byte_level() {
        let v = vocab();
        assert_eq!(v[BOS_ID as usize].0, "<s>");
        assert_eq!(v[EOS_ID as usize].0, "</s>");
        assert_eq!(v[3 + 0x41], ("<0x41>".to_owned(), TOKEN_TYPE_BYTE));
        assert_eq!(v.iter().filter(|t| t.1 == TOKEN_TYPE_BYTE).count(), 256);
    }

    #[test]
    fn writes_file_atomically_and_rejects_bad_spec() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_model(&path, &TinyModelSpec::default()).unwrap();
        let on_disk = fs::read(&path).unwrap();
        assert_eq!(on_disk, write_to_vec(&TinyModelSpec::default()));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

        let bad = TinyModelSpec {
            n_head: 3,
            ..TinyModelSpec::default()
        };
        let err = write_tiny_model(&dir.path().join("bad.gguf"), &bad).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
