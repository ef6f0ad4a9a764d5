//! llama-server instances kvgate runs itself: the `--model` one (id
//! `main`) and those created through the admin API (`/instances`). A running
//! instance is an upstream of the [`App`], named by its id.
//!
//! Stopping an instance takes it out of the app first (no new request goes
//! there), saves its slots' unsaved messages (each save waits for the
//! generation in flight on its slot), and only then stops the process, so
//! its characters lose nothing and restore from disk wherever they go next.
//!
//! API-created instances and their parameters persist in the save directory
//! ([`records::INSTANCES_FILE`], written atomically) and come back with kvgate, in
//! the state they were left in. Every change of state goes through a
//! `starting`/`stopping` status that refuses concurrent changes (409), so no
//! lock is held while a process starts or stops. Each change of status is
//! told on the event stream (`instance`), and each instance keeps the tail
//! of its llama-server's output ([`log`]).

pub mod flags;
pub mod log;
pub mod records;
pub mod spec;
pub mod supervisor;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tracing::{error, info, warn};

use crate::app::App;
use crate::config::parse_upstream;
use crate::session;
use crate::store::meta::{now_unix, SaveKind};
use crate::sync::Unpoisoned;

use log::LogTail;
use records::Record;
pub use records::{INSTANCES_FILE, MAIN_ID};
use spec::{check_spec, parse_create, port_free, recheck, InstanceSpec};
use supervisor::Supervisor;

/// Why an instance request failed; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// Bad parameters, a port in use, or an action the instance refuses.
    #[error("{0}")]
    BadRequest(String),
    /// No such instance.
    #[error("no instance {0}")]
    NotFound(String),
    /// The instance is starting or stopping.
    #[error("instance {0} is {1}; try again when it is done")]
    Busy(String, &'static str),
    /// llama-server could not be started (its last log lines included).
    #[error("{0}")]
    Start(String),
    /// kvgate has no save directory to run instances over.
    #[error(
        "kvgate runs without --save-dir: instances need one for their slot files and their records"
    )]
    NoSaveDir,
    /// The instances file could not be written.
    #[error("cannot record the instances: {0}")]
    Persist(String),
    /// kvgate is shutting down.
    #[error("kvgate is shutting down")]
    Closing,
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Being started: waiting for llama-server's `/health`.
    Starting,
    /// Running (llama-server may be coming back from a crash: see
    /// `restarting` in the listing).
    Running,
    /// Being stopped: saves, then the process.
    Stopping,
    /// Not running.
    Stopped,
    /// Its last start failed.
    Failed,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Stopping => "stopping",
            Status::Stopped => "stopped",
            Status::Failed => "failed",
        }
    }
}

#[derive(Debug)]
struct Instance {
    id: String,
    spec: InstanceSpec,
    /// Recorded in [`records::INSTANCES_FILE`] (not the `--model` one, nor one not
    /// yet started).
    persisted: bool,
    /// Whether it should run: recorded, and resumed at kvgate's next start.
    wanted: bool,
    created: u64,
    status: Status,
    /// Why the last start failed.
    error: Option<String>,
    /// The running process.
    process: Option<Supervisor>,
    /// What its llama-server printed last, across starts and stops.
    log: Arc<LogTail>,
}

/// Every instance kvgate runs.
#[derive(Debug)]
pub struct Instances {
    app: Arc<App>,
    /// The save directory, when kvgate has one.
    dir: Option<PathBuf>,
    list: Mutex<Vec<Instance>>,
    /// Entries of the instances file that are not usable records, written
    /// back as they were read.
    unusable: Vec<Value>,
    /// Serialises writes of the instances file (never held across `.await`).
    writing: Mutex<()>,
    /// kvgate is shutting down: no more starts.
    closing: AtomicBool,
}

// === impl Instances ===

impl Instances {
    /// The instances recorded in `dir` (none without one), all stopped
    /// until [`Instances::resume`]. A file kvgate can't read is an error:
    /// starting without it would forget (and later overwrite) the records.
    /// A record refused by today's checks is kept and shown `failed` with
    /// the reason, and is not started; an entry that is no record at all is
    /// logged and written back untouched (see [`records::Loaded`]).
    pub fn load(app: Arc<App>, dir: Option<PathBuf>) -> Result<Instances, String> {
        let mut list: Vec<Instance> = Vec::new();
        let mut unusable = Vec::new();
        if let Some(d) = &dir {
            let loaded = records::read(d)?;
            for (entry, why) in loaded.unusable {
                error!(file = %d.join(INSTANCES_FILE).display(), %entry, reason = %why,
                    "an entry of the instances file is not a usable record: kept in the file, not loaded");
                unusable.push(entry);
            }
            for (r, refused) in loaded.records {
                if let Some(why) = &refused {
                    error!(instance = %r.id, reason = %why,
                        "recorded instance refused: it is not started; fix or delete its record");
                }
                list.push(Instance {
                    id: r.id,
                    spec: r.spec,
                    persisted: true,
                    wanted: r.running,
                    created: r.created,
                    status: if refused.is_some() {
                        Status::Failed
                    } else {
                        Status::Stopped
                    },
                    error: refused.map(|why| format!("refused: {why}")),
                    process: None,
                    log: Arc::default(),
                });
            }
        }
        Ok(Instances {
            app,
            dir,
            list: Mutex::new(list),
            unusable,
            writing: Mutex::new(()),
            closing: AtomicBool::new(false),
        })
    }

    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Instance>> {
        self.list.lock_unpoisoned()
    }

    fn closing(&self) -> Result<(), InstanceError> {
        if self.closing.load(Ordering::SeqCst) {
            Err(InstanceError::Closing)
        } else {
            Ok(())
        }
    }

    /// Starts the recorded instances that were left running (in the
    /// background of kvgate's start: a model may take minutes to load). One
    /// that fails stays `failed` and is still wanted at the next start.
    pub async fn resume(self: &Arc<Self>) {
        let ids: Vec<String> = self
            .list()
            .iter()
            .filter(|i| i.wanted)
            .map(|i| i.id.clone())
            .collect();
        for id in ids {
            let stopped = |s| match s {
                Status::Stopped => Ok(true),
                other => Err(other),
            };
            if !matches!(self.transition(&id, stopped, Status::Starting), Ok(Some(_))) {
                continue;
            }
            match self.launch(&id).await {
                Ok(()) => info!(instance = %id, "instance resumed"),
                Err(e) => warn!(instance = %id, error = %e, "instance did not come back"),
            }
        }
    }

    /// Starts the `--model` instance; kvgate does not serve without it.
    pub async fn start_main(&self, spec: InstanceSpec) -> Result<(), InstanceError> {
        self.list().push(Instance::starting(MAIN_ID.into(), spec));
        self.announce(MAIN_ID);
        self.launch(MAIN_ID).await
    }

    /// `POST /instances`: checks the parameters, starts llama-server, waits
    /// until it is healthy, adds it to the app and records it. A start or
    /// a record that fails leaves nothing behind.
    pub async fn create(&self, body: &Value) -> Result<Value, InstanceError> {
        if self.dir.is_none() {
            return Err(InstanceError::NoSaveDir);
        }
        self.closing()?;
        let spec = parse_create(body).map_err(InstanceError::BadRequest)?;
        // File checks touch the disk: off the runtime's threads.
        let spec = tokio::task::spawn_blocking(move || check_spec(spec))
            .await
            .map_err(|e| InstanceError::Start(e.to_string()))?
            .map_err(InstanceError::BadRequest)?;
        let id = {
            let mut list = self.list();
            if let Some(p) = spec.port {
                if let Some(other) = list.iter().find(|i| i.port() == Some(p)) {
                    return Err(InstanceError::BadRequest(format!(
                        "port {p} belongs to instance {}",
                        other.id
                    )));
                }
            }
            let n = list
                .iter()
                .filter_map(|i| i.id.strip_prefix("llama-")?.parse::<u64>().ok())
                .max()
                .unwrap_or(0)
                + 1;
            let id = format!("llama-{n}");
            // Recorded once it runs.
            list.push(Instance::starting(id.clone(), spec));
            id
        };
        self.announce(&id);
        if let Err(e) = self.launch(&id).await {
            self.list().retain(|i| i.id != id);
            self.announce(&id);
            return Err(e);
        }
        if let Some(i) = self.list().iter_mut().find(|i| i.id == id) {
            i.persisted = true;
        }
        if let Err(e) = self.persist(None) {
            // Not recorded, it would not come back: undo it.
            if let Ok(Some(_)) = self.transition(&id, running_only, Status::Stopping) {
                self.halt(&id).await;
            }
            self.list().retain(|i| i.id != id);
            self.announce(&id);
            return Err(e);
        }
        self.show(&id)
    }

    /// `GET /instances`.
    pub fn all(&self) -> Value {
        let ids: Vec<String> = self.list().iter().map(|i| i.id.clone()).collect();
        let list: Vec<Value> = ids.iter().filter_map(|id| self.show(id).ok()).collect();
        json!({ "instances": list })
    }

    /// One instance as the API shows it.
    pub fn show(&self, id: &str) -> Result<Value, InstanceError> {
        let (mut v, running) = {
            let list = self.list();
            let i = list
                .iter()
                .find(|i| i.id == id)
                .ok_or_else(|| InstanceError::NotFound(id.into()))?;
            let p = i.process.as_ref().map(|p| p.status());
            let v = json!({
                "id": i.id,
                "model": i.spec.model.display().to_string(),
                "slots": i.spec.slots,
                "ctx": i.spec.ctx,
                "port": i.port(),
                "args": i.spec.args,
                "status": i.status.as_str(),
                "origin": if i.id == MAIN_ID { "flag" } else { "api" },
                "created": i.created,
                "started": p.map(|p| p.since),
                "uptime_s": p.map(|p| now_unix().saturating_sub(p.since)),
                "pid": p.map(|p| p.pid),
                "restarts": p.map_or(0, |p| p.restarts),
                "restarting": p.is_some_and(|p| !p.up),
                "url": i.process.as_ref().map(|p| p.url.clone()),
                "error": i.error,
            });
            (v, i.process.is_some())
        };
        if let Some(upstream) = running.then(|| self.app.upstream(id)).flatten() {
            let g = upstream.gauges();
            v["slots_busy"] = g.busy.into();
            v["slots_free"] = g.free.into();
            v["slots_owned"] = g.owned.into();
            v["up"] = (g.upstreams_up > 0).into();
        }
        Ok(v)
    }

    /// `GET /instances/{id}/log`: the last lines its llama-server printed
    /// (kept across restarts, stops and failed starts; see [`log`]).
    pub fn log(&self, id: &str) -> Result<Value, InstanceError> {
        let tail = self
            .list()
            .iter()
            .find(|i| i.id == id)
            .map(|i| Arc::clone(&i.log))
            .ok_or_else(|| InstanceError::NotFound(id.into()))?;
        let (lines, total) = tail.lines();
        Ok(json!({"id": id, "lines": lines, "total": total}))
    }

    /// `POST /instances/{id}/start`: starts a stopped or failed instance
    /// (a running one is left alone).
    pub async fn start(&self, id: &str) -> Result<Value, InstanceError> {
        self.closing()?;
        let startable = |s| match s {
            Status::Stopped | Status::Failed => Ok(true),
            Status::Running => Ok(false),
            other => Err(other),
        };
        if self.transition(id, startable, Status::Starting)?.is_some() {
            self.launch(id).await?;
            if let Some(i) = self.list().iter_mut().find(|i| i.id == id) {
                i.wanted = true;
            }
            self.persist(None)?;
        }
        self.show(id)
    }

    /// `POST /instances/{id}/stop`: saves the instance's unsaved slots, then
    /// stops it (a stopped one is left alone).
    pub async fn stop(&self, id: &str) -> Result<Value, InstanceError> {
        if self
            .transition(id, running_only, Status::Stopping)?
            .is_some()
        {
            self.halt(id).await;
        }
        if let Some(i) = self.list().iter_mut().find(|i| i.id == id) {
            if i.status == Status::Stopping {
                i.status = Status::Stopped;
            }
            i.wanted = false;
        }
        self.announce(id);
        self.persist(None)?;
        self.show(id)
    }

    /// `DELETE /instances/{id}`: stops the instance if it runs (with its
    /// saves) and forgets it, record first.
    pub async fn delete(&self, id: &str) -> Result<Value, InstanceError> {
        if id == MAIN_ID && self.list().iter().any(|i| i.id == id) {
            return Err(InstanceError::BadRequest(
                "instance main was started by --model: stop it, or restart kvgate without --model"
                    .into(),
            ));
        }
        // `stopping` until it is gone: nothing can start it meanwhile.
        let any = |s| match s {
            Status::Running | Status::Stopped | Status::Failed => Ok(true),
            other => Err(other),
        };
        let before = self.transition(id, any, Status::Stopping)?;
        if before == Some(Status::Running) {
            self.halt(id).await;
        }
        let shown = self.show(id)?;
        if let Err(e) = self.persist(Some(id)) {
            if let Some(i) = self.list().iter_mut().find(|i| i.id == id) {
                i.status = Status::Stopped;
            }
            self.announce(id);
            return Err(e);
        }
        self.list().retain(|i| i.id != id);
        self.announce(id);
        info!(instance = id, "instance deleted");
        Ok(shown)
    }

    /// At kvgate's shutdown, after the last saves: refuses new starts, lets
    /// starts and stops under way finish (within the grace period), then
    /// stops every process. The records keep saying which were running, so
    /// they come back.
    pub async fn shutdown(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + self.app.shared.cfg.shutdown_grace;
        while self
            .list()
            .iter()
            .any(|i| matches!(i.status, Status::Starting | Status::Stopping))
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let processes: Vec<(String, Supervisor)> = self
            .list()
            .iter_mut()
            .filter_map(|i| Some((i.id.clone(), i.process.take()?)))
            .collect();
        for (id, p) in processes {
            if let Some(upstream) = self.app.remove(&id).await {
                upstream.pool.close();
            }
            p.stop().await;
        }
    }

    /// Moves `id` to `next` when `allowed` says so (`Ok(Some(previous))`);
    /// `Ok(None)`: nothing to do; a status in the middle of a change is
    /// refused.
    fn transition(
        &self,
        id: &str,
        allowed: impl Fn(Status) -> Result<bool, Status>,
        next: Status,
    ) -> Result<Option<Status>, InstanceError> {
        let previous = {
            let mut list = self.list();
            let i = list
                .iter_mut()
                .find(|i| i.id == id)
                .ok_or_else(|| InstanceError::NotFound(id.into()))?;
            match allowed(i.status) {
                Ok(true) => Some(std::mem::replace(&mut i.status, next)),
                Ok(false) => None,
                Err(s) => return Err(InstanceError::Busy(id.into(), s.as_str())),
            }
        };
        if previous.is_some() {
            self.announce(id);
        }
        Ok(previous)
    }

    /// Tells the event stream where instance `id` is now (`deleted` once
    /// it is gone), so a dashboard follows changes made by anyone.
    fn announce(&self, id: &str) {
        let now = self
            .list()
            .iter()
            .find(|i| i.id == id)
            .map(|i| (i.status.as_str(), i.error.clone()));
        let (status, error) = now.unwrap_or(("deleted", None));
        self.app.shared.events.emit(
            "instance",
            || json!({"id": id, "status": status, "error": error}),
        );
    }

    /// Starts the process of `id` (in status `starting`) and adds it to the
    /// app; on failure the instance is `failed` with the reason.
    async fn launch(&self, id: &str) -> Result<(), InstanceError> {
        let launched = self.launch_process(id).await;
        self.announce(id);
        launched
    }

    /// What [`Instances::launch`] does, before it tells the event stream.
    async fn launch_process(&self, id: &str) -> Result<(), InstanceError> {
        let (spec, log) = {
            let list = self.list();
            let i = list
                .iter()
                .find(|i| i.id == id)
                .ok_or_else(|| InstanceError::NotFound(id.into()))?;
            (i.spec.clone(), Arc::clone(&i.log))
        };
        // An API-created instance is checked again at every start: its
        // record may predate today's rules. (The `--model` one runs what
        // kvgate's operator passed on the command line.)
        let checked = if id == MAIN_ID {
            Ok(spec)
        } else {
            recheck(&spec).map_err(|e| InstanceError::BadRequest(format!("refused: {e}")))
        };
        let process = match checked {
            Ok(spec) => self.run_process(&spec, log).await,
            Err(e) => Err(e),
        };
        let started = match process {
            Ok(p) => match parse_upstream(&p.url) {
                Ok(uri) => Ok((p, uri)),
                Err(e) => {
                    p.stop().await;
                    Err(InstanceError::Start(e.to_string()))
                }
            },
            Err(e) => Err(e),
        };
        let (process, uri) = match started {
            Ok(x) => x,
            Err(e) => {
                if let Some(i) = self.list().iter_mut().find(|i| i.id == id) {
                    i.status = Status::Failed;
                    i.error = Some(e.to_string());
                }
                return Err(e);
            }
        };
        // kvgate's own key: the `--model` llama-server may run with
        // `--api-key` among its extra arguments.
        let upstream =
            self.app
                .build_upstream(id, uri, self.app.shared.cfg.upstream_api_key.clone());
        let refused = {
            let mut list = self.list();
            match list.iter_mut().find(|i| i.id == id) {
                Some(i) if !self.closing.load(Ordering::SeqCst) => {
                    // Added while the list is held, so no stop can come
                    // between the app and the record.
                    if self.app.add(upstream) {
                        i.process = Some(process);
                        i.status = Status::Running;
                        i.error = None;
                        None
                    } else {
                        i.status = Status::Failed;
                        i.error = Some(format!("an upstream named {id} exists"));
                        Some((
                            process,
                            InstanceError::Start(format!("an upstream named {id} exists")),
                        ))
                    }
                }
                _ => Some((process, InstanceError::Closing)),
            }
        };
        match refused {
            None => Ok(()),
            Some((process, e)) => {
                process.stop().await;
                Err(e)
            }
        }
    }

    async fn run_process(
        &self,
        spec: &InstanceSpec,
        log: Arc<LogTail>,
    ) -> Result<Supervisor, InstanceError> {
        let dir = self.dir.clone().ok_or(InstanceError::NoSaveDir)?;
        if let Some(p) = spec.port {
            port_free(p).map_err(InstanceError::BadRequest)?;
        }
        let binary = supervisor::find_binary(self.app.shared.cfg.llama_server.as_deref())
            .map_err(|e| InstanceError::Start(e.to_string()))?;
        Supervisor::start(
            supervisor::Spec {
                binary,
                model: spec.model.clone(),
                slots: spec.slots,
                ctx: spec.ctx,
                save_dir: dir,
                args: spec.args.clone(),
                port: spec.port,
            },
            log,
        )
        .await
        .map_err(|e| InstanceError::Start(e.to_string()))
    }

    /// Takes `id` (in status `stopping`) out of the app, saves its unsaved
    /// slots, and stops its process. The caller sets the status after.
    async fn halt(&self, id: &str) {
        if let Some(upstream) = self.app.remove(id).await {
            let saved = session::save_dirty_slots(
                &upstream,
                SaveKind::Shutdown,
                upstream.shared.cfg.shutdown_grace,
                false,
            )
            .await;
            upstream.pool.close();
            info!(
                instance = id,
                saved, "instance stopping: its slots are saved"
            );
        }
        let process = self
            .list()
            .iter_mut()
            .find(|i| i.id == id)
            .and_then(|i| i.process.take());
        if let Some(p) = process {
            p.stop().await;
        }
    }

    /// Writes the API-created instances (but `except`) to
    /// [`records::INSTANCES_FILE`] atomically.
    fn persist(&self, except: Option<&str>) -> Result<(), InstanceError> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let _writing = self.writing.lock_unpoisoned();
        let records: Vec<Record> = self
            .list()
            .iter()
            .filter(|i| i.persisted && Some(i.id.as_str()) != except)
            .map(|i| Record {
                id: i.id.clone(),
                spec: i.spec.clone(),
                running: i.wanted,
                created: i.created,
            })
            .collect();
        records::write(dir, &records, &self.unusable)
            .map_err(|e| InstanceError::Persist(e.to_string()))
    }
}

/// For a stop: only a running instance has anything to stop.
fn running_only(s: Status) -> Result<bool, Status> {
    match s {
        Status::Running => Ok(true),
        Status::Stopped | Status::Failed => Ok(false),
        other => Err(other),
    }
}

impl Instance {
    /// A new instance about to be started, not recorded yet.
    fn starting(id: String, spec: InstanceSpec) -> Instance {
        Instance {
            id,
            spec,
            persisted: false,
            wanted: true,
            created: now_unix(),
            status: Status::Starting,
            error: None,
            process: None,
            log: Arc::default(),
        }
    }

    /// The port it listens on, or will.
    fn port(&self) -> Option<u16> {
        self.process.as_ref().map(|p| p.port).or(self.spec.port)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::spec::*;
    use super::*;

    #[test]
    fn create_parameters_are_checked() {
        let spec =
            parse_create(&json!({"model": "/m.gguf", "slots": 3, "args": ["-t", "2"]})).unwrap();
        assert_eq!(
            spec,
            InstanceSpec {
                model: "/m.gguf".into(),
                slots: 3,
                ctx: 4096,
                port: None,
                args: vec!["-t".into(), "2".into()],
            }
        );
        for (bad, what) in [
            (json!([]), "JSON object"),
            (json!({}), "\"model\""),
            (json!({"model": ""}), "\"model\""),
            (json!({"model": "/m", "slots": 0}), "\"slots\""),
            (json!({"model": "/m", "slots": 257}), "\"slots\""),
            (json!({"model": "/m", "ctx": 100}), "\"ctx\""),
            (json!({"model": "/m", "port": 0}), "\"port\""),
            (json!({"model": "/m", "port": 70000}), "\"port\""),
            (json!({"model": "/m", "port": "80"}), "\"port\""),
            (json!({"model": "/m", "args": "-t 2"}), "\"args\""),
            (json!({"model": "/m", "args": [1]}), "\"args\""),
            (
                json!({"model": "/m", "args": ["--port", "9"]}),
                "set by kvgate",
            ),
            (
                json!({"model": "/m", "args": ["--slot-save-path=/"]}),
                "set by kvgate",
            ),
            (json!({"model": "/m", "gpu": 1}), "unknown parameter"),
        ] {
            let e = parse_create(&bad).unwrap_err();
            assert!(e.contains(what), "{bad}: {e}");
        }
    }

    #[test]
    fn only_gguf_files_and_free_ports_pass_the_checks() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("m.gguf");
        std::fs::write(&good, b"GGUF\x03\x00\x00\x00").unwrap();
        let bad = dir.path().join("n.gguf");
        std::fs::write(&bad, b"not a model").unwrap();
        let spec = |m: &Path, port| InstanceSpec {
            model: m.to_path_buf(),
            slots: 1,
            ctx: 256,
            port,
            args: vec![],
        };
        assert_eq!(
            check_spec(spec(&good, None)).unwrap().model,
            good.canonicalize().unwrap()
        );
        assert!(check_spec(spec(&bad, None))
            .unwrap_err()
            .contains("not a GGUF"));
        assert!(check_spec(spec(dir.path(), None))
            .unwrap_err()
            .contains("not a GGUF"));
        assert!(check_spec(spec(&dir.path().join("none"), None)).is_err());
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        assert!(check_spec(spec(&good, Some(port)))
            .unwrap_err()
            .contains("in use"));
    }
}
