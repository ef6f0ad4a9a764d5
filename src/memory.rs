//! What kvgate remembers of past requests, whatever upstream served them:
//! each tenant's last prompt (its hash tells a swipe; its text feeds
//! preloads), each character's last chat, each client's chat.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::sync::Unpoisoned;
use crate::tenant::Tenant;

/// How many tenants' prompt fingerprints and clients' chats are remembered.
const MEMORY: usize = 4096;
/// How many full prompts are kept for preloads.
const PROMPTS_KEPT: usize = 64;
/// Longest prompt kept for preloads (bytes).
const PROMPT_KEPT_MAX: usize = 4 << 20;

/// What kvgate remembers of past requests (see the module docs).
#[derive(Debug)]
pub struct Memory(Mutex<Remembered>);

#[derive(Debug)]
struct Remembered {
    prompt_hashes: LruCache<Tenant, u64>,
    prompts: LruCache<Tenant, Arc<str>>,
    client_chats: LruCache<String, String>,
    character_chats: LruCache<String, String>,
}

impl Default for Memory {
    fn default() -> Memory {
        Memory(Mutex::new(Remembered {
            prompt_hashes: lru(MEMORY),
            prompts: lru(PROMPTS_KEPT),
            client_chats: lru(MEMORY),
            character_chats: lru(MEMORY),
        }))
    }
}

impl Memory {
    fn lock(&self) -> std::sync::MutexGuard<'_, Remembered> {
        self.0.lock_unpoisoned()
    }

    /// The tenant's previous prompt fingerprint.
    pub fn previous_prompt(&self, tenant: &Tenant) -> Option<u64> {
        self.lock().prompt_hashes.peek(tenant).copied()
    }

    /// Remembers a request: its prompt fingerprint, its text (for preloads),
    /// the chat its character was last seen in.
    pub fn remember_prompt(&self, tenant: &Tenant, hash: u64, text: Option<&str>) {
        // Copy the prompt (up to megabytes) before taking the lock every
        // request takes.
        let kept: Option<Arc<str>> = match (tenant, text) {
            (Tenant::Character { .. }, Some(t)) if t.len() <= PROMPT_KEPT_MAX => Some(Arc::from(t)),
            _ => None,
        };
        let mut m = self.lock();
        m.prompt_hashes.put(tenant.clone(), hash);
        if let (Tenant::Character { chat, name }, Some(_)) = (tenant, text) {
            m.character_chats.put(name.clone(), chat.clone());
        }
        if let Some(prompt) = kept {
            m.prompts.put(tenant.clone(), prompt);
        }
    }

    /// The last prompt kvgate saw for a tenant.
    pub fn last_prompt(&self, tenant: &Tenant) -> Option<Arc<str>> {
        self.lock().prompts.peek(tenant).cloned()
    }

    /// The chat kvgate last saw a character in.
    pub fn last_chat_of(&self, character: &str) -> Option<String> {
        self.lock().character_chats.peek(character).cloned()
    }

    /// Records that `client` now talks to `chat`; returns the previous chat
    /// when it was another one (a chat switch).
    pub fn note_client_chat(&self, client: &str, chat: &str) -> Option<String> {
        match self
            .lock()
            .client_chats
            .put(client.to_string(), chat.to_string())
        {
            Some(prev) if prev != chat => Some(prev),
            _ => None,
        }
    }
}

fn lru<K: std::hash::Hash + Eq, V>(n: usize) -> LruCache<K, V> {
    LruCache::new(NonZeroUsize::new(n).expect("nonzero constant"))
}
