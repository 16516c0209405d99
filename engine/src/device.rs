//! Choosing where a graph runs.

use std::fmt;
use std::str::FromStr;

use crate::backend::{Backend, BurnBackend, CpuBackend};
use crate::compile::{self, CompileOptions, Compiled};
use crate::error::Result;
use crate::exec::{ExecOptions, Plan, Runnable};
use crate::ir::Graph;

/// A device a model can run on. The CLI and config spell these `cpu` and `burn-flex`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceKind {
    /// kiln's own CPU kernels (the default: fastest on CPU).
    #[default]
    Cpu,
    /// burn's CPU backend, every op through burn-tensor: the device-agnostic reference path.
    BurnFlex,
}

impl DeviceKind {
    pub const ALL: [DeviceKind; 2] = [DeviceKind::Cpu, DeviceKind::BurnFlex];

    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::BurnFlex => "burn-flex",
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeviceKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceKind::Cpu),
            "burn-flex" | "flex" => Ok(DeviceKind::BurnFlex),
            other => Err(format!(
                "unknown device `{other}` (expected `cpu` or `burn-flex`)"
            )),
        }
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
        DeviceKind::BurnFlex => Box::new(Plan::new(graph, BurnBackend::flex(), options)?),
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
        DeviceKind::BurnFlex => compile::compile(graph, &BurnBackend::flex(), options, exec),
    }
}

/// The facts about `device` that go into the plan-cache key.
pub fn device_facts(device: DeviceKind) -> Vec<(String, String)> {
    match device {
        DeviceKind::Cpu => CpuBackend::new(1).device_facts(),
        DeviceKind::BurnFlex => BurnBackend::flex().device_facts(),
    }
}
