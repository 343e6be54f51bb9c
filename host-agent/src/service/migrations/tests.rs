//! The migration service's parts that need no VMM and no peer: the
//! record's state machine, the phases, and the refusals and leftovers of
//! both sides, in-process over a real store (`service::testing`).

use std::net::Ipv4Addr;

use nubis_api::{IncomingMigration, Migration, MigrationCreate, Quota, Tenant, Vm, VmCreate};
use nubis_contract::migration::{Phase, Progress};

use super::*;
use crate::service::testing::Fixture;
use crate::service::{incoming, vms, ServiceError};

const PHASES: [Phase; 7] = [
    Phase::Connecting,
    Phase::Copying,
    Phase::HandingOver,
    Phase::Completed,
    Phase::Failed,
    Phase::Cancelled,
    Phase::Unconfirmed,
];

fn record(phase: &str) -> Migration {
    Migration {
        vm_id: "vm-1".into(),
        tenant_id: "tn-1".into(),
        host: "b".into(),
        phase: phase.into(),
        rounds: 0,
        bytes_sent: 0,
        dirty_pages: 0,
        expected_downtime_ms: 0,
        downtime_ms: None,
        elapsed_ms: 0,
        error: None,
    }
}

#[test]
fn the_downtime_is_read_from_the_vmm_log() {
    let log = "[nubis-vmm 1.0 ms INFO ] migrating to 10.0.0.2:7100\n\
               [nubis-vmm 812.2 ms INFO ] migrated to 10.0.0.2:7100 in 640 ms, guest paused 37 ms\n\
               [nubis-vmm 812.9 ms INFO ] VM stopped: migrated to 10.0.0.2:7100\n";
    assert_eq!(downtime_in_log(log), Some(37));
    assert_eq!(downtime_in_log("no migration here"), None);
    assert_eq!(downtime_in_log("guest paused lots ms"), None);
}

#[test]
fn every_vmm_phase_is_the_records_phase_and_ends_it_alike() {
    for phase in PHASES {
        let mut migration = record("preparing");
        let mut progress = Progress::new("10.0.0.2:40000");
        progress.phase = phase;
        progress.rounds = 3;
        progress.bytes_sent = 4096;
        progress.dirty_pages = 7;
        progress.expected_downtime_ms = 12;
        progress.error = Some("boom".into());
        take_progress(&mut migration, &progress, 99);
        assert_eq!(migration.phase, phase.as_str());
        assert_eq!(migration.is_over(), phase.is_over(), "{phase:?}");
        assert_eq!(
            (
                migration.rounds,
                migration.bytes_sent,
                migration.dirty_pages,
                migration.expected_downtime_ms,
                migration.elapsed_ms
            ),
            (3, 4096, 7, 12, 99)
        );
        assert_eq!(migration.error.as_deref(), Some("boom"));
    }
    assert!(!record("preparing").is_over());
}

#[test]
fn a_finished_drive_completes_the_record() {
    let mut migration = record("completed");
    migration.downtime_ms = Some(30);
    take_outcome(&mut migration, Ok(()), 640);
    assert_eq!(migration.phase, "completed");
    assert_eq!(migration.elapsed_ms, 640);
    assert_eq!(migration.downtime_ms, Some(30));
    assert_eq!(migration.error, None);
}

#[test]
fn a_failed_drive_fails_the_record_but_keeps_a_cancel_or_an_unconfirmed_hand_over() {
    // Failed before or while the VMM copied, or after it handed over (the
    // destination was not told): failed.
    for phase in [
        "preparing",
        "connecting",
        "copying",
        "handing_over",
        "completed",
    ] {
        let mut migration = record(phase);
        take_outcome(&mut migration, Err("the peer is gone"), 5);
        assert_eq!(migration.phase, "failed", "from {phase}");
        assert_eq!(migration.error.as_deref(), Some("the peer is gone"));
        assert_eq!(migration.elapsed_ms, 5);
    }
    // The VMM's own end stays what it was, with the driver's reason.
    for phase in ["cancelled", "unconfirmed", "failed"] {
        let mut migration = record(phase);
        take_outcome(&mut migration, Err("the migration ended cancelled"), 5);
        assert_eq!(migration.phase, phase);
        assert_eq!(
            migration.error.as_deref(),
            Some("the migration ended cancelled")
        );
    }
}

#[test]
fn only_a_vmm_that_left_for_the_destination_completed() {
    assert_eq!(
        phase_of_exit(Some("migrated to 10.0.0.2:40000")),
        Phase::Completed
    );
    assert_eq!(phase_of_exit(Some("exit code 1")), Phase::Failed);
    assert_eq!(phase_of_exit(None), Phase::Failed);
}

#[test]
fn the_registry_tells_a_running_migration_from_an_ended_one() {
    let migrations = Migrations::default();
    assert!(!migrations.runs("vm-1"));
    migrations.set(record("copying"));
    assert!(migrations.runs("vm-1"));
    migrations.update("vm-1", |m| m.phase = "cancelled".into());
    assert!(!migrations.runs("vm-1"));
    // An update of an unknown VM records nothing.
    migrations.update("vm-2", |m| m.phase = "copying".into());
    assert!(migrations.get("vm-2").is_none());
}

/// A tenant with an image and a stopped VM on the default bridge.
async fn stopped_vm(fixture: &Fixture) -> (Tenant, Vm) {
    let (tenant, _) = fixture.tenant("acme", Quota::default());
    fixture.image(&tenant, "base", 4096);
    let request: VmCreate = serde_json::from_value(serde_json::json!({
        "name": "vm", "image": "base", "nics": [{}]
    }))
    .expect("VM request");
    let vm = vms::create(&fixture.services, &tenant.id, request)
        .await
        .expect("VM");
    (tenant, vm)
}

fn to(host: &str) -> MigrationCreate {
    serde_json::from_value(serde_json::json!({ "host": host })).expect("migration request")
}

fn set_underlay(fixture: &Fixture, address: Ipv4Addr) {
    *fixture
        .network
        .underlay
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(address);
}

#[tokio::test]
async fn a_refused_migration_leaves_no_record() {
    let fixture = Fixture::new();
    let svc = &fixture.services;
    let (tenant, vm) = stopped_vm(&fixture).await;
    let scope = Scope::Tenant(&tenant.id);

    let err = start(svc, scope, "vm-nope", to("b"))
        .await
        .expect_err("no VM");
    assert!(matches!(err, ServiceError::NotFound { .. }), "{err}");

    let mut too_long = to("b");
    too_long.downtime_ms = Some(u64::MAX);
    let err = start(svc, scope, &vm.id, too_long)
        .await
        .expect_err("out of bounds");
    assert!(
        matches!(&err, ServiceError::Invalid { field: Some(field), .. } if field == "downtime_ms"),
        "{err:?}"
    );

    let err = start(svc, scope, &vm.id, to("b"))
        .await
        .expect_err("no underlay");
    assert!(matches!(err, ServiceError::Unprocessable { .. }), "{err}");

    set_underlay(&fixture, Ipv4Addr::new(10, 0, 0, 1));
    let err = start(svc, scope, &vm.id, to("b"))
        .await
        .expect_err("no such host");
    assert!(
        matches!(&err, ServiceError::Unprocessable { field: Some(field), .. } if field == "host"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "no host 'b' (see /v1/peers)");

    svc.store
        .create_host("b", "10.0.0.2", 7443, &"ab".repeat(32))
        .expect("host");
    let err = start(svc, scope, &vm.id, to("b"))
        .await
        .expect_err("the VM does not run");
    assert!(matches!(err, ServiceError::Conflict(_)), "{err}");
    assert!(
        err.to_string().contains("only a running VM migrates"),
        "{err}"
    );

    assert!(svc.migrations.get(&vm.id).is_none());
    let err = show(svc, scope, &vm.id).expect_err("no migration");
    assert_eq!(err.to_string(), format!("no migration of VM '{}'", vm.id));
}

#[tokio::test]
async fn a_migration_is_shown_to_its_tenant_and_the_operator_only() {
    let fixture = Fixture::new();
    let svc = &fixture.services;
    let (tenant, vm) = stopped_vm(&fixture).await;
    let (other, _) = fixture.tenant("other", Quota::default());
    svc.migrations.set(preparing(&vm.clone().into(), "b"));
    let mine = show(svc, Scope::Tenant(&tenant.id), &vm.id).expect("its own");
    assert_eq!(
        (mine.phase.as_str(), mine.host.as_str()),
        ("preparing", "b")
    );
    show(svc, Scope::Operator, &vm.id).expect("the operator's");
    let err = show(svc, Scope::Tenant(&other.id), &vm.id).expect_err("another tenant's");
    assert!(matches!(err, ServiceError::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn a_hand_over_left_by_a_stopped_agent_is_the_operators_to_forget() {
    let fixture = Fixture::new();
    let svc = &fixture.services;
    let (tenant, vm) = stopped_vm(&fixture).await;
    let scope = Scope::Tenant(&tenant.id);

    let err = cancel(svc, scope, &vm.id).await.expect_err("nothing runs");
    assert!(matches!(err, ServiceError::Conflict(_)), "{err}");
    // An ended migration is not one to cancel either.
    svc.migrations.set(preparing(&vm.clone().into(), "b"));
    svc.migrations.update(&vm.id, |m| m.phase = "failed".into());
    let err = cancel(svc, scope, &vm.id).await.expect_err("it ended");
    assert_eq!(err.to_string(), "no migration of this VM runs");
    assert!(interrupted_handovers(svc).expect("list").is_empty());

    // The agent stopped after recording the hand-over.
    let paths = svc.supervisor.paths(&vm.id);
    std::fs::create_dir_all(&paths.dir).expect("VM directory");
    handover::record_handover(&paths, "b").expect("mark");
    let pending = interrupted_handovers(svc).expect("list");
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].0.id.as_str(), pending[0].1.as_str()),
        (vm.id.as_str(), "b")
    );

    let err = cancel(svc, scope, &vm.id)
        .await
        .expect_err("a tenant may not");
    assert!(matches!(err, ServiceError::Forbidden(_)), "{err}");
    assert_eq!(handover::handed_over_to(&paths).as_deref(), Some("b"));

    cancel(svc, Scope::Operator, &vm.id)
        .await
        .expect("the operator may");
    assert_eq!(handover::handed_over_to(&paths), None);
    assert!(interrupted_handovers(svc).expect("list").is_empty());
}

#[tokio::test]
async fn a_running_migration_is_no_interrupted_hand_over() {
    let fixture = Fixture::new();
    let svc = &fixture.services;
    let (_, vm) = stopped_vm(&fixture).await;
    let paths = svc.supervisor.paths(&vm.id);
    std::fs::create_dir_all(&paths.dir).expect("VM directory");
    handover::record_handover(&paths, "b").expect("mark");
    svc.migrations.set(preparing(&vm.clone().into(), "b"));
    svc.migrations
        .update(&vm.id, |m| m.phase = "handing_over".into());
    assert!(interrupted_handovers(svc).expect("list").is_empty());
}

#[tokio::test]
async fn a_peer_sees_and_finishes_only_the_vms_it_sent() {
    let fixture = Fixture::new();
    let svc = &fixture.services;
    let (_, vm) = stopped_vm(&fixture).await;
    // A VM of this host's own is no peer's.
    let err = incoming::received_from(svc, "10.0.0.2", &vm.id).expect_err("this host's own");
    assert!(matches!(err, ServiceError::NotFound { .. }), "{err}");

    svc.store
        .add_event(
            &vm.id,
            "created",
            &format!("{}10.0.0.2", handover::RECEIVED_FROM),
        )
        .expect("event");
    incoming::received_from(svc, "10.0.0.2", &vm.id).expect("its source's");
    let err = incoming::received_from(svc, "10.0.0.3", &vm.id).expect_err("another peer");
    assert!(matches!(err, ServiceError::NotFound { .. }), "{err}");
    let err = incoming::done(svc, "10.0.0.3", &vm.id)
        .await
        .expect_err("another peer");
    assert!(matches!(err, ServiceError::NotFound { .. }), "{err}");

    // Nothing runs here: there is nothing to be handed.
    let err = incoming::done(svc, "10.0.0.2", &vm.id)
        .await
        .expect_err("no VMM");
    assert!(matches!(err, ServiceError::Conflict(_)), "{err}");
    assert!(err.to_string().contains("has no VMM here"), "{err}");
}

#[tokio::test]
async fn a_peers_vm_definition_is_checked_as_a_tenants() {
    let fixture = Fixture::new();
    let svc = &fixture.services;
    let (tenant, vm) = stopped_vm(&fixture).await;
    let image = svc
        .store
        .get_image(&tenant.id, &vm.image_id)
        .expect("store")
        .expect("image");
    let local = Ipv4Addr::new(10, 0, 0, 1);
    let mut sent = IncomingMigration {
        vm: vm.clone(),
        metadata: Default::default(),
        tenant: tenant.clone(),
        image: image.into(),
        source: "10.0.0.2".into(),
    };
    sent.vm.nics[0].mac = Some("01:00:5e:00:00:01".into());
    let err = incoming::receive(svc, local, &sent)
        .await
        .expect_err("a multicast MAC");
    assert!(
        matches!(&err, ServiceError::Invalid { field: Some(field), .. } if field == "vm.nics[0].mac"),
        "{err:?}"
    );

    sent.vm = vm.clone();
    sent.vm.kernel_args = "init=/bin/sh\n".into();
    let err = incoming::receive(svc, local, &sent)
        .await
        .expect_err("a newline in the kernel arguments");
    assert!(
        matches!(&err, ServiceError::Invalid { field: Some(field), .. } if field == "vm.kernel_args"),
        "{err:?}"
    );
}
