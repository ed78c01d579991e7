//! The memory limit of the container, pod or systemd unit the coordinator runs in.
//!
//! Inside a cgroup with a memory limit, the kernel's OOM killer ends the process the moment
//! it goes over — mid-round, with every session dropped. The coordinator already refuses new
//! uploads above `limits.memory_mib` (RESOURCE_EXHAUSTED: the site retries); when that key is
//! left out, the budget defaults to a margin below the cgroup's limit, so the refusal comes
//! before the kill. cgroup v2 (`memory.max`) and v1 (`memory.limit_in_bytes`) are read; a
//! limit set on a parent cgroup counts too (the smallest wins).

use std::path::Path;

/// What was found, for the start-up log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupMemory {
    /// The cgroup's limit in bytes.
    pub limit: u64,
    /// The default budget: the limit less a tenth of it, at least 64 MiB and at most 1 GiB
    /// (the RSS measured when an upload starts misses what that upload and the sessions
    /// in flight will still allocate).
    pub budget: u64,
}

/// v1 reports "no limit" as a huge number (page-rounded `i64::MAX`).
const UNLIMITED_V1: u64 = 1 << 60;

/// The memory limit of the cgroup this process is in, given the cgroup filesystem's root
/// (`/sys/fs/cgroup`) and the text of `/proc/self/cgroup`; None without a limit.
pub fn memory_limit(root: &Path, proc_self_cgroup: &str) -> Option<u64> {
    let mut best: Option<u64> = None;
    let mut take = |v: u64| best = Some(best.map_or(v, |b| b.min(v)));
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let relative = path.trim_start_matches('/');
        let (base, file) = if controllers.is_empty() {
            (root.to_path_buf(), "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes")
        } else {
            continue;
        };
        // The cgroup itself and each ancestor up to the root.
        let mut dir = base.join(relative);
        loop {
            if let Ok(text) = std::fs::read_to_string(dir.join(file)) {
                match text.trim() {
                    "max" | "" => {}
                    v => {
                        if let Ok(n) = v.parse::<u64>()
                            && n < UNLIMITED_V1
                        {
                            take(n);
                        }
                    }
                }
            }
            if dir == base || !dir.pop() || !dir.starts_with(&base) {
                break;
            }
        }
    }
    best
}

/// The default budget for a limit (see [`CgroupMemory::budget`]).
pub fn budget_for(limit: u64) -> u64 {
    let margin = (limit / 10).clamp(64 << 20, 1 << 30);
    limit.saturating_sub(margin).max(limit / 2)
}

/// The running process's cgroup memory limit and the budget it implies.
pub fn detect() -> Option<CgroupMemory> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let limit = memory_limit(Path::new("/sys/fs/cgroup"), &own)?;
    Some(CgroupMemory {
        limit,
        budget: budget_for(limit),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let path = root.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{e}"));
        }
        std::fs::write(path, text).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn a_v2_limit_on_the_cgroup_or_a_parent_is_found_and_max_means_none() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let root = dir.path();
        let own = "0::/kubepods/pod1/coordinator\n";
        write(root, "kubepods/pod1/coordinator/memory.max", "max\n");
        assert_eq!(memory_limit(root, own), None);
        // The pod's limit (a parent) applies to the container.
        write(root, "kubepods/pod1/memory.max", "2147483648\n");
        assert_eq!(memory_limit(root, own), Some(2 << 30));
        write(root, "kubepods/pod1/coordinator/memory.max", "1073741824\n");
        assert_eq!(memory_limit(root, own), Some(1 << 30));
        assert_eq!(memory_limit(root, "garbage"), None);
    }

    #[test]
    fn a_v1_limit_is_found_and_its_unlimited_value_ignored() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let root = dir.path();
        let own = "12:cpu,cpuacct:/docker/abc\n9:memory:/docker/abc\n";
        write(
            root,
            "memory/docker/abc/memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        assert_eq!(memory_limit(root, own), None);
        write(
            root,
            "memory/docker/abc/memory.limit_in_bytes",
            "536870912\n",
        );
        assert_eq!(memory_limit(root, own), Some(512 << 20));
    }

    #[test]
    fn the_budget_leaves_a_margin_below_the_limit() {
        // 512 MiB: a tenth is below the 64 MiB floor.
        assert_eq!(budget_for(512 << 20), 448 << 20);
        // 4 GiB: a tenth.
        assert_eq!(budget_for(4 << 30), (4u64 << 30) - (4u64 << 30) / 10);
        // 64 GiB: the margin is capped at 1 GiB.
        assert_eq!(budget_for(64 << 30), 63 << 30);
        // A tiny limit still gets half of it rather than nothing.
        assert_eq!(budget_for(100 << 20), 50 << 20);
    }
}
