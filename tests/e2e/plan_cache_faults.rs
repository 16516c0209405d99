//! End to end, the plan cache under faults, on the real `kiln serve` with all-MiniLM-L6-v2:
//! the server is killed (SIGKILL) while it writes an entry; the file size is limited
//! (`RLIMIT_FSIZE`, which would kill a process that does not handle SIGXFSZ); the cache folder
//! is a full filesystem; the cache folder is read-only. Every time, the next start serves the
//! reference's embeddings, says what happened with the cache in one log line, and never uses a
//! half-written plan.
//!
//! The full and read-only filesystems are small tmpfs mounts, which need root (CI runs as root);
//! where mounting is refused those two cases say so and pass without running.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_tests::server::{Server, kiln_bin};
use kiln_tests::{cosine, fixtures, flatten, minilm_dir, read_jsonl, read_npy};
use serde_json::json;

fn bin() -> PathBuf {
    kiln_bin(env!("CARGO_BIN_EXE_kiln"))
}

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-cache-fault-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn start(cache: &Path, wrapper: &[&str]) -> Server {
    let cache = cache.to_str().unwrap();
    Server::start_wrapped(wrapper, &bin(), &minilm_dir(), &["--cache-dir", cache], &[])
}

/// The server answers the reference's embeddings for the first texts of the fixture.
fn assert_serves_the_reference(server: &Server) {
    let texts: Vec<String> = read_jsonl(&fixtures().join("minilm/inputs.jsonl"))
        .iter()
        .take(4)
        .map(|v| v["text"].as_str().unwrap().to_string())
        .collect();
    let (_, want) = read_npy(&fixtures().join("minilm/embeddings_normalized.npy"));
    for (i, t) in texts.iter().enumerate() {
        let (status, body) = server.post("/embed", &json!({ "inputs": t }));
        assert_eq!(status, 200, "{body}");
        let got = flatten(&body[0]);
        assert!(
            cosine(&got, &want[i * 384..(i + 1) * 384]) >= 0.99999,
            "text {i}"
        );
    }
}

/// What the load did with the cache (`plan_cache` in the "model loaded" line).
fn cache_lines(server: &Server) -> Vec<String> {
    server
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("plan_cache"))
        .collect()
}

fn was_hit(lines: &[String]) -> bool {
    lines
        .iter()
        .any(|l| l.contains("plan_cache=\"hit\"") || l.contains("plan_cache=hit"))
}

fn files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("plans"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn killed_while_writing_an_entry_the_next_start_rebuilds_it() {
    // Catching the write in the act can miss on a fast disk: try a few times.
    let mut caught = None;
    for attempt in 0..5 {
        let cache = fresh_dir(&format!("kill-{attempt}"));
        let mut child = Command::new(bin())
            .args([
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--grpc-port",
                "0",
            ])
            .arg("--model")
            .arg(minilm_dir())
            .arg("--cache-dir")
            .arg(&cache)
            .env("KILN_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start kiln");
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut seen_tmp = false;
        while Instant::now() < deadline {
            let names = files(&cache);
            if names.iter().any(|n| n.ends_with(".tmp")) {
                child.kill().unwrap(); // SIGKILL
                seen_tmp = true;
                break;
            }
            if names.iter().any(|n| n.ends_with(".kiln")) || child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let _ = child.kill();
        child.wait().unwrap();
        if seen_tmp {
            caught = Some(cache);
            break;
        }
        let _ = std::fs::remove_dir_all(&cache);
    }
    let cache = caught.expect("never caught the server writing its plan");
    let names = files(&cache);
    assert!(
        names.iter().all(|n| !n.ends_with(".kiln")),
        "a killed write must leave no entry: {names:?}"
    );

    let server = start(&cache, &[]);
    assert_serves_the_reference(&server);
    let lines = server.log_lines();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("left by a writer that died mid-write")),
        "the leftover is reported: {lines:#?}"
    );
    let names = files(&cache);
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    assert_eq!(
        names.iter().filter(|n| n.ends_with(".kiln")).count(),
        1,
        "{names:?}"
    );
    drop(server);
    // And the entry it wrote is whole: the next start is a hit with the same answers.
    let server = start(&cache, &[]);
    assert_serves_the_reference(&server);
    let lines = cache_lines(&server);
    assert!(was_hit(&lines), "{lines:#?}");
    drop(server);
    let _ = std::fs::remove_dir_all(&cache);
}

/// A store that fails: the plan is served uncached, with one warning line that says why, and no
/// entry or temporary file is left.
fn assert_store_failed_cleanly(server: &Server, cache: &Path, why: &str) {
    assert_serves_the_reference(server);
    let warnings: Vec<String> = server
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("plan cache: unavailable"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning line: {warnings:#?}");
    assert!(warnings[0].contains(why), "{why}: {}", warnings[0]);
    let names = files(cache);
    assert!(
        names
            .iter()
            .all(|n| !n.ends_with(".tmp") && !n.ends_with(".kiln")),
        "{names:?}"
    );
}

#[test]
fn a_file_size_limit_fails_the_store_not_the_server() {
    let cache = fresh_dir("fsize");
    // 1 MiB: the entry (~90 MB) cannot be written; without SIGXFSZ handled the kernel would
    // kill the server at the first write past the limit.
    let server = start(&cache, &["prlimit", "--fsize=1048576", "--"]);
    assert_store_failed_cleanly(&server, &cache, "cannot store the plan");
    drop(server);
    let _ = std::fs::remove_dir_all(&cache);
}

/// Mounts a tmpfs with `options` at a fresh folder; `None` where mounting is not allowed.
fn tmpfs(name: &str, options: &str) -> Option<PathBuf> {
    let dir = fresh_dir(name);
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", options, "tmpfs"])
        .arg(&dir)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Some(dir)
    } else {
        eprintln!("cannot mount a tmpfs here (not root?): the {name} case is not run");
        None
    }
}

fn unmount(dir: &Path) {
    let _ = Command::new("umount").arg(dir).status();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_full_cache_filesystem_fails_the_store_not_the_server() {
    let Some(cache) = tmpfs("full", "size=1m") else {
        return;
    };
    let server = start(&cache, &[]);
    assert_store_failed_cleanly(&server, &cache, "cannot store the plan");
    drop(server);
    unmount(&cache);
}

#[test]
fn a_read_only_cache_folder_is_read_but_never_written() {
    let Some(cache) = tmpfs("readonly", "size=512m") else {
        return;
    };
    // Fill it while writable, then make it read-only: the entry is still used.
    let server = start(&cache, &[]);
    assert_serves_the_reference(&server);
    drop(server);
    let remounted = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&cache)
        .status()
        .unwrap();
    assert!(remounted.success());
    let server = start(&cache, &[]);
    assert_serves_the_reference(&server);
    let lines = cache_lines(&server);
    assert!(was_hit(&lines), "{lines:#?}");
    drop(server);
    // Empty and read-only: the plan is compiled and served, with one warning.
    unmount(&cache);
    let Some(cache) = tmpfs("readonly-empty", "size=1m,ro") else {
        return;
    };
    let server = start(&cache, &[]);
    assert_serves_the_reference(&server);
    let warnings: Vec<String> = server
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("plan cache: unavailable"))
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    drop(server);
    unmount(&cache);
}
