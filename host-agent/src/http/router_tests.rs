//! The router in-process (`tower::ServiceExt::oneshot`), over a real store
//! in a temporary directory and a host network that changes nothing: the
//! statuses, error codes and messages clients see.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use nubis_api::Quota;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::router;
use crate::service::testing::{Fixture, OPERATOR_TOKEN};

/// `method path` with `token` and a JSON `body`: the status and the JSON
/// answer (Null for none).
async fn call(
    fixture: &Fixture,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {token}"));
    let body = match body {
        Some(body) => {
            request = request.header("content-type", "application/json");
            Body::from(body.to_string())
        }
        None => Body::empty(),
    };
    let request = request.body(body).expect("request");
    let response = router(fixture.state.clone())
        .oneshot(request)
        .await
        .expect("the router answers");
    let status = response.status();
    let bytes = http_body_util::BodyExt::collect(response.into_body())
        .await
        .expect("body")
        .to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, value)
}

#[tokio::test]
async fn another_tenants_network_and_vm_are_404s() {
    let fixture = Fixture::new();
    let (mine, my_token) = fixture.tenant("mine", Quota::default());
    let (_, their_token) = fixture.tenant("theirs", Quota::default());
    fixture.image(&mine, "base", 4096);
    let (status, net) = call(
        &fixture,
        Method::POST,
        "/v1/networks",
        &my_token,
        Some(json!({"name": "net", "cidr": "10.9.0.0/24"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{net}");
    let (status, vm) = call(
        &fixture,
        Method::POST,
        "/v1/vms",
        &my_token,
        Some(json!({"name": "vm", "image": "base", "nics": [{"network": "net"}]})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{vm}");
    assert_eq!(vm["nics"][0]["address"], "10.9.0.2/24");
    let net_id = net["id"].as_str().expect("network id");
    let vm_id = vm["id"].as_str().expect("VM id");
    for (method, path, what, id) in [
        (
            Method::GET,
            format!("/v1/networks/{net_id}"),
            "network",
            net_id,
        ),
        (
            Method::DELETE,
            format!("/v1/networks/{net_id}"),
            "network",
            net_id,
        ),
        (Method::GET, format!("/v1/vms/{vm_id}"), "VM", vm_id),
        (Method::DELETE, format!("/v1/vms/{vm_id}"), "VM", vm_id),
        (Method::GET, format!("/v1/vms/{vm_id}/events"), "VM", vm_id),
        (Method::POST, format!("/v1/vms/{vm_id}/start"), "VM", vm_id),
        (Method::GET, "/v1/images/base".to_string(), "image", "base"),
    ] {
        let (status, body) = call(&fixture, method.clone(), &path, &their_token, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {body}");
        assert_eq!(body["error"]["code"], "not_found", "{body}");
        assert_eq!(body["error"]["message"], format!("no {what} '{id}'"));
    }
    let (status, body) = call(&fixture, Method::GET, "/v1/vms", &their_token, None).await;
    assert_eq!((status, body), (StatusCode::OK, json!([])));
    let (status, body) = call(&fixture, Method::GET, "/v1/vms", OPERATOR_TOKEN, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_array().map(Vec::len), Some(1), "{body}");
}

#[tokio::test]
async fn quotas_and_exhausted_addresses_are_429s() {
    let fixture = Fixture::new();
    let quota = Quota {
        max_vms: 6,
        max_networks: 1,
        ..Quota::default()
    };
    let (tenant, token) = fixture.tenant("acme", quota);
    fixture.image(&tenant, "base", 4096);
    let network = |name: &str, cidr: &str| json!({"name": name, "cidr": cidr});
    let (status, body) = call(
        &fixture,
        Method::POST,
        "/v1/networks",
        &token,
        Some(network("small", "10.9.0.0/29")),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = call(
        &fixture,
        Method::POST,
        "/v1/networks",
        &token,
        Some(network("more", "10.8.0.0/24")),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "quota_exceeded");
    for index in 0..5 {
        let (status, body) = call(
            &fixture,
            Method::POST,
            "/v1/vms",
            &token,
            Some(json!({"name": format!("vm{index}"), "image": "base", "nics": [{"network": "small"}]})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (status, body) = call(
        &fixture,
        Method::POST,
        "/v1/vms",
        &token,
        Some(json!({"name": "vm5", "image": "base", "nics": [{"network": "small"}]})),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(
        body["error"]["message"],
        "no free address left in 10.9.0.0/29"
    );
    let (status, body) = call(
        &fixture,
        Method::POST,
        "/v1/vms",
        &token,
        Some(json!({"name": "vm5", "image": "base"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = call(
        &fixture,
        Method::POST,
        "/v1/vms",
        &token,
        Some(json!({"name": "vm6", "image": "base"})),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "quota_exceeded");
}

#[tokio::test]
async fn bad_and_undoable_requests_name_their_field() {
    let fixture = Fixture::new();
    let (_, token) = fixture.tenant("acme", Quota::default());
    for (body, status, code, field) in [
        (
            json!({"name": "n", "cidr": "10.9.0.1/24"}),
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "cidr",
        ),
        (
            json!({"name": "n", "cidr": "192.168.7.0/24"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unprocessable",
            "cidr",
        ),
        (
            json!({"name": "n", "cidr": "10.9.0.0/24", "mtu": 100}),
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "mtu",
        ),
        (
            json!({"name": "n", "cidr": "10.9.0.0/24", "hosts": ["nowhere"]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unprocessable",
            "hosts[0]",
        ),
    ] {
        let (got, answer) = call(
            &fixture,
            Method::POST,
            "/v1/networks",
            &token,
            Some(body.clone()),
        )
        .await;
        assert_eq!(got, status, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{answer}");
        assert_eq!(answer["error"]["field"], field, "{answer}");
    }
    let (status, answer) = call(
        &fixture,
        Method::POST,
        "/v1/vms",
        &token,
        Some(json!({"name": "vm", "image": "missing"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["field"], "image");
    assert_eq!(answer["error"]["message"], "no image 'missing'");
    let (status, answer) = call(
        &fixture,
        Method::POST,
        "/v1/networks",
        OPERATOR_TOKEN,
        Some(json!({"name": "n", "cidr": "10.9.0.0/24"})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
}

#[tokio::test]
async fn the_migration_endpoints_answer_in_the_apis_terms() {
    let fixture = Fixture::new();
    let (mine, token) = fixture.tenant("mine", Quota::default());
    let (_, their_token) = fixture.tenant("theirs", Quota::default());
    fixture.image(&mine, "base", 4096);
    let (status, vm) = call(
        &fixture,
        Method::POST,
        "/v1/vms",
        &token,
        Some(json!({"name": "vm", "image": "base"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{vm}");
    let path = format!("/v1/vms/{}/migration", vm["id"].as_str().expect("VM id"));
    // This host has no underlay: nothing migrates from here.
    let (status, answer) = call(
        &fixture,
        Method::POST,
        &path,
        &token,
        Some(json!({"host": "b"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["code"], "unprocessable");
    let (status, answer) = call(
        &fixture,
        Method::POST,
        &path,
        &token,
        Some(json!({"host": "b", "speed": 1})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["error"]["field"], "speed");
    let (status, answer) = call(&fixture, Method::GET, &path, &token, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    assert_eq!(answer["error"]["code"], "not_found");
    let (status, answer) = call(&fixture, Method::DELETE, &path, &token, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(answer["error"]["message"], "no migration of this VM runs");
    let (status, _) = call(&fixture, Method::DELETE, &path, &their_token, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The host-to-host routes are for peers over mutual TLS only.
    let (status, answer) = call(
        &fixture,
        Method::DELETE,
        "/v1/overlay/migrations/vm-0123456789abcdef",
        OPERATOR_TOKEN,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
}

/// The keys of a JSON object, sorted.
fn keys(value: &Value) -> Vec<String> {
    let mut keys: Vec<String> = value
        .as_object()
        .map(|object| object.keys().cloned().collect())
        .unwrap_or_default();
    keys.sort();
    keys
}

#[tokio::test]
async fn stored_rows_answer_in_the_api_s_shape() {
    let fixture = Fixture::new();
    let (status, tenant) = call(
        &fixture,
        Method::POST,
        "/v1/tenants",
        OPERATOR_TOKEN,
        Some(json!({"name": "acme"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{tenant}");
    assert_eq!(keys(&tenant), ["created_at", "id", "name", "quota"]);
    let tenant_id = tenant["id"].as_str().expect("tenant id");
    let path = format!("/v1/tenants/{tenant_id}");
    let (status, shown) = call(&fixture, Method::GET, &path, OPERATOR_TOKEN, None).await;
    assert_eq!((status, &shown), (StatusCode::OK, &tenant));
    let token = fixture
        .services
        .store
        .create_token(tenant_id)
        .expect("token")
        .token;
    let stored = fixture
        .services
        .store
        .get_tenant(tenant_id)
        .expect("store")
        .expect("tenant");
    fixture.image(&stored.into(), "base", 4096);
    let (status, image) = call(&fixture, Method::GET, "/v1/images/base", &token, None).await;
    assert_eq!(status, StatusCode::OK, "{image}");
    assert_eq!(
        keys(&image),
        [
            "cmdline",
            "created_at",
            "id",
            "kernel",
            "name",
            "rootfs",
            "rootfs_bytes",
            "tenant_id"
        ]
    );
    assert_eq!(image["rootfs_bytes"], 4096);
    let (status, network) = call(
        &fixture,
        Method::POST,
        "/v1/networks",
        &token,
        Some(json!({"name": "net", "cidr": "10.9.0.0/24"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{network}");
    assert_eq!(
        keys(&network),
        [
            "bridge",
            "cidr",
            "created_at",
            "dhcp",
            "dns",
            "gateway",
            "id",
            "mtu",
            "name",
            "nat",
            "tenant_id",
            "vni"
        ]
    );
    assert_eq!(network["gateway"], "10.9.0.1");
    let path = format!("/v1/networks/{}", network["id"].as_str().expect("id"));
    let (status, shown) = call(&fixture, Method::GET, &path, &token, None).await;
    assert_eq!((status, &shown), (StatusCode::OK, &network));
    let (status, listed) = call(&fixture, Method::GET, "/v1/networks", &token, None).await;
    assert_eq!((status, listed), (StatusCode::OK, json!([network])));
}

#[tokio::test]
async fn a_standalone_host_lists_itself_and_refuses_cordoning() {
    let fixture = Fixture::new();
    let (tenant, token) = fixture.tenant("acme", Quota::default());
    fixture.image(&tenant, "base", 4096);
    let (status, hosts) = call(&fixture, Method::GET, "/v1/hosts", OPERATOR_TOKEN, None).await;
    assert_eq!(status, StatusCode::OK, "{hosts}");
    let hosts: Vec<nubis_api::ClusterHost> = serde_json::from_value(hosts).expect("hosts");
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0].state, nubis_api::HostState::Up);
    assert_eq!(hosts[0].vms, Some(0));
    let name = hosts[0].name.clone();
    let (status, _) = call(
        &fixture,
        Method::GET,
        &format!("/v1/hosts/{name}"),
        OPERATOR_TOKEN,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for (method, path, expected) in [
        (
            Method::GET,
            "/v1/hosts/elsewhere".to_string(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/v1/hosts/..%2Fetc".to_string(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            format!("/v1/hosts/{name}/cordon"),
            StatusCode::CONFLICT,
        ),
        (
            Method::DELETE,
            format!("/v1/hosts/{name}"),
            StatusCode::CONFLICT,
        ),
    ] {
        let (status, body) = call(&fixture, method.clone(), &path, OPERATOR_TOKEN, None).await;
        assert_eq!(status, expected, "{method} {path}: {body}");
    }
    // Hosts are the operator's.
    let (status, _) = call(&fixture, Method::GET, "/v1/hosts", &token, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}
