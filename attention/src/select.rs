//! The kernel selector: a pure function of the problem and the user's choice.

use crate::SdpaError;
use crate::params::ProblemSummary;

/// An attention kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Materialises scores row by row; the reference every other kernel is tested against.
    Math,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Math => "math",
        }
    }
}

/// What the user asked for: `auto` lets the selector decide; a named kernel is a hard
/// requirement (an input it cannot run is an error, never a silent fallback).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelChoice {
    #[default]
    Auto,
    Force(Kernel),
}

/// The selector's answer: which kernel, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub kernel: Kernel,
    pub reason: String,
}

/// Picks the kernel for `problem`. The same function answers "is this supported": an `Err`
/// names the constraint that rules the input out.
pub fn select(problem: &ProblemSummary, choice: KernelChoice) -> Result<Selection, SdpaError> {
    // Only the math kernel exists so far; it runs every shape and mask the API accepts.
    match choice {
        KernelChoice::Auto => Ok(Selection {
            kernel: Kernel::Math,
            reason: format!(
                "math is the only CPU kernel built; it supports every mask ({}) and head_dim {}",
                problem.mask, problem.shape.head_dim
            ),
        }),
        KernelChoice::Force(kernel) => Ok(Selection {
            kernel,
            reason: format!("forced by configuration ({})", kernel.name()),
        }),
    }
}
