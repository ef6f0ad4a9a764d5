//! Slot actions, `POST /slots/{id}?action=save|restore|erase`: real files in
//! the save directory whose header is [`kvgate::llama::slot_file::encode_header`],
//! names checked like llama.cpp's `fs_validate_filename`.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use kvgate::llama::slot_file;

use super::http::{error_resp, json_ok, parse_json, query_param, Resp};
use super::state::{lock, Shared};
use super::N_VOCAB;

/// Validates a slot file name like llama.cpp's `fs_validate_filename`
/// (common/common.cpp) without subdirectories.
pub fn validate_filename(name: &str) -> bool {
    if name.is_empty() || name.len() > 255 {
        return false;
    }
    for c in name.chars() {
        let c = c as u32;
        let forbidden = c <= 0x1F
            || c == 0x7F
            || (0x80..=0x9F).contains(&c)
            || c == 0xFF0E
            || c == 0x2215
            || c == 0x2216
            || c == 0xFFFD
            || c == 0xFEFF
            || [':', '*', '?', '"', '<', '>', '|', '/', '\\']
                .contains(&char::from_u32(c).unwrap_or('\0'));
        if forbidden {
            return false;
        }
    }
    !(name.starts_with(' ')
        || name.ends_with(' ')
        || name.ends_with('.')
        || name.contains("..")
        || name == ".")
}

/// `std::stoi`-like parse: leading whitespace, sign, digits, rest ignored.
fn stoi(s: &str) -> Option<i64> {
    let s = s.trim_start();
    let (neg, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let end = digits.bytes().take_while(u8::is_ascii_digit).count();
    let n: i64 = digits[..end].parse().ok()?;
    if n > i32::MAX as i64 + 1 {
        return None;
    }
    Some(if neg { -n } else { n })
}

pub(super) async fn post_slot_action(
    shared: &Arc<Shared>,
    id_str: &str,
    query: Option<&str>,
    body: &[u8],
) -> Resp {
    let Some(save_dir) = shared.save_dir.clone() else {
        return error_resp(
            501,
            "This server does not support slots action. Start it with `--slot-save-path`",
        );
    };
    let Some(id) = stoi(id_str) else {
        return error_resp(400, "Invalid slot ID");
    };
    let action = query_param(query, "action").unwrap_or_default();
    if !matches!(action.as_str(), "save" | "restore" | "erase") {
        return error_resp(400, "Invalid action");
    }
    let mut filename = None;
    if action != "erase" {
        let v = match parse_json(body) {
            Ok(v) => v,
            Err(r) => return *r,
        };
        let Some(name) = v.get("filename").and_then(Value::as_str) else {
            return error_resp(
                400,
                "[json.exception.out_of_range.403] key 'filename' not found",
            );
        };
        if !validate_filename(name) {
            return error_resp(400, "Invalid filename");
        }
        filename = Some(name.to_string());
    }

    let process = shared.process();
    let _task_id = process.new_task_id();
    if id < 0 {
        return error_resp(400, "Invalid slot ID");
    }
    let slot = id as usize % shared.n_slots;
    // Deferred until the slot is free, like the real server.
    let guard = process.acquire(Some(slot)).await;
    let t0 = Instant::now();
    let knobs = shared.knobs();

    match action.as_str() {
        "save" => {
            let filename = filename.expect("save has a filename");
            if let Some(status) = lock(&shared.knobs).fail_next_save.take() {
                return error_resp(status, "Unable to save slot");
            }
            tokio::time::sleep(knobs.save_delay).await;
            let tokens = guard.state().tokens.clone();
            let mut data = slot_file::encode_header(&tokens);
            let payload = tokens.len() * shared.payload_bytes_per_token;
            data.extend((0..payload).map(|i| (i % 251) as u8));
            if tokio::fs::write(save_dir.join(&filename), &data)
                .await
                .is_err()
            {
                return error_resp(500, "Unable to save slot");
            }
            json_ok(&json!({
                "id_slot": slot,
                "filename": filename,
                "n_saved": tokens.len(),
                "n_written": data.len(),
                "timings": { "save_ms": t0.elapsed().as_secs_f64() * 1000.0 },
            }))
        }
        "restore" => {
            let filename = filename.expect("restore has a filename");
            tokio::time::sleep(knobs.restore_delay).await;
            let path = save_dir.join(&filename);
            let forced = std::mem::take(&mut lock(&shared.knobs).fail_next_restore);
            let result = if forced {
                Err("No available space in KV cache or invalid slot save file")
            } else {
                match slot_file::read_tokens(&path) {
                    Err(_) => Err("No available space in KV cache or invalid slot save file"),
                    Ok(t) if t.len() > shared.n_ctx => {
                        Err("Restored prompt does not fit in the slot context")
                    }
                    Ok(t) if t.iter().any(|&x| !(0..N_VOCAB).contains(&x)) => {
                        Err("Invalid tokens in slot save file")
                    }
                    Ok(t) => Ok(t),
                }
            };
            match result {
                Ok(tokens) => {
                    let n_read = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    let n = tokens.len();
                    guard.state().tokens = tokens;
                    json_ok(&json!({
                        "id_slot": slot,
                        "filename": filename,
                        "n_restored": n,
                        "n_read": n_read,
                        "timings": { "restore_ms": t0.elapsed().as_secs_f64() * 1000.0 },
                    }))
                }
                Err(msg) => {
                    guard.state().tokens.clear();
                    error_resp(400, format!("Unable to restore slot: {msg}"))
                }
            }
        }
        _ => {
            let n_erased = std::mem::take(&mut guard.state().tokens).len();
            json_ok(&json!({ "id_slot": slot, "n_erased": n_erased }))
        }
    }
}
