//! Who is calling: every request carries `Authorization: Bearer TOKEN`.
//! The operator token comes from the agent's configuration; tenant tokens
//! are looked up by their hash. A tenant only ever sees its own resources.

use sha2::{Digest, Sha256};

use crate::store::{Store, StoreError};

/// The caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Operator,
    Tenant(String),
}

/// Why a request was not authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send 'Authorization: Bearer TOKEN'")]
    Missing,
    #[error("unknown or revoked token")]
    Unknown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The operator's credential, kept as a hash so that comparisons take the
/// same time whatever the guess.
pub struct OperatorToken {
    hash: [u8; 32],
}

impl OperatorToken {
    pub fn new(token: &str) -> Self {
        Self {
            hash: Sha256::digest(token.as_bytes()).into(),
        }
    }

    fn matches(&self, candidate: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(candidate.as_bytes()).into();
        digest
            .iter()
            .zip(self.hash.iter())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }
}

/// Resolves an `Authorization` header value to a principal.
pub fn authenticate(
    operator: &OperatorToken,
    store: &Store,
    header: Option<&str>,
) -> Result<Principal, AuthError> {
    let token = header
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or(AuthError::Missing)?;
    if operator.matches(token) {
        return Ok(Principal::Operator);
    }
    store
        .tenant_for_token(token)?
        .map(Principal::Tenant)
        .ok_or(AuthError::Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nubis_api::Quota;

    #[test]
    fn operator_tenant_and_strangers() {
        let store = Store::open_in_memory().unwrap();
        let operator = OperatorToken::new("op-secret");
        let tenant = store.create_tenant("acme", Quota::default()).unwrap();
        let token = store.create_token(&tenant.id).unwrap();
        assert_eq!(
            authenticate(&operator, &store, Some("Bearer op-secret")).unwrap(),
            Principal::Operator
        );
        assert_eq!(
            authenticate(&operator, &store, Some(&format!("Bearer {}", token.token))).unwrap(),
            Principal::Tenant(tenant.id)
        );
        for bad in [
            None,
            Some(""),
            Some("Bearer "),
            Some("op-secret"),
            Some("Basic op-secret"),
        ] {
            assert!(matches!(
                authenticate(&operator, &store, bad),
                Err(AuthError::Missing)
            ));
        }
        assert!(matches!(
            authenticate(&operator, &store, Some("Bearer op-secreT")),
            Err(AuthError::Unknown)
        ));
    }
}
