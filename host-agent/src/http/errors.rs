//! Every error the agent answers with, as a status and `ErrorCode`, in one
//! place: the services' [`ServiceError`] and the store's, supervisor's
//! and disk space's errors that handlers still meet directly.
//!
//! Why one place: a client reads the code, not the message; the same
//! failure must get the same code from every endpoint.

use nubis_api::{ApiError, ErrorCode};

use super::HttpError;
use crate::cluster::ClusterError;
use crate::peers::PeerError;
use crate::quota::SpaceError;
use crate::service::ServiceError;
use crate::store::StoreError;
use crate::supervisor::SupervisorError;

impl HttpError {
    /// A 422 naming `field`: valid by the document, not doable on this host.
    pub fn unprocessable(field: &str, message: String) -> Self {
        let mut error = ApiError::new(ErrorCode::Unprocessable, message);
        error.error.field = Some(field.to_string());
        Self(error)
    }
}

impl From<ServiceError> for HttpError {
    fn from(error: ServiceError) -> Self {
        let (code, field) = match &error {
            ServiceError::Invalid { field, .. } => (ErrorCode::InvalidInput, field.clone()),
            ServiceError::Unprocessable { field, .. } => (ErrorCode::Unprocessable, field.clone()),
            ServiceError::NotFound { .. } | ServiceError::Gone(_) => (ErrorCode::NotFound, None),
            ServiceError::Conflict(_) => (ErrorCode::Conflict, None),
            ServiceError::Exhausted(_) => (ErrorCode::QuotaExceeded, None),
            ServiceError::HostFull(_) => (ErrorCode::HostFull, None),
            ServiceError::Unauthorized(_) => (ErrorCode::Unauthorized, None),
            ServiceError::Forbidden(_) => (ErrorCode::Forbidden, None),
            ServiceError::Internal(_) => (ErrorCode::Internal, None),
            ServiceError::PeerAnswer(_) => (ErrorCode::PeerFailed, None),
            ServiceError::Unavailable(_) => (ErrorCode::Unavailable, None),
            ServiceError::Store(err) => (store_code(err), None),
            ServiceError::Supervisor(err) => (supervisor_code(err), None),
            ServiceError::Space(err) => (space_code(err), None),
            ServiceError::Peer(err) => (peer_code(err), None),
            ServiceError::Cluster(err) => (cluster_code(err), None),
        };
        let mut api = ApiError::new(code, error.to_string());
        api.error.field = field;
        HttpError(api)
    }
}

impl From<StoreError> for HttpError {
    fn from(error: StoreError) -> Self {
        Self::new(store_code(&error), error.to_string())
    }
}

impl From<SpaceError> for HttpError {
    fn from(error: SpaceError) -> Self {
        Self::new(space_code(&error), error.to_string())
    }
}

impl From<ClusterError> for HttpError {
    fn from(error: ClusterError) -> Self {
        Self::new(cluster_code(&error), error.to_string())
    }
}

impl From<SupervisorError> for HttpError {
    fn from(error: SupervisorError) -> Self {
        Self::new(supervisor_code(&error), error.to_string())
    }
}

fn store_code(error: &StoreError) -> ErrorCode {
    match error {
        StoreError::Exists(_) | StoreError::InUse(_) => ErrorCode::Conflict,
        StoreError::Quota(_) => ErrorCode::QuotaExceeded,
        _ => ErrorCode::Internal,
    }
}

fn space_code(error: &SpaceError) -> ErrorCode {
    match error {
        SpaceError::Full { .. } => ErrorCode::HostFull,
        SpaceError::Statvfs { .. } => ErrorCode::Internal,
    }
}

fn supervisor_code(error: &SupervisorError) -> ErrorCode {
    match error {
        SupervisorError::WrongState(_) | SupervisorError::MigratedAway(_) => ErrorCode::Conflict,
        SupervisorError::VmFiles(crate::supervisor::vmfs::VmFsError::Unsafe { .. }) => {
            ErrorCode::Conflict
        }
        SupervisorError::StartFailed(_) | SupervisorError::Disk(_) => ErrorCode::Unprocessable,
        SupervisorError::Store(StoreError::Quota(_)) => ErrorCode::QuotaExceeded,
        SupervisorError::NoUnderlay(_) => ErrorCode::Unprocessable,
        _ => ErrorCode::Internal,
    }
}

fn cluster_code(error: &ClusterError) -> ErrorCode {
    match error {
        ClusterError::NoSuchHost(_)
        | ClusterError::NoSuchTenant(_)
        | ClusterError::NoSuchVm(_)
        | ClusterError::NoSuchService(_) => ErrorCode::NotFound,
        ClusterError::Quota(_) | ClusterError::AddressesExhausted(_) => ErrorCode::QuotaExceeded,
        ClusterError::NoNetwork { .. } => ErrorCode::Unprocessable,
        ClusterError::HostUp(_)
        | ClusterError::NameTaken { .. }
        | ClusterError::Exists(_)
        | ClusterError::Held(_)
        | ClusterError::Raced(_) => ErrorCode::Conflict,
        ClusterError::Mirror(_) | ClusterError::NotLeading => ErrorCode::Internal,
        ClusterError::Etcd { .. } | ClusterError::Contended { .. } => ErrorCode::Unavailable,
        ClusterError::Corrupt { .. } | ClusterError::TlsFile { .. } => ErrorCode::Internal,
    }
}

/// A failed call to a peer: its own refusal when it is one the caller can
/// act on (a conflict, a quota), otherwise a 502.
fn peer_code(error: &PeerError) -> ErrorCode {
    match error.code() {
        Some(ErrorCode::Conflict) => ErrorCode::Conflict,
        Some(ErrorCode::QuotaExceeded) => ErrorCode::QuotaExceeded,
        _ => ErrorCode::PeerFailed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer_failed(error: PeerError) -> HttpError {
        HttpError::from(ServiceError::from(error))
    }

    #[test]
    fn a_peer_refusal_keeps_its_meaning() {
        let refused = |code| PeerError::Refused {
            host: "b".into(),
            status: 409,
            code,
            message: "overlaps".into(),
        };
        assert_eq!(
            peer_failed(refused(Some(ErrorCode::Conflict))).0.error.code,
            ErrorCode::Conflict
        );
        assert_eq!(
            peer_failed(refused(Some(ErrorCode::Internal))).0.error.code,
            ErrorCode::PeerFailed
        );
        let down = PeerError::Unreachable {
            host: "b".into(),
            url: "http://b".into(),
            message: "refused".into(),
        };
        let err = peer_failed(down);
        assert_eq!(err.0.error.code, ErrorCode::PeerFailed);
        assert!(
            err.0.error.message.contains("host 'b'"),
            "{}",
            err.0.error.message
        );
    }
}
