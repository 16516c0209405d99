//! Choosing where a graph runs.
//!
//! Two stages, like the rest of kiln's configuration: a [`DeviceChoice`] is what the user wrote
//! (`auto`, `cpu`, `burn-flex`, `wgpu`, `wgpu:N`); [`DeviceChoice::resolve`] turns it into the
//! [`DeviceKind`] a model loads on, with the reason (logged, and shown in `/info`).

use std::fmt;
use std::str::FromStr;

use crate::backend::{Backend, BurnBackend, CpuBackend};
use crate::compile::{self, CompileOptions, Compiled};
use crate::error::Result;
use crate::exec::{ExecOptions, Plan, Runnable};
use crate::gpu;
use crate::ir::Graph;

/// A device a model can run on. The CLI and config spell these `cpu`, `burn-flex` and `wgpu:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum DeviceKind {
    /// kiln's own CPU kernels (the default: fastest on CPU).
    #[default]
    Cpu,
    /// burn's CPU backend, every op through burn-tensor: the device-agnostic reference path.
    BurnFlex,
    /// The wgpu adapter with this index in [`gpu::adapters`] (best first), every op through
    /// burn-tensor on that GPU.
    Wgpu(usize),
}

impl DeviceKind {
    /// The devices every build has.
    pub const ALL: [DeviceKind; 2] = [DeviceKind::Cpu, DeviceKind::BurnFlex];

    /// Every device this process can run on: [`DeviceKind::ALL`] and one `Wgpu` per adapter
    /// (CPU rasterizers such as lavapipe included). What "one test body on every device" loops
    /// over.
    pub fn available() -> Vec<DeviceKind> {
        let mut all = DeviceKind::ALL.to_vec();
        all.extend(gpu::adapters().iter().map(|a| DeviceKind::Wgpu(a.index)));
        all
    }

    pub fn is_gpu(self) -> bool {
        matches!(self, DeviceKind::Wgpu(_))
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceKind::Cpu => f.write_str("cpu"),
            DeviceKind::BurnFlex => f.write_str("burn-flex"),
            DeviceKind::Wgpu(n) => write!(f, "wgpu:{n}"),
        }
    }
}

impl FromStr for DeviceKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceKind::Cpu),
            "burn-flex" | "flex" => Ok(DeviceKind::BurnFlex),
            "wgpu" | "gpu" => Ok(DeviceKind::Wgpu(0)),
            other => match other.strip_prefix("wgpu:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceKind::Wgpu(n)),
                Some(Err(_)) => Err(format!(
                    "bad device `{other}`: `wgpu:N` takes an adapter index (see `kiln devices`)"
                )),
                None => Err(format!(
                    "unknown device `{other}` (expected `auto`, `cpu`, `burn-flex`, `wgpu` or \
                     `wgpu:N`)"
                )),
            },
        }
    }
}

/// What the user asked for: a device, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum DeviceChoice {
    /// A discrete or integrated GPU that passes the self-test, else the CPU.
    #[default]
    Auto,
    Fixed(DeviceKind),
}

impl From<DeviceKind> for DeviceChoice {
    fn from(d: DeviceKind) -> Self {
        DeviceChoice::Fixed(d)
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Fixed(d) => d.fmt(f),
        }
    }
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            other => other.parse().map(DeviceChoice::Fixed),
        }
    }
}

impl DeviceChoice {
    /// The device to load on and why. `gpu_capable` is false when the model's options need a
    /// CPU-only feature (int8 or bf16 linears), so `auto` keeps it on the CPU. A fixed `wgpu:N`
    /// must name an adapter of this machine (and this build must have wgpu); `auto` never fails.
    pub fn resolve(self, gpu_capable: bool) -> Result<(DeviceKind, String)> {
        match self {
            DeviceChoice::Fixed(DeviceKind::Wgpu(n)) => {
                let a = gpu::adapter(n)?;
                Ok((DeviceKind::Wgpu(n), format!("configured: {}", a.describe())))
            }
            DeviceChoice::Fixed(d) => Ok((d, "configured".into())),
            DeviceChoice::Auto => Ok(resolve_auto(gpu_capable)),
        }
    }
}

/// `auto`: the first discrete or integrated GPU whose self-test passes, else the CPU; the reason
/// says which adapters were passed over and why.
fn resolve_auto(gpu_capable: bool) -> (DeviceKind, String) {
    if !gpu::compiled() {
        return (
            DeviceKind::Cpu,
            "auto: CPU, because this kiln was not compiled with wgpu".into(),
        );
    }
    if !gpu_capable {
        return (
            DeviceKind::Cpu,
            "auto: CPU, because int8/bf16 linears run on kiln's CPU kernels only".into(),
        );
    }
    let adapters = gpu::adapters();
    let mut passed_over = Vec::new();
    for a in adapters {
        if !a.is_gpu() {
            passed_over.push(format!(
                "{} is a {} adapter, not a GPU",
                a.describe(),
                a.device_type.as_str()
            ));
            continue;
        }
        match BurnBackend::wgpu(a.index).and_then(|b| b.self_test()) {
            Ok(()) => {
                return (
                    DeviceKind::Wgpu(a.index),
                    format!(
                        "auto: GPU wgpu:{} {} passed the self-test",
                        a.index,
                        a.describe()
                    ),
                );
            }
            Err(e) => passed_over.push(format!("{} failed the self-test: {e}", a.describe())),
        }
    }
    let why = if adapters.is_empty() {
        "no wgpu adapter was found (no Vulkan, Metal or DX12 driver)".to_string()
    } else {
        passed_over.join("; ")
    };
    (DeviceKind::Cpu, format!("auto: CPU, because {why}"))
}

/// The backend a [`DeviceKind`] names; `Err` for a `wgpu:N` this machine or build lacks.
fn burn_backend(device: DeviceKind) -> Result<BurnBackend> {
    match device {
        DeviceKind::Wgpu(n) => BurnBackend::wgpu(n),
        _ => Ok(BurnBackend::flex()),
    }
}

/// Prepares `graph` on `device`.
pub fn prepare(
    graph: Graph,
    device: DeviceKind,
    options: ExecOptions,
) -> Result<Box<dyn Runnable>> {
    Ok(match device {
        DeviceKind::Cpu => Box::new(Plan::new(graph, CpuBackend::default(), options)?),
        other => Box::new(Plan::new(graph, burn_backend(other)?, options)?),
    })
}

/// Compiles `graph` for `device` (see [`crate::compile`]).
pub fn compile(
    graph: Graph,
    device: DeviceKind,
    options: &CompileOptions,
    exec: ExecOptions,
) -> Result<Compiled> {
    match device {
        DeviceKind::Cpu => compile::compile(graph, &CpuBackend::new(1), options, exec),
        other => compile::compile(graph, &burn_backend(other)?, options, exec),
    }
}

/// The facts about `device` that go into the plan-cache key.
pub fn device_facts(device: DeviceKind) -> Result<Vec<(String, String)>> {
    Ok(match device {
        DeviceKind::Cpu => CpuBackend::new(1).device_facts(),
        other => burn_backend(other)?.device_facts(),
    })
}

/// The adapter behind `device`, if it is a GPU.
pub fn adapter_of(device: DeviceKind) -> Option<&'static gpu::Adapter> {
    match device {
        DeviceKind::Wgpu(n) => gpu::adapter(n).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choices_parse_and_print_back() {
        for (text, want) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceKind::Cpu.into()),
            ("burn-flex", DeviceKind::BurnFlex.into()),
            ("wgpu", DeviceKind::Wgpu(0).into()),
            ("wgpu:3", DeviceKind::Wgpu(3).into()),
        ] {
            let got: DeviceChoice = text.parse().unwrap();
            assert_eq!(got, want, "{text}");
            if text != "wgpu" {
                assert_eq!(got.to_string(), text);
            }
        }
        let err = "wgpu:x".parse::<DeviceChoice>().unwrap_err();
        assert!(err.contains("adapter index"), "{err}");
        let err = "cuda".parse::<DeviceChoice>().unwrap_err();
        assert!(
            err.contains("`auto`, `cpu`, `burn-flex`, `wgpu` or `wgpu:N`"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_adapter_is_an_error_that_says_what_there_is_and_auto_never_fails() {
        let missing = gpu::adapters().len() + 7;
        let err = DeviceChoice::Fixed(DeviceKind::Wgpu(missing))
            .resolve(true)
            .unwrap_err()
            .to_string();
        let expected = if !gpu::compiled() {
            "not compiled with wgpu"
        } else if gpu::adapters().is_empty() {
            "no wgpu adapter found"
        } else {
            "there is no adapter"
        };
        assert!(err.contains(expected), "{err}");
        let (device, why) = DeviceChoice::Auto.resolve(false).unwrap();
        assert_eq!(device, DeviceKind::Cpu);
        assert!(why.starts_with("auto: CPU, because"), "{why}");
        let (_, why) = DeviceChoice::Auto.resolve(true).unwrap();
        assert!(why.starts_with("auto: "), "{why}");
    }
}
