//! Input checks shared by the handlers: each returns the API error that
//! names the field at fault.

use nubis_api::ApiError;

/// Names of tenants, images and VMs: 1 to 63 of `[a-z0-9-.]`, starting
/// with a letter or digit.
pub fn name(field: &str, value: &str, allow_dot: bool) -> Result<(), ApiError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && value.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (allow_dot && b == b'.')
        });
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            format!(
                "'{value}' is not a valid name: 1 to 63 lower-case letters, digits{} and '-', starting with a letter or digit",
                if allow_dot { ", '.'" } else { "" }
            ),
        ))
    }
}

/// A resource id the agent made: `prefix`, '-' and 16 lower-case hex
/// digits (see `store::new_id`).
pub fn id(field: &str, value: &str, prefix: &str) -> Result<(), ApiError> {
    let ok = value
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|hex| {
            hex.len() == 16
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            format!("'{value}' is not a {prefix} id ({prefix}- and 16 hex digits)"),
        ))
    }
}

/// An absolute host path without `..` components.
pub fn absolute_path(field: &str, value: &str) -> Result<(), ApiError> {
    let path = std::path::Path::new(value);
    if path.is_absolute()
        && !path
            .components()
            .any(|part| matches!(part, std::path::Component::ParentDir))
        && !value.contains('\0')
    {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            format!("'{value}' must be an absolute path without '..'"),
        ))
    }
}

/// Kernel arguments: printable ASCII, bounded.
pub fn kernel_args(field: &str, value: &str) -> Result<(), ApiError> {
    if value.len() <= 1024 && value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            "kernel arguments must be printable ASCII, at most 1024 bytes",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "web-1", "0db", &"x".repeat(63)] {
            assert!(name("name", good, false).is_ok(), "{good}");
        }
        for bad in ["", "-a", "Web", "a_b", "a b", &"x".repeat(64), "a.b"] {
            let err = name("name", bad, false).unwrap_err();
            assert_eq!(err.error.field.as_deref(), Some("name"));
        }
        assert!(name("name", "debian-12.1", true).is_ok());
    }

    #[test]
    fn ids() {
        assert!(id("vm.id", "vm-0123456789abcdef", "vm").is_ok());
        for bad in [
            "vm-0123456789abcde",
            "vm-0123456789ABCDEF",
            "net-0123456789abcdef",
            "vm-0123456789abcdef0",
            "vm-01234567\" x;y",
        ] {
            assert!(id("vm.id", bad, "vm").is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_and_arguments() {
        assert!(absolute_path("kernel", "/images/vmlinux").is_ok());
        for bad in ["images/vmlinux", "/images/../etc/shadow", ""] {
            assert!(absolute_path("kernel", bad).is_err(), "{bad}");
        }
        assert!(kernel_args("kernel_args", "quiet ip=10.0.0.2").is_ok());
        assert!(kernel_args("kernel_args", "a\nb").is_err());
        assert!(kernel_args("kernel_args", &"a".repeat(1025)).is_err());
    }
}
