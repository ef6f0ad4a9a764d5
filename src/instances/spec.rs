//! What an instance runs ([`InstanceSpec`]), and the checks a spec passes
//! before kvgate starts anything: the API body's shape (pure), then the
//! model file and the port.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::instances::flags::check_args;

/// Slots an instance may have.
const MAX_SLOTS: u64 = 256;
/// Context per slot, in tokens.
const CTX_RANGE: std::ops::RangeInclusive<u64> = 256..=1 << 20;

/// What an instance runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// The GGUF model (absolute).
    pub model: PathBuf,
    /// Slots (`-np`).
    pub slots: u32,
    /// Context per slot.
    pub ctx: u32,
    /// The port asked for; a free one at each start when `None`.
    pub port: Option<u16>,
    /// Extra llama-server arguments.
    pub args: Vec<String>,
}

/// Checks a `POST /instances` body and makes it a spec (pure: the model
/// file and the port are checked by [`check_spec`]).
pub fn parse_create(body: &Value) -> Result<InstanceSpec, String> {
    let obj = body.as_object().ok_or("the body must be a JSON object")?;
    if let Some(k) = obj
        .keys()
        .find(|k| !["model", "slots", "ctx", "port", "args"].contains(&k.as_str()))
    {
        return Err(format!(
            "unknown parameter {k:?} (model, slots, ctx, port, args)"
        ));
    }
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() && !m.contains('\0') => PathBuf::from(m),
        _ => return Err("\"model\" must be the path of a GGUF file".into()),
    };
    let number = |k: &str, default: u64, range: std::ops::RangeInclusive<u64>| match obj.get(k) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_u64().filter(|n| range.contains(n)).ok_or_else(|| {
            format!(
                "{k:?} must be a whole number from {} to {}",
                range.start(),
                range.end()
            )
        }),
    };
    let slots = number("slots", 2, 1..=MAX_SLOTS)?;
    let ctx = number("ctx", 4096, CTX_RANGE)?;
    let port = match obj.get("port") {
        None | Some(Value::Null) => None,
        Some(_) => Some(number("port", 0, 1..=65535)?),
    };
    let args: Vec<String> = match obj.get("args") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().filter(|s| !s.contains('\0')).map(str::to_string))
            .collect::<Option<_>>()
            .ok_or("\"args\" must be an array of strings")?,
        Some(_) => return Err("\"args\" must be an array of strings".into()),
    };
    // Only tuning flags, their values checked (see `flags`); stored as
    // llama-server will read them.
    let args = check_args(&args)?;
    // The ranges above make these conversions lossless.
    Ok(InstanceSpec {
        model,
        slots: u32::try_from(slots).unwrap_or(u32::MAX),
        ctx: u32::try_from(ctx).unwrap_or(u32::MAX),
        port: port.map(|p| u16::try_from(p).unwrap_or(u16::MAX)),
        args,
    })
}

/// Checks a spec read back from the instances file, or about to be started,
/// the way [`parse_create`] checked it when it came in: the rules may have
/// tightened since it was recorded (an allowlist of flags replaced a
/// denylist), and a spec that would be refused now is not run.
/// Returns the spec as it will run (its flags spelled as llama-server reads
/// them).
pub fn recheck(spec: &InstanceSpec) -> Result<InstanceSpec, String> {
    let mut body = serde_json::to_value(spec).map_err(|e| e.to_string())?;
    if let Some(o) = body.as_object_mut() {
        o.retain(|_, v| !v.is_null());
    }
    parse_create(&body)
}

/// Checks what [`parse_create`] can't: the model is a readable GGUF file (its
/// path made absolute, so a restarted kvgate finds it), and the port is free.
pub fn check_spec(mut spec: InstanceSpec) -> Result<InstanceSpec, String> {
    let shown = spec.model.display().to_string();
    let path = std::fs::canonicalize(&spec.model).map_err(|e| format!("model {shown}: {e}"))?;
    // A FIFO or a device would block the open or the read.
    if !path.is_file() {
        return Err(format!("model {shown} is not a GGUF file"));
    }
    let mut magic = [0u8; 4];
    let read =
        std::fs::File::open(&path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic));
    if !path.is_file() || read.is_err() || &magic != b"GGUF" {
        return Err(format!("model {shown} is not a GGUF file"));
    }
    spec.model = path;
    if let Some(port) = spec.port {
        port_free(port)?;
    }
    Ok(spec)
}

pub(crate) fn port_free(port: u16) -> Result<(), String> {
    std::net::TcpListener::bind(("127.0.0.1", port))
        .map(drop)
        .map_err(|e| format!("port {port} is in use ({e})"))
}
