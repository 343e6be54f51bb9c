//! A device's rate limit: in the VMM config, in `set_rate_limit` and
//! `status`, and in the REST API's VM types (one definition, so that the
//! agent passes a tenant's limit to the VMM as it is).

use serde::{Deserialize, Serialize};

/// A rate limit: bytes and operations (requests or frames) per second; an
/// absent rate is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// At least 1 (0 would stop the device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "utoipa", schema(minimum = 1))]
    pub bytes_per_s: Option<u64>,
    /// At least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "utoipa", schema(minimum = 1))]
    pub ops_per_s: Option<u64>,
}

impl RateLimit {
    pub fn is_unlimited(&self) -> bool {
        self.bytes_per_s.is_none() && self.ops_per_s.is_none()
    }

    /// A zero rate would stop the device for good: it is refused.
    pub fn has_zero_rate(&self) -> bool {
        self.bytes_per_s == Some(0) || self.ops_per_s == Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_rates_are_left_out_and_unknown_fields_refused() {
        let limit = RateLimit {
            bytes_per_s: Some(1000),
            ops_per_s: None,
        };
        assert_eq!(
            serde_json::to_string(&limit).unwrap(),
            r#"{"bytes_per_s":1000}"#
        );
        assert_eq!(serde_json::to_string(&RateLimit::default()).unwrap(), "{}");
        assert_eq!(
            serde_json::from_str::<RateLimit>(r#"{"ops_per_s":5}"#).unwrap(),
            RateLimit {
                bytes_per_s: None,
                ops_per_s: Some(5)
            }
        );
        assert!(serde_json::from_str::<RateLimit>(r#"{"burst":5}"#).is_err());
        assert!(RateLimit::default().is_unlimited());
        assert!(!RateLimit::default().has_zero_rate());
        assert!(RateLimit {
            bytes_per_s: None,
            ops_per_s: Some(0)
        }
        .has_zero_rate());
    }
}
