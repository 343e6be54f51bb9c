//! `/v1/ssh-keys`: a tenant's SSH public keys, chosen per VM at creation
//! and handed to the guest by the metadata service.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use nubis_api::{ApiError, SshKey, SshKeyCreate};

use super::responses::{Authenticated, Invalid, TenantOnly, TenantResource};
use super::{AppState, Body, Caller, Path, Result};
use crate::service::ssh_keys;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/ssh-keys", get(list).post(create))
        .route("/v1/ssh-keys/{id}", get(show).delete(remove))
}

create_handler!(tenant create, "/v1/ssh-keys", "ssh-keys", &SshKeyCreate, 201 "created", SshKey,
    async ssh_keys::create, Invalid, TenantOnly,
    (status = 409, description = "the name exists", body = ApiError),
    (status = 422, description = "shaped like a key, but its data is not a key of its type", body = ApiError),
    (status = 429, description = "the tenant holds 64 keys already", body = ApiError));

list_handler!(caller list, "/v1/ssh-keys", "ssh-keys", "the caller's keys (all for the operator)",
    SshKey, async ssh_keys::list, Authenticated);

show_handler!(caller show, "/v1/ssh-keys/{id}", "ssh-keys", "id" = "id (or name)", "success",
    SshKey, async ssh_keys::get, TenantResource);

delete_handler!(caller remove, "/v1/ssh-keys/{id}", "ssh-keys", "id" = "id (or name)",
    "deleted (VMs created with it keep it)", async ssh_keys::delete, TenantResource);
