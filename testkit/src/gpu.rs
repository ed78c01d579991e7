//! Whether burn's wgpu backend has a device here.

/// Whether this machine has a wgpu device to run on: Metal or DirectX, or an installed Vulkan
/// driver (lavapipe, Mesa's software Vulkan, counts). Outside CI a machine without one skips
/// the wgpu test with a message; in CI (`.ci/run` installs lavapipe, Debian's
/// `mesa-vulkan-drivers`) it is required.
pub fn wgpu_device() -> bool {
    let vulkan = ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d"]
        .iter()
        .any(|d| std::fs::read_dir(d).is_ok_and(|mut e| e.next().is_some()))
        || std::env::var_os("VK_ICD_FILENAMES").is_some();
    let found = vulkan || cfg!(any(target_os = "macos", windows));
    assert!(
        found || !crate::in_ci(),
        "a Vulkan driver is required in CI: .ci/run installs lavapipe (mesa-vulkan-drivers)"
    );
    if !found {
        eprintln!("skipped: no Vulkan driver for wgpu (apt-get install mesa-vulkan-drivers)");
    }
    found
}
