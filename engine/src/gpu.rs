//! GPUs through wgpu: finding adapters, opening one as a burn device, and choosing a device for
//! `--device auto`.
//!
//! Design note. wgpu reaches Vulkan, Metal and DX12, so one backend covers NVIDIA, AMD, Intel and
//! Apple GPUs. kiln lists adapters itself (wgpu's `AdapterInfo` and limits: what `/info`, the
//! metrics and the plan-cache key report) and then opens the chosen one through burn, pinned to
//! the same graphics API and the same per-type index, so the adapter kiln describes is the one
//! burn runs on. Adapters are listed once per process, best first (discrete, integrated, virtual,
//! other, then CPU rasterizers such as Mesa's lavapipe), so `wgpu` (= `wgpu:0`) is the best one.
//! OpenGL adapters are left out: wgpu's GL backend has no compute shaders everywhere, and burn's
//! kernels need them.
//!
//! `auto` takes a discrete or integrated GPU only, and only after a short self-test (a GEMM and a
//! softmax against the host); a CPU rasterizer is never faster than kiln's own CPU kernels.
//!
//! Without the `wgpu` cargo feature this module keeps its API: no adapters, and opening one is an
//! error that says the build lacks wgpu. Callers never need `cfg`.

use std::path::Path;

use serde::Serialize;

use crate::error::{EngineError, Result};

/// What kind of adapter wgpu reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdapterType {
    DiscreteGpu,
    IntegratedGpu,
    VirtualGpu,
    Other,
    /// A software rasterizer on the CPU (lavapipe, SwiftShader, WARP).
    Cpu,
}

impl AdapterType {
    pub fn as_str(self) -> &'static str {
        match self {
            AdapterType::DiscreteGpu => "discrete-gpu",
            AdapterType::IntegratedGpu => "integrated-gpu",
            AdapterType::VirtualGpu => "virtual-gpu",
            AdapterType::Other => "other",
            AdapterType::Cpu => "cpu",
        }
    }
}

/// The limits that decide what runs on an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct AdapterLimits {
    pub max_buffer_bytes: u64,
    pub max_storage_buffer_binding_bytes: u64,
    pub max_workgroup_storage_bytes: u32,
    pub max_invocations_per_workgroup: u32,
}

/// One wgpu adapter, as `/info` and `kiln devices` show it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Adapter {
    /// kiln's index: `--device wgpu:N`.
    pub index: usize,
    pub name: String,
    /// Graphics API: `vulkan`, `metal` or `dx12`.
    pub api: String,
    pub device_type: AdapterType,
    pub vendor_id: u32,
    pub device_id: u32,
    pub driver: String,
    pub driver_info: String,
    /// Whether shaders may use f16 (`SHADER_F16`).
    pub shader_f16: bool,
    pub limits: AdapterLimits,
    /// Index among the adapters of the same type and API: how burn's `DeviceKind` names it.
    #[serde(skip)]
    pub(crate) type_index: usize,
}

impl Adapter {
    /// A discrete or integrated GPU: what `auto` may choose.
    pub fn is_gpu(&self) -> bool {
        matches!(
            self.device_type,
            AdapterType::DiscreteGpu | AdapterType::IntegratedGpu
        )
    }

    /// One line for logs: `NVIDIA H200 (discrete-gpu, vulkan, NVIDIA 550.54)`.
    pub fn describe(&self) -> String {
        let driver = [self.driver.as_str(), self.driver_info.as_str()]
            .iter()
            .filter(|s| !s.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(" ");
        format!(
            "{} ({}, {}, driver {})",
            self.name,
            self.device_type.as_str(),
            self.api,
            if driver.is_empty() {
                "unknown"
            } else {
                &driver
            }
        )
    }

    /// The facts that go into the plan-cache key and the device metric.
    pub fn facts(&self) -> Vec<(String, String)> {
        vec![
            ("adapter".into(), self.name.clone()),
            ("api".into(), self.api.clone()),
            ("adapter_type".into(), self.device_type.as_str().into()),
            (
                "vendor_device".into(),
                format!("{:04x}:{:04x}", self.vendor_id, self.device_id),
            ),
            (
                "driver".into(),
                format!("{} {}", self.driver, self.driver_info),
            ),
            ("shader_f16".into(), self.shader_f16.to_string()),
            (
                "limits".into(),
                format!(
                    "buffer={} binding={} workgroup_storage={} invocations={}",
                    self.limits.max_buffer_bytes,
                    self.limits.max_storage_buffer_binding_bytes,
                    self.limits.max_workgroup_storage_bytes,
                    self.limits.max_invocations_per_workgroup
                ),
            ),
        ]
    }

    /// What the attention selector needs to know.
    pub fn sdpa_caps(&self) -> kiln_attention::GpuCaps {
        kiln_attention::GpuCaps {
            max_workgroup_storage_bytes: self.limits.max_workgroup_storage_bytes,
            shader_f16: self.shader_f16,
        }
    }
}

/// Whether this build has the wgpu backend.
pub fn compiled() -> bool {
    cfg!(feature = "wgpu")
}

/// The adapters on this machine, best first; listed once per process. Empty without the `wgpu`
/// feature or without a Vulkan/Metal/DX12 driver.
pub fn adapters() -> &'static [Adapter] {
    static ADAPTERS: std::sync::OnceLock<Vec<Adapter>> = std::sync::OnceLock::new();
    ADAPTERS.get_or_init(imp::list_adapters)
}

/// The adapter `wgpu:index` names, or an error that lists what there is.
pub fn adapter(index: usize) -> Result<&'static Adapter> {
    if !compiled() {
        return Err(not_compiled());
    }
    let all = adapters();
    all.get(index).ok_or_else(|| EngineError::Backend {
        backend: format!("wgpu:{index}"),
        reason: if all.is_empty() {
            "no wgpu adapter found (no Vulkan, Metal or DX12 driver; on Linux without a GPU, \
             Mesa's lavapipe provides one: apt-get install mesa-vulkan-drivers libvulkan1)"
                .into()
        } else {
            format!(
                "there is no adapter {index}; this machine has {}",
                all.iter()
                    .map(|a| format!("wgpu:{} = {}", a.index, a.describe()))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        },
    })
}

/// Puts burn's autotune results (and CubeCL's other persistent caches) under `dir`, beside
/// kiln's compiled plans, so a restart reuses the kernel choices made the first time. Takes
/// effect only before the first GPU device opens in this process; later calls are ignored, as
/// is the whole call without the `wgpu` feature. A `cubecl.toml` or `CUBECL_*` environment
/// variables still apply to everything else.
pub fn set_tuning_cache_dir(dir: &Path) {
    imp::set_tuning_cache_dir(dir)
}

pub(crate) fn not_compiled() -> EngineError {
    EngineError::Backend {
        backend: "wgpu".into(),
        reason: "this kiln was not compiled with wgpu (build with `--features wgpu`)".into(),
    }
}

/// Orders adapters best first and numbers them (stable: wgpu's order within a type).
#[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
fn rank(mut list: Vec<Adapter>) -> Vec<Adapter> {
    list.sort_by_key(|a| a.device_type);
    for (i, a) in list.iter_mut().enumerate() {
        a.index = i;
    }
    list
}

#[cfg(feature = "wgpu")]
mod imp {
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::Mutex;

    use burn_tensor::wgpu::{WgpuBackend, wgpu};
    use burn_tensor::{Device, DeviceKind};
    use cubecl_runtime::config::cache::CacheConfig;
    use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};

    use super::{Adapter, AdapterLimits, AdapterType};
    use crate::error::{EngineError, Result};

    /// The graphics APIs kiln lists, best first where a machine has several.
    const APIS: [wgpu::Backend; 3] = [
        wgpu::Backend::Vulkan,
        wgpu::Backend::Metal,
        wgpu::Backend::Dx12,
    ];

    pub(super) fn list_adapters() -> Vec<Adapter> {
        let mut list = Vec::new();
        for api in APIS {
            let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
                backends: api.into(),
                ..wgpu::InstanceDescriptor::new_without_display_handle()
            });
            let found = futures_lite::future::block_on(instance.enumerate_adapters(api.into()));
            let mut per_type: HashMap<AdapterType, usize> = HashMap::new();
            for a in found {
                let info = a.get_info();
                let limits = a.limits();
                let device_type = match info.device_type {
                    wgpu::DeviceType::DiscreteGpu => AdapterType::DiscreteGpu,
                    wgpu::DeviceType::IntegratedGpu => AdapterType::IntegratedGpu,
                    wgpu::DeviceType::VirtualGpu => AdapterType::VirtualGpu,
                    wgpu::DeviceType::Cpu => AdapterType::Cpu,
                    wgpu::DeviceType::Other => AdapterType::Other,
                };
                let slot = per_type.entry(device_type).or_default();
                let type_index = *slot;
                *slot += 1;
                list.push(Adapter {
                    index: 0,
                    name: info.name,
                    api: api.to_str().to_string(),
                    device_type,
                    vendor_id: info.vendor,
                    device_id: info.device,
                    driver: info.driver,
                    driver_info: info.driver_info,
                    shader_f16: a.features().contains(wgpu::Features::SHADER_F16),
                    limits: AdapterLimits {
                        max_buffer_bytes: limits.max_buffer_size,
                        max_storage_buffer_binding_bytes: limits.max_storage_buffer_binding_size,
                        max_workgroup_storage_bytes: limits.max_compute_workgroup_storage_size,
                        max_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
                    },
                    type_index,
                });
            }
        }
        super::rank(list)
    }

    /// Opens (once per process) the burn device for `adapter`.
    pub(crate) fn open(adapter: &Adapter) -> Result<Device> {
        static OPEN: Mutex<Vec<(usize, Device)>> = Mutex::new(Vec::new());
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, d)) = open.iter().find(|(i, _)| *i == adapter.index) {
            return Ok(d.clone());
        }
        let kind = match adapter.device_type {
            AdapterType::DiscreteGpu => DeviceKind::DiscreteGpu(adapter.type_index),
            AdapterType::IntegratedGpu => DeviceKind::IntegratedGpu(adapter.type_index),
            AdapterType::VirtualGpu => DeviceKind::VirtualGpu(adapter.type_index),
            AdapterType::Cpu => DeviceKind::Cpu,
            AdapterType::Other => {
                return Err(EngineError::Backend {
                    backend: format!("wgpu:{}", adapter.index),
                    reason: format!(
                        "{}: adapters of type `other` cannot be opened through burn",
                        adapter.describe()
                    ),
                });
            }
        };
        let api = match adapter.api.as_str() {
            "metal" => WgpuBackend::Metal,
            "dx12" => WgpuBackend::Dx12,
            _ => WgpuBackend::Vulkan,
        };
        let device = Device::wgpu_options()
            .device_kind(kind)
            .graphics_api(api)
            .init()
            .map_err(|e| EngineError::Backend {
                backend: format!("wgpu:{}", adapter.index),
                reason: format!("could not open {}: {e}", adapter.describe()),
            })?;
        open.push((adapter.index, device.clone()));
        Ok(device)
    }

    pub(super) fn set_tuning_cache_dir(dir: &Path) {
        // Only the first call can take effect; later loads skip re-reading `cubecl.toml`.
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| set_config(dir));
    }

    fn set_config(dir: &Path) {
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        config.environment.path = CacheConfig::Directory(dir.to_path_buf());
        if !CubeClRuntimeConfig::try_set(config) {
            tracing::debug!(
                dir = %dir.display(),
                "CubeCL's configuration was already loaded; the tuning cache stays where it is"
            );
        }
    }
}

#[cfg(not(feature = "wgpu"))]
mod imp {
    use std::path::Path;

    use super::Adapter;
    use crate::error::Result;

    pub(super) fn list_adapters() -> Vec<Adapter> {
        Vec::new()
    }

    pub(crate) fn open(_: &Adapter) -> Result<burn_tensor::Device> {
        Err(super::not_compiled())
    }

    pub(super) fn set_tuning_cache_dir(_: &Path) {}
}

pub(crate) use imp::open;

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(name: &str, device_type: AdapterType, type_index: usize) -> Adapter {
        Adapter {
            index: 99,
            name: name.into(),
            api: "vulkan".into(),
            device_type,
            vendor_id: 0,
            device_id: 0,
            driver: String::new(),
            driver_info: String::new(),
            shader_f16: false,
            limits: AdapterLimits {
                max_buffer_bytes: 1 << 30,
                max_storage_buffer_binding_bytes: 1 << 27,
                max_workgroup_storage_bytes: 32 << 10,
                max_invocations_per_workgroup: 1024,
            },
            type_index,
        }
    }

    #[test]
    fn adapters_are_numbered_best_first_and_stable_within_a_type() {
        let ranked = rank(vec![
            adapter("lavapipe", AdapterType::Cpu, 0),
            adapter("igpu", AdapterType::IntegratedGpu, 0),
            adapter("dgpu-a", AdapterType::DiscreteGpu, 0),
            adapter("dgpu-b", AdapterType::DiscreteGpu, 1),
        ]);
        let names: Vec<_> = ranked.iter().map(|a| (a.index, a.name.as_str())).collect();
        assert_eq!(
            names,
            [(0, "dgpu-a"), (1, "dgpu-b"), (2, "igpu"), (3, "lavapipe")]
        );
        assert!(ranked[0].is_gpu() && ranked[2].is_gpu() && !ranked[3].is_gpu());
        assert!(
            ranked[3]
                .describe()
                .contains("(cpu, vulkan, driver unknown)")
        );
    }
}
