//! The llama-server flags an API-created instance may pass in its `args`: an
//! allowlist of tuning flags (offload, threads, batches, cache types, flash
//! attention, rope/yarn, sampling defaults, chat-template choice), each with
//! its value checked. Pure: a table and the function that reads `args`
//! against it.
//!
//! Why an allowlist: the admin key lets a client start processes, and
//! llama-server has flags that run programs (`--mcp-servers-json`), expose a
//! shell tool on the front port (`--tools`, `-ag`), write or serve files
//! anywhere (`--log-file`, `--path`, `--models-dir`), or reach other hosts
//! (`--rpc`). A denylist misses the next such flag; an allowlist fails closed.
//!
//! Spelling follows llama.cpp's `common/arg.cpp`: every alias of a flag is
//! accepted, `--long_name` means `--long-name` (llama.cpp replaces `_` in
//! `--` flags), and a value is the next argument, whatever it looks like.
//! llama.cpp has no `--flag=value` form, so kvgate accepts it and stores it
//! as two arguments: what is stored is what llama-server is given.

/// What a flag's value must be.
#[derive(Debug, Clone, Copy)]
enum Value {
    /// No value: the flag alone is the setting.
    Switch,
    /// A whole number in the range.
    Int(i64, i64),
    /// A finite number in the range.
    Float(f64, f64),
    /// One of these words.
    Word(&'static [&'static str]),
    /// A whole number in the range, or one of these words.
    IntOrWord(i64, i64, &'static [&'static str]),
    /// Comma-separated device names (`CUDA0,CUDA1`), or `none`.
    Devices,
    /// Proportions separated by `,` or `/` (`3,1`).
    Proportions,
    /// The name of one of llama.cpp's built-in chat templates (not a
    /// template's text: that is code llama-server would run).
    TemplateName,
}

/// One allowed flag: every spelling llama.cpp accepts for it, and its value.
#[derive(Debug)]
struct Flag {
    names: &'static [&'static str],
    value: Value,
}

/// llama.cpp's on/off/auto words (`is_truthy`, `is_falsey`, `is_autoy`).
const ON_OFF_AUTO: &[&str] = &[
    "on", "enabled", "true", "1", "off", "disabled", "false", "0", "auto", "-1",
];
/// KV cache types llama.cpp accepts (`kv_cache_types` in arg.cpp).
const CACHE_TYPES: &[&str] = &[
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1",
];
/// Enough for any context or token count llama.cpp handles.
const TOKENS: i64 = 1 << 24;

const fn flag(names: &'static [&'static str], value: Value) -> Flag {
    Flag { names, value }
}

/// The flags an instance may pass.
const ALLOWED: &[Flag] = &[
    // Offload and devices.
    flag(
        &["-ngl", "--gpu-layers", "--n-gpu-layers"],
        Value::IntOrWord(-2, 100_000, &["auto", "all"]),
    ),
    flag(
        &["-sm", "--split-mode"],
        Value::Word(&["none", "layer", "row", "tensor"]),
    ),
    flag(&["-ts", "--tensor-split"], Value::Proportions),
    flag(&["-mg", "--main-gpu"], Value::Int(0, 255)),
    flag(&["-dev", "--device"], Value::Devices),
    flag(&["-kvo", "--kv-offload"], Value::Switch),
    flag(&["-nkvo", "--no-kv-offload"], Value::Switch),
    flag(&["-cmoe", "--cpu-moe"], Value::Switch),
    flag(&["-ncmoe", "--n-cpu-moe"], Value::Int(0, 100_000)),
    flag(&["--op-offload"], Value::Switch),
    flag(&["--no-op-offload"], Value::Switch),
    flag(&["--repack"], Value::Switch),
    flag(&["-nr", "--no-repack"], Value::Switch),
    flag(&["--no-host"], Value::Switch),
    // Memory and loading.
    flag(
        &["-lm", "--load-mode"],
        Value::Word(&["auto", "none", "mmap", "mlock", "mmap+mlock", "dio"]),
    ),
    flag(
        &["-lzm", "--lazy-mode"],
        Value::Word(&["on", "auto", "off"]),
    ),
    flag(
        &["--numa"],
        Value::Word(&["distribute", "isolate", "numactl"]),
    ),
    // Threads and batches.
    flag(&["-t", "--threads"], Value::Int(-1, 1024)),
    flag(&["-tb", "--threads-batch"], Value::Int(-1, 1024)),
    flag(&["--threads-http"], Value::Int(-1, 1024)),
    flag(&["-b", "--batch-size"], Value::Int(1, TOKENS)),
    flag(&["-ub", "--ubatch-size"], Value::Int(1, TOKENS)),
    flag(&["-cb", "--cont-batching"], Value::Switch),
    flag(&["-nocb", "--no-cont-batching"], Value::Switch),
    flag(&["--warmup"], Value::Switch),
    flag(&["--no-warmup"], Value::Switch),
    // The KV cache.
    flag(&["-ctk", "--cache-type-k"], Value::Word(CACHE_TYPES)),
    flag(&["-ctv", "--cache-type-v"], Value::Word(CACHE_TYPES)),
    flag(&["-fa", "--flash-attn"], Value::Word(ON_OFF_AUTO)),
    flag(&["--swa-full"], Value::Switch),
    flag(
        &["-ctxcp", "--ctx-checkpoints", "--swa-checkpoints"],
        Value::Int(0, 1024),
    ),
    flag(&["-cram", "--cache-ram"], Value::Int(-1, TOKENS)),
    flag(&["-kvu", "--kv-unified"], Value::Switch),
    flag(&["-no-kvu", "--no-kv-unified"], Value::Switch),
    flag(&["--cache-reuse"], Value::Int(0, TOKENS)),
    flag(&["--context-shift"], Value::Switch),
    flag(&["--no-context-shift"], Value::Switch),
    flag(&["--keep"], Value::Int(-1, TOKENS)),
    // RoPE and YaRN.
    flag(
        &["--rope-scaling"],
        Value::Word(&["none", "linear", "yarn"]),
    ),
    flag(&["--rope-scale"], Value::Float(0.0, 1e6)),
    flag(&["--rope-freq-base"], Value::Float(0.0, 1e12)),
    flag(&["--rope-freq-scale"], Value::Float(0.0, 1e6)),
    flag(&["--yarn-orig-ctx"], Value::Int(0, TOKENS)),
    flag(&["--yarn-ext-factor"], Value::Float(-1.0, 1e3)),
    flag(&["--yarn-attn-factor"], Value::Float(-1.0, 1e3)),
    flag(&["--yarn-beta-slow"], Value::Float(-1.0, 1e3)),
    flag(&["--yarn-beta-fast"], Value::Float(-1.0, 1e3)),
    // Sampling defaults (a request's own parameters still win).
    flag(&["-n", "--predict", "--n-predict"], Value::Int(-2, TOKENS)),
    flag(&["-s", "--seed"], Value::Int(-1, u32::MAX as i64)),
    flag(&["--temp", "--temperature"], Value::Float(0.0, 100.0)),
    flag(&["--top-k"], Value::Int(0, 1_000_000)),
    flag(&["--top-p"], Value::Float(0.0, 1.0)),
    flag(&["--min-p"], Value::Float(0.0, 1.0)),
    flag(&["--typical", "--typical-p"], Value::Float(0.0, 1.0)),
    flag(
        &["--top-nsigma", "--top-n-sigma"],
        Value::Float(-1.0, 100.0),
    ),
    flag(&["--xtc-probability"], Value::Float(0.0, 1.0)),
    flag(&["--xtc-threshold"], Value::Float(0.0, 1.0)),
    flag(&["--repeat-last-n"], Value::Int(-1, TOKENS)),
    flag(&["--repeat-penalty"], Value::Float(0.0, 100.0)),
    flag(&["--presence-penalty"], Value::Float(-100.0, 100.0)),
    flag(&["--frequency-penalty"], Value::Float(-100.0, 100.0)),
    flag(&["--dry-multiplier"], Value::Float(0.0, 100.0)),
    flag(&["--dry-base"], Value::Float(0.0, 100.0)),
    flag(&["--dry-allowed-length"], Value::Int(0, TOKENS)),
    flag(&["--dry-penalty-last-n"], Value::Int(-1, TOKENS)),
    flag(&["--dynatemp-range"], Value::Float(0.0, 100.0)),
    flag(&["--dynatemp-exp"], Value::Float(0.0, 100.0)),
    flag(&["--mirostat"], Value::Int(0, 2)),
    flag(&["--mirostat-lr"], Value::Float(0.0, 10.0)),
    flag(&["--mirostat-ent"], Value::Float(0.0, 100.0)),
    flag(
        &["-sps", "--slot-prompt-similarity"],
        Value::Float(0.0, 1.0),
    ),
    // Chat templates and reasoning.
    flag(&["--jinja"], Value::Switch),
    flag(&["--no-jinja"], Value::Switch),
    flag(&["--chat-template"], Value::TemplateName),
    flag(
        &["--reasoning-format"],
        Value::Word(&["none", "auto", "deepseek", "deepseek-legacy"]),
    ),
    flag(&["-rea", "--reasoning"], Value::Word(ON_OFF_AUTO)),
    flag(&["--reasoning-budget"], Value::Int(-1, TOKENS)),
];

/// Flags kvgate sets itself on every llama-server it runs.
const MANAGED: &[&str] = &[
    "-m",
    "--model",
    "-mu",
    "--model-url",
    "-hf",
    "-hfr",
    "--hf-repo",
    "-hff",
    "--hf-file",
    "--host",
    "--port",
    "-np",
    "--parallel",
    "-c",
    "--ctx-size",
    "--slot-save-path",
    "--api-key",
    "--api-key-file",
];

/// Checks an instance's `args` against the allowlist and returns them as
/// llama-server will be given them (`--flag=value` split in two, `_` in a
/// long flag made `-`). The error names the first argument refused.
pub fn check_args(args: &[String]) -> Result<Vec<String>, String> {
    let mut out = Vec::with_capacity(args.len());
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let (given, inline) = split_inline(arg);
        let name = canonical(given);
        if MANAGED.contains(&name.as_str()) {
            return Err(format!(
                "{given:?} is set by kvgate (model, slots, ctx and port are parameters of their own)"
            ));
        }
        let Some(flag) = ALLOWED.iter().find(|f| f.names.contains(&name.as_str())) else {
            return Err(refused(given));
        };
        out.push(name.clone());
        if let Value::Switch = flag.value {
            if inline.is_some() {
                return Err(format!("{given:?} takes no value"));
            }
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => rest
                .next()
                .map(String::as_str)
                .ok_or_else(|| format!("{given:?} needs a value"))?,
        };
        check_value(flag.value, value).map_err(|why| format!("{given:?} {value:?}: {why}"))?;
        out.push(value.to_string());
    }
    Ok(out)
}

/// `--flag=value` as its two parts (only long flags have that form).
fn split_inline(arg: &str) -> (&str, Option<&str>) {
    match arg.split_once('=') {
        Some((flag, value)) if arg.starts_with("--") => (flag, Some(value)),
        _ => (arg, None),
    }
}

/// The flag as llama.cpp looks it up: `_` in a `--` flag means `-`.
fn canonical(flag: &str) -> String {
    if flag.starts_with("--") {
        flag.replace('_', "-")
    } else {
        flag.to_string()
    }
}

fn refused(given: &str) -> String {
    if !given.starts_with('-') {
        return format!(
            "{given:?} is not a flag: \"args\" holds llama-server flags, each followed by its value"
        );
    }
    format!(
        "{given:?} is not allowed: instances take only llama-server's tuning flags (offload, \
         threads, batch sizes, cache types, flash attention, rope/yarn, sampling defaults, chat \
         template); kvgate's operator can pass any flag to the --model instance"
    )
}

fn check_value(kind: Value, v: &str) -> Result<(), String> {
    match kind {
        Value::Switch => Ok(()),
        Value::Int(lo, hi) => int_in(v, lo, hi),
        Value::Float(lo, hi) => float_in(v, lo, hi),
        Value::Word(words) => word_in(v, words),
        Value::IntOrWord(lo, hi, words) => {
            if words.contains(&v) {
                Ok(())
            } else {
                int_in(v, lo, hi).map_err(|e| format!("{e}, or one of {}", words.join(", ")))
            }
        }
        Value::Devices => devices(v),
        Value::Proportions => proportions(v),
        Value::TemplateName => template_name(v),
    }
}

fn int_in(v: &str, lo: i64, hi: i64) -> Result<(), String> {
    match v.parse::<i64>() {
        Ok(n) if (lo..=hi).contains(&n) => Ok(()),
        _ => Err(format!("must be a whole number from {lo} to {hi}")),
    }
}

fn float_in(v: &str, lo: f64, hi: f64) -> Result<(), String> {
    // `inf` and `nan` parse, and are refused here.
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(()),
        _ => Err(format!("must be a number from {lo} to {hi}")),
    }
}

fn word_in(v: &str, words: &[&str]) -> Result<(), String> {
    if words.contains(&v) {
        Ok(())
    } else {
        Err(format!("must be one of {}", words.join(", ")))
    }
}

/// Device names as ggml reports them (`CUDA0`, `Vulkan1`, `MTL0`): letters,
/// digits, `_` and `-`; never a path.
fn devices(v: &str) -> Result<(), String> {
    let ok = |d: &str| {
        !d.is_empty()
            && d.len() <= 32
            && d.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    let list: Vec<&str> = v.split(',').collect();
    if list.len() <= 16 && list.iter().all(|d| ok(d)) {
        Ok(())
    } else {
        Err("must be device names separated by commas (CUDA0,CUDA1), or none".into())
    }
}

fn proportions(v: &str) -> Result<(), String> {
    let parts: Vec<&str> = v.split([',', '/']).collect();
    let ok = parts.len() <= 16
        && parts
            .iter()
            .all(|p| p.parse::<f64>().is_ok_and(|x| x.is_finite() && x >= 0.0));
    if ok {
        Ok(())
    } else {
        Err("must be proportions separated by commas (3,1)".into())
    }
}

/// A built-in template's name (`chatml`, `llama3`, `mistral-v7-tekken`,
/// `seed_oss`, `granite-4.0`): llama-server checks it is one it knows.
fn template_name(v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err("must be the name of one of llama.cpp's built-in chat templates (chatml, llama3, …); a template's text is refused".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(args: &[&str]) -> Result<Vec<String>, String> {
        check_args(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn dangerous_flags_are_refused_by_name() {
        for (args, named) in [
            (&["--mcp-servers-json", "{}"][..], "--mcp-servers-json"),
            (&["--mcp-servers-config", "/x"], "--mcp-servers-config"),
            (&["--tools", "all"], "--tools"),
            (&["-ag"], "-ag"),
            (&["--agent"], "--agent"),
            (&["--log-file", "/tmp/x"], "--log-file"),
            (&["--log-file=/tmp/x"], "--log-file"),
            (&["--log_file", "/tmp/x"], "--log_file"),
            (&["--path", "/"], "--path"),
            (&["--models-dir", "/"], "--models-dir"),
            (&["-dr"], "-dr"),
            (&["--rpc", "10.0.0.1:50052"], "--rpc"),
            (&["--api-prefix", "/x"], "--api-prefix"),
            (
                &["--chat-template-file", "/etc/passwd"],
                "--chat-template-file",
            ),
            (&["--media-path", "/"], "--media-path"),
            (&["--lora", "/x.gguf"], "--lora"),
            (&["-t", "2", "--props"], "--props"),
            (&["--no-slots"], "--no-slots"),
        ] {
            let e = check(args).unwrap_err();
            assert!(e.contains(&format!("{named:?}")), "{args:?}: {e}");
            assert!(e.contains("not allowed"), "{args:?}: {e}");
        }
    }

    #[test]
    fn flags_kvgate_sets_are_refused_as_such() {
        for args in [
            &["--port", "9"][..],
            &["-m", "/x.gguf"],
            &["--slot-save-path=/"],
            &["--slot_save_path", "/"],
            &["-np", "4"],
            &["-c", "8192"],
            &["--api-key", "k"],
        ] {
            let e = check(args).unwrap_err();
            assert!(e.contains("set by kvgate"), "{args:?}: {e}");
        }
    }

    #[test]
    fn tuning_flags_pass_in_either_form_and_come_out_as_llama_server_reads_them() {
        let args = [
            "-ngl",
            "99",
            "--gpu-layers=all",
            "-t",
            "8",
            "--threads-batch=4",
            "-b",
            "2048",
            "-ub",
            "512",
            "-ctk",
            "q8_0",
            "--cache-type-v=q4_0",
            "-fa",
            "on",
            "--flash-attn",
            "auto",
            "--rope-scaling",
            "yarn",
            "--rope-freq-base",
            "1e6",
            "--yarn_orig_ctx",
            "32768",
            "-sm",
            "row",
            "-ts",
            "3,1",
            "-mg",
            "1",
            "-dev",
            "CUDA0,CUDA1",
            "-nkvo",
            "-cb",
            "--no-cont-batching",
            "--temp",
            "0.7",
            "--top-k",
            "40",
            "--top-p",
            "0.95",
            "--min-p",
            "0.05",
            "--repeat-penalty",
            "1.1",
            "--repeat-last-n",
            "64",
            "--presence-penalty",
            "-0.5",
            "--frequency-penalty",
            "0.2",
            "--seed",
            "-1",
            "-n",
            "256",
            "--keep",
            "-1",
            "--cache-reuse",
            "256",
            "--swa-full",
            "--ctx-checkpoints",
            "8",
            "--cache-ram",
            "-1",
            "--jinja",
            "--no-jinja",
            "--chat-template",
            "chatml",
            "--reasoning-format",
            "deepseek",
            "--reasoning-budget",
            "0",
            "-kvu",
            "--numa",
            "distribute",
            "-lm",
            "mmap+mlock",
        ];
        let out = check(&args).unwrap();
        assert!(out.windows(2).any(|w| w == ["--gpu-layers", "all"]));
        assert!(out.windows(2).any(|w| w == ["--threads-batch", "4"]));
        assert!(out.windows(2).any(|w| w == ["--yarn-orig-ctx", "32768"]));
        assert!(!out.iter().any(|a| a.contains('=')), "{out:?}");
        assert_eq!(out.len(), args.len() + 3, "three inline values split");
        assert_eq!(check(&[]).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn values_are_checked() {
        for (args, why) in [
            (&["-ngl"][..], "needs a value"),
            (&["-ngl", "lots"], "whole number"),
            (&["-t", "100000"], "whole number"),
            (&["-b", "0"], "whole number"),
            (&["--temp", "nan"], "a number"),
            (&["--temp", "inf"], "a number"),
            (&["--top-p", "1.5"], "a number"),
            (&["-ctk", "q2_k"], "one of"),
            (&["-fa", "maybe"], "one of"),
            (&["-dev", "/dev/nvidia0"], "device names"),
            (&["-dev", "CUDA0,"], "device names"),
            (&["-ts", "3,x"], "proportions"),
            (&["--chat-template", "{{ messages }}"], "built-in"),
            (&["--swa-full=1"], "takes no value"),
            (&["--mirostat", "3"], "whole number"),
            (&["model.gguf"], "not a flag"),
        ] {
            let e = check(args).unwrap_err();
            assert!(e.contains(why), "{args:?}: {e}");
            let flag = args[0].split('=').next().unwrap();
            assert!(e.contains(&format!("{flag:?}")), "names the flag: {e}");
        }
    }

    #[test]
    fn the_table_is_consistent() {
        let mut seen = std::collections::HashSet::new();
        for f in ALLOWED {
            for n in f.names {
                assert!(
                    n.starts_with('-') && !n.contains('_') && !n.contains('='),
                    "{n}"
                );
                assert!(seen.insert(*n), "{n} listed twice");
                assert!(!MANAGED.contains(n), "{n} is managed");
            }
        }
    }
}
