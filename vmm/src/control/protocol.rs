//! The control protocol: newline-delimited JSON over a Unix stream socket.
//! It is the agent's contract with the VMM, so its types and its parsing are
//! in `nubis_contract::control` (see there for the requests and answers),
//! re-exported here for the server.

pub use nubis_contract::control::{
    encode_response, parse_request, DeviceStatus, DiskMigration, ErrorBody, ErrorCode, Request,
    Response, VmState, VmStatus, MAX_REQUEST_LEN,
};
