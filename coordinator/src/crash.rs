//! What the coordinator leaves behind when it panics: a snapshot of the round-state map and
//! the backtrace, written to the data directory before the process dies.
//!
//! The snapshot holds, per shard of the site map, each site's id, connection, counters and
//! the run's round and stage — no keys, no shares, no vectors. The hook never blocks: a shard
//! whose lock is held (perhaps by the panicking thread itself) is reported as locked.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde_json::{Value, json};

use crate::hub::Hub;
use crate::status::Progress;

struct Watched {
    hub: Arc<Hub>,
    progress: Arc<Progress>,
    dir: PathBuf,
}

static WATCHED: OnceLock<Watched> = OnceLock::new();

/// Registers what the panic hook snapshots (the first coordinator of the process).
pub fn watch(hub: &Arc<Hub>, progress: &Arc<Progress>, data_dir: &Path) {
    let _ = WATCHED.set(Watched {
        hub: hub.clone(),
        progress: progress.clone(),
        dir: data_dir.to_path_buf(),
    });
}

thread_local! {
    /// Set while [`contain`] runs on this thread: a panic then is an error to report, not a
    /// crash to snapshot.
    static CONTAINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The contained panic's message and location, for the error.
    static CONTAINED_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Whether the current thread's panic is one [`contain`] catches; records its message.
fn contained(info: &std::panic::PanicHookInfo<'_>) -> bool {
    if !CONTAINED.with(|c| c.get()) {
        return false;
    }
    // One line: it ends up inside a refusal message.
    CONTAINED_PANIC.with(|p| *p.borrow_mut() = Some(info.to_string().replace('\n', " ")));
    true
}

/// Runs `f`, turning a panic inside it into an error instead of a crash.
///
/// For sled: it panics on some damaged files (an index out of bounds in its segment
/// accounting when its file lost 512 KiB or more), and a damaged database must end in a
/// refusal that says what to do, never in exit 101. The caught panic is neither printed nor
/// snapshotted — it is the error — and panics on other threads are untouched. A sled
/// database whose open panicked is dropped whole; nothing of it is used afterwards.
pub fn contain<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !contained(info) {
                previous(info);
            }
        }));
    });
    let was = CONTAINED.with(|c| c.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CONTAINED.with(|c| c.set(was));
    result.map_err(|payload| {
        CONTAINED_PANIC
            .with(|p| p.borrow_mut().take())
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into())
    })
}

/// Installs a panic hook that writes the snapshot, then runs the default hook.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if contained(info) {
            return;
        }
        if let Some(w) = WATCHED.get() {
            let backtrace = std::backtrace::Backtrace::force_capture().to_string();
            match write_snapshot(&w.dir, &w.hub, &w.progress, &info.to_string(), &backtrace) {
                Ok(path) => eprintln!("panic: round-state snapshot written to {}", path.display()),
                Err(e) => eprintln!("panic: could not write the round-state snapshot: {e}"),
            }
        }
        default(info);
    }));
}

/// The snapshot as JSON.
pub fn snapshot(hub: &Hub, progress: &Progress, message: &str, backtrace: &str) -> Value {
    let shards: Vec<Value> = hub
        .sites
        .try_shards()
        .into_iter()
        .enumerate()
        .map(|(i, shard)| match shard {
            None => json!({ "shard": i, "locked": true }),
            Some(entries) => json!({
                "shard": i,
                "sites": entries.iter().map(|(name, s)| json!({
                    "site": name,
                    "id": s.id,
                    "connected": s.connected,
                    "rounds_joined": s.rounds_joined,
                    "dropouts": s.dropouts,
                    "bytes_received": s.bytes_in,
                    "bytes_sent": s.bytes_out,
                })).collect::<Vec<_>>(),
            }),
        })
        .collect();
    let position = progress.try_position().map(|(state, round, attempt, stage)| {
        json!({ "state": state, "round": round, "attempt": attempt, "stage": stage })
    });
    json!({
        "panic": message,
        "at_unix": crate::unix_seconds(),
        "position": position,
        "site_shards": shards,
        "backtrace": backtrace,
    })
}

/// Writes the snapshot to `dir/crash-<unix seconds>-<pid>.json` and returns its path.
pub fn write_snapshot(
    dir: &Path,
    hub: &Hub,
    progress: &Progress,
    message: &str,
    backtrace: &str,
) -> std::io::Result<PathBuf> {
    let path = dir.join(format!(
        "crash-{}-{}.json",
        crate::unix_seconds(),
        std::process::id()
    ));
    let text = serde_json::to_string_pretty(&snapshot(hub, progress, message, backtrace))
        .map_err(std::io::Error::other)?;
    std::fs::write(&path, text)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_contained_panic_is_an_error_and_the_thread_goes_on() {
        let r: Result<u32, String> = contain(|| {
            let v: Vec<u32> = Vec::new();
            v[usize::from(v.is_empty()) + 2]
        });
        let err = r.unwrap_err();
        assert!(err.contains("index out of bounds"), "{err}");
        assert!(err.contains("crash.rs"), "names where: {err}");
        assert_eq!(contain(|| 7), Ok(7));
    }

    #[test]
    fn the_snapshot_names_sites_per_shard_and_skips_locked_shards() {
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let hub = Hub::new(tx);
        let (out, _keep) = tokio::sync::mpsc::channel(1);
        let close = std::sync::Arc::new(tokio::sync::Notify::new());
        hub.connect("cleveland", 200, false, out.clone(), close.clone())
            .unwrap();
        hub.connect("hungary", 173, false, out, close).unwrap();
        hub.touch("cleveland", 1234);
        let progress = Progress::default();
        let dir = tempfile::tempdir().unwrap();
        let path = write_snapshot(dir.path(), &hub, &progress, "boom", "bt").unwrap();
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["panic"], "boom");
        assert_eq!(v["position"]["state"], "starting");
        let sites: Vec<&Value> = v["site_shards"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["sites"].as_array().unwrap().iter())
            .collect();
        assert_eq!(sites.len(), 2);
        let cleveland = sites.iter().find(|s| s["site"] == "cleveland").unwrap();
        assert_eq!(cleveland["bytes_received"], 1234);
        assert_eq!(cleveland["connected"], true);

        // A shard held by this very thread is reported, not waited for.
        let stats = hub.sites.try_shards();
        assert_eq!(stats.iter().filter(|s| s.is_none()).count(), 0);
        hub.sites.update(
            &"cleveland".to_string(),
            || unreachable!(),
            |_| {
                let v = snapshot(&hub, &progress, "inside", "");
                let locked = v["site_shards"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|s| s["locked"] == true)
                    .count();
                assert_eq!(locked, 1);
            },
        );
    }
}
