//! Architecture support. Nubis runs x86_64 guests only.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;
