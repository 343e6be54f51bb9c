//! The OpenAPI 3 document, generated from the handlers' annotations and
//! the `nubis_api` types; served at `/v1/openapi.json` and checked in as
//! `api/openapi.json` (a test keeps the two equal).

use nubis_api::error::ErrorBody;
use nubis_api::{
    AddressGrant, AddressRequest, AntiAffinity, AntiAffinityScope, ApiError, ClusterHost,
    DrainPolicy, DrainProgress, ErrorCode, ExecEvent, FaultDomainSpread, HostDrain, HostIdentity,
    HostLossPolicy, HostResources, HostState, Image, ImageCreate, IncomingMigration, IncomingReady,
    InstanceHealth, Migration, MigrationCreate, NamedSshKey, Network, NetworkCreate,
    NetworkReplica, Overlay, Peer, PeerCreate, PlacementStrategy, PortForward, PortForwardCreate,
    Probe, ProbeProtocol, Protocol, Quota, RateLimit, RestartPolicy, Role, RoleRollback, RoleScale,
    RoleSpec, RoleUpgrade, Rollout, RolloutState, Service, ServiceCreate, ServiceEndpoint,
    ServiceInstance, Snapshot, SnapshotClones, SnapshotClonesMade, SnapshotRestore, SshKey,
    SshKeyCreate, Tenant, TenantCreate, TokenCreated, TokenInfo, Vm, VmCreate, VmDisk, VmEvent,
    VmExec, VmMetadata, VmNic, VmNicCreate, VmPlacement, VmState,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{
    hosts, images, migrations, networks, overlay, peers, port_forwards, services, snapshots,
    ssh_keys, system, tenants, uploads, vms,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Nubis host agent API",
        version = "1",
        description = "Multi-tenant provisioning of microVMs. Every request carries `Authorization: Bearer TOKEN`: the operator's or a tenant's."
    ),
    paths(
        system::health,
        tenants::create, tenants::list, tenants::show, tenants::remove,
        tenants::create_token, tenants::list_tokens, tenants::remove_token,
        images::create, images::list, images::show, images::remove,
        uploads::upload, uploads::list, uploads::remove,
        networks::create, networks::list, networks::show, networks::remove,
        port_forwards::create, port_forwards::list, port_forwards::show, port_forwards::remove,
        ssh_keys::create, ssh_keys::list, ssh_keys::show, ssh_keys::remove,
        vms::create, vms::list, vms::show, vms::remove, vms::start, vms::stop,
        vms::force_stop, vms::reboot, vms::pause, vms::resume, vms::console, vms::events,
        vms::exec,
        hosts::list, hosts::show, hosts::cordon, hosts::uncordon, hosts::drain, hosts::forget,
        peers::create, peers::list, peers::show, peers::remove, peers::identity,
        overlay::adopt, overlay::abandon, overlay::grant, overlay::release,
        snapshots::create, snapshots::list, snapshots::show, snapshots::remove, snapshots::restore, snapshots::clones,
        services::create, services::list, services::show, services::remove,
        services::scale, services::upgrade, services::rollback,
        migrations::create, migrations::show, migrations::cancel,
        overlay::incoming, overlay::incoming_show, overlay::incoming_done, overlay::incoming_abort, overlay::image_file,
    ),
    components(schemas(
        ApiError, ErrorBody, ErrorCode, Quota, Tenant, TenantCreate, TokenCreated, TokenInfo,
        Image, ImageCreate, uploads::Upload, Network, NetworkCreate, PortForward, PortForwardCreate, Protocol, RateLimit, Vm, VmCreate, VmDisk, VmNic, VmNicCreate, VmState, VmEvent, VmExec, ExecEvent, SshKey, SshKeyCreate, VmMetadata, NamedSshKey,
        Overlay, ClusterHost, HostResources, HostState, Peer, PeerCreate, HostIdentity, NetworkReplica, AddressRequest, AddressGrant, Snapshot, SnapshotRestore, SnapshotClones, SnapshotClonesMade,
        Migration, MigrationCreate, IncomingMigration, IncomingReady,
        VmPlacement, AntiAffinity, AntiAffinityScope, PlacementStrategy, DrainPolicy, HostDrain, DrainProgress, HostLossPolicy,
        Service, ServiceCreate, RoleSpec, Role, ServiceInstance, ServiceEndpoint, InstanceHealth, Rollout, RolloutState,
        RoleScale, RoleUpgrade, RoleRollback, Probe, ProbeProtocol, FaultDomainSpread, RestartPolicy,
    )),
    modifiers(&BearerAuth, &CidrPattern),
    tags(
        (name = "tenants", description = "Tenants and their tokens (operator only)"),
        (name = "images", description = "Guest images"),
        (name = "vms", description = "microVMs"),
        (name = "networks", description = "Tenant virtual networks"),
        (name = "port-forwards", description = "Host ports forwarded to VMs"),
        (name = "ssh-keys", description = "SSH public keys, given to VMs by the metadata service"),
        (name = "snapshots", description = "Snapshots of VMs, restored into new VMs"),
        (name = "services", description = "Services (cluster mode): roles kept at their instance count through failures, drains and rolling upgrades"),
        (name = "hosts", description = "The cluster's hosts: state, capacity, labels, the controller (operator only)"),
        (name = "peers", description = "Peer hosts that networks span (operator only)"),
        (name = "overlay", description = "Host to host: overlay networks, their addresses and migrations; served to registered peers only, over mutual TLS on the peer port"),
        (name = "system", description = "Health"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// `NetworkCreate.cidr`'s pattern, made from the same bounds as the
/// parser (see `ipv4::tenant_cidr_pattern`) rather than written twice.
struct CidrPattern;

impl Modify for CidrPattern {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::{Object, Schema};
        use utoipa::openapi::RefOr;
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        let Some(RefOr::T(Schema::Object(network))) = components.schemas.get_mut("NetworkCreate")
        else {
            return;
        };
        if let Some(RefOr::T(Schema::Object(cidr))) = network.properties.get_mut("cidr") {
            let cidr: &mut Object = cidr;
            cidr.pattern = Some(crate::ipv4::tenant_cidr_pattern());
        }
    }
}

/// The document as pretty JSON, newline-terminated.
pub fn document() -> String {
    let mut text = ApiDoc::openapi().to_pretty_json().unwrap_or_else(|err| {
        format!("{{\"error\": \"cannot render the OpenAPI document: {err}\"}}")
    });
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_document_is_current() {
        let checked_in =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../api/openapi.json");
        let current = document();
        if std::env::var_os("NUBIS_UPDATE_OPENAPI").is_some() {
            std::fs::write(&checked_in, &current).unwrap();
        }
        let stored = std::fs::read_to_string(&checked_in).unwrap_or_default();
        assert!(
            stored == current,
            "api/openapi.json is out of date: run `NUBIS_UPDATE_OPENAPI=1 cargo test -p nubis-agent openapi`"
        );
    }

    #[test]
    fn every_route_is_documented() {
        let document: serde_json::Value = serde_json::from_str(&document()).unwrap();
        let paths = document["paths"].as_object().unwrap();
        for path in [
            "/healthz",
            "/v1/tenants",
            "/v1/tenants/{id}",
            "/v1/tenants/{id}/tokens",
            "/v1/tenants/{id}/tokens/{token_id}",
            "/v1/images",
            "/v1/images/{id}",
            "/v1/vms",
            "/v1/vms/{id}",
            "/v1/vms/{id}/start",
            "/v1/vms/{id}/stop",
            "/v1/vms/{id}/force-stop",
            "/v1/vms/{id}/reboot",
            "/v1/vms/{id}/pause",
            "/v1/vms/{id}/resume",
            "/v1/vms/{id}/console",
            "/v1/vms/{id}/events",
            "/v1/vms/{id}/exec",
            "/v1/networks",
            "/v1/networks/{id}",
            "/v1/port-forwards",
            "/v1/port-forwards/{id}",
            "/v1/peers",
            "/v1/peers/{name}",
            "/v1/hosts",
            "/v1/hosts/{name}",
            "/v1/hosts/{name}/cordon",
            "/v1/hosts/{name}/uncordon",
            "/v1/hosts/{name}/drain",
            "/v1/vms/{id}/snapshots",
            "/v1/snapshots",
            "/v1/snapshots/{id}",
            "/v1/snapshots/{id}/restore",
            "/v1/vms/{id}/migration",
            "/v1/overlay/migrations",
            "/v1/overlay/migrations/{id}",
            "/v1/overlay/networks/{id}",
            "/v1/overlay/networks/{id}/addresses",
            "/v1/overlay/networks/{id}/addresses/{address}",
        ] {
            assert!(
                paths.contains_key(path),
                "{path} is not in the OpenAPI document"
            );
        }
        assert!(document["components"]["securitySchemes"]["bearer"].is_object());
    }

    /// The document's patterns take exactly what the handlers' checks do.
    #[test]
    fn patterns_match_the_checks() {
        let document: serde_json::Value = serde_json::from_str(&document()).unwrap();
        let schemas = &document["components"]["schemas"];
        let pattern = |schema: &str, field: &str| {
            let text = schemas[schema]["properties"][field]["pattern"]
                .as_str()
                .unwrap_or_else(|| panic!("{schema}.{field} has no pattern"));
            regex::Regex::new(text).unwrap()
        };
        assert!(pattern("NetworkCreate", "cidr").is_match("10.10.0.0/24"));
        let names = [
            "a",
            "web-1",
            "0db",
            "-a",
            "Web",
            "a_b",
            "a b",
            "a.b",
            ".a",
            "debian-12.1",
            "",
            "a\n",
            "é",
            &"x".repeat(63),
            &"x".repeat(64),
        ];
        for (schema, allow_dot) in [
            ("TenantCreate", false),
            ("VmCreate", false),
            ("NetworkCreate", false),
            ("SnapshotRestore", false),
            ("ImageCreate", true),
        ] {
            let regex = pattern(schema, "name");
            for name in names {
                assert_eq!(
                    regex.is_match(name),
                    crate::validate::name("name", name, allow_dot).is_ok(),
                    "{schema}.name {name:?}"
                );
            }
        }
        let paths = pattern("ImageCreate", "kernel");
        for path in [
            "/images/vmlinux",
            "/",
            "//a",
            "/a/./b",
            "/a/..b",
            "/a/...",
            "/.a",
            "images/vmlinux",
            "/images/../etc/shadow",
            "/..",
            "/a/..",
            "",
            "/a\u{0}b",
        ] {
            assert_eq!(
                paths.is_match(path),
                crate::validate::absolute_path("kernel", path).is_ok(),
                "{path:?}"
            );
        }
        let args = pattern("VmCreate", "kernel_args");
        for text in ["quiet ip=10.0.0.2", "", "a\nb", "é", "~"] {
            assert_eq!(
                args.is_match(text),
                crate::validate::kernel_args("kernel_args", text).is_ok(),
                "{text:?}"
            );
        }
    }
}
