//! `/v1/hosts`: the cluster's members (operator only): state, roles,
//! labels, capacity and usage, which one is the controller; cordoning and
//! forgetting. A standalone agent lists itself.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use nubis_api::{ApiError, ClusterHost, HostDrain};

use super::responses::{ClusterCall, Invalid};
use super::{AppState, Body, Operator, Path, Result};
use crate::service::hosts;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/hosts", get(list))
        .route("/v1/hosts/{name}", get(show).delete(forget))
        .route("/v1/hosts/{name}/cordon", post(cordon))
        .route("/v1/hosts/{name}/uncordon", post(uncordon))
        .route("/v1/hosts/{name}/drain", post(drain))
}

list_handler!(operator list, "/v1/hosts", "hosts", "every member, by name", ClusterHost,
    async hosts::list, ClusterCall);

show_handler!(operator show, "/v1/hosts/{name}", "hosts", "name" = "the host's name", "success",
    ClusterHost, async hosts::get, ClusterCall,
    (status = 404, description = "no such host", body = ApiError));

/// `POST /v1/hosts/{name}/cordon` and `/uncordon`.
macro_rules! cordon_handler {
    ($name:ident, $path:tt, $cordoned:expr, $done:tt) => {
        action_handler!(operator $name, $path, "hosts", "name" = "the host's name", $done,
            ClusterHost, async hosts::set_cordon, $cordoned, ClusterCall,
            (status = 404, description = "no such host", body = ApiError),
            (status = 409, description = "this agent is standalone", body = ApiError));
    };
}

cordon_handler!(
    cordon,
    "/v1/hosts/{name}/cordon",
    true,
    "cordoned: no new VMs are placed on it"
);
cordon_handler!(
    uncordon,
    "/v1/hosts/{name}/uncordon",
    false,
    "new VMs may be placed on it again"
);

create_handler!(operator drain, "/v1/hosts/{name}/drain", "hosts", "name" = "the host's name",
    HostDrain, 202 "draining: cordoned, its running VMs moving away (`drain` shows how it goes)",
    ClusterHost, async hosts::drain, Invalid, ClusterCall,
    (status = 404, description = "no such host", body = ApiError),
    (status = 409, description = "this agent is standalone", body = ApiError));

delete_handler!(operator forget, "/v1/hosts/{name}", "hosts", "name" = "the host's name",
    "forgotten: its name is free again", async hosts::forget, ClusterCall,
    (status = 404, description = "no such host", body = ApiError),
    (status = 409, description = "the host is up, or this agent is standalone", body = ApiError));
