//! What the controller does to keep a role as its record says, decided
//! from the records alone: no I/O, no clock (the time is an input), so
//! every rule is unit-tested here and the controller only applies the
//! plan (`service_control.rs`).
//!
//! A role has `instances` slots, 0 to count - 1; each holds one live
//! (not retiring) instance. The rules, in order:
//! - a slot at or past the count is scaled down: its instance retires;
//!   a slot with two instances keeps the better one;
//! - a rollout in progress replaces the update domain it is at: that
//!   domain's instances of another revision retire, and the rollout moves
//!   to the next domain once every slot of this one has an instance of the
//!   new revision that is healthy; an instance of the new revision that
//!   turns unhealthy stops the rollout (`failed`), where it is;
//! - an unhealthy instance of a role that restarts is replaced, unless it
//!   is of the revision a failed rollout left (replacing it would fail the
//!   same way: roll back or upgrade again); an instance whose host is down
//!   is not judged here (the controller's host-loss handling restarts it
//!   elsewhere once the host is lost);
//! - every empty slot gets a new instance of the role's revision.

use std::collections::BTreeMap;

use nubis_api::{InstanceHealth, RestartPolicy, Rollout, RolloutState, VmState};

use super::services::{InstanceOf, RoleRecord};

/// An instance as the plan sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance<'a> {
    pub vm_id: &'a str,
    pub name: &'a str,
    pub of: &'a InstanceOf,
    pub retiring: bool,
    pub health: InstanceHealth,
    /// Its host is down: its health is not known.
    pub host_down: bool,
    /// A drain moves it: what its old host reports meanwhile (stopped,
    /// once handed over) says nothing of its health.
    pub moving: bool,
}

/// What to do for one role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RolePlan {
    /// Slots to give a new instance of the role's revision.
    pub create: Vec<u32>,
    /// Instances to retire, with why.
    pub retire: Vec<(String, String)>,
    /// The rollout as it is to be written, when it changed.
    pub rollout: Option<Rollout>,
    /// Events for the service: (kind, message).
    pub events: Vec<(String, String)>,
}

/// An instance's health from its state and its host's report: a running
/// instance is healthy without a probe, else as its probe says (starting
/// until the first report); stopped and failed ones are unhealthy.
pub fn health(state: VmState, reported: Option<InstanceHealth>, probed: bool) -> InstanceHealth {
    match state {
        VmState::Running if probed => reported.unwrap_or(InstanceHealth::Starting),
        VmState::Running => InstanceHealth::Healthy,
        VmState::Stopped | VmState::Failed => InstanceHealth::Unhealthy,
        VmState::Pending | VmState::Starting | VmState::Paused | VmState::Stopping => {
            InstanceHealth::Starting
        }
    }
}

/// The plan for `role`, given its instances (live and retiring).
pub fn plan_role(role: &RoleRecord, instances: &[Instance<'_>], now: u64) -> RolePlan {
    let spec = &role.spec;
    let mut plan = RolePlan::default();
    let mut slots: BTreeMap<u32, Vec<&Instance<'_>>> = BTreeMap::new();
    for instance in instances.iter().filter(|instance| !instance.retiring) {
        slots.entry(instance.of.index).or_default().push(instance);
    }
    let mut kept: BTreeMap<u32, &Instance<'_>> = BTreeMap::new();
    let mut scaled_down = 0;
    for (slot, mut held) in slots {
        if slot >= spec.instances {
            scaled_down += held.len();
            for instance in held {
                plan.retire.push((
                    instance.vm_id.to_string(),
                    format!("scaled down to {} instances", spec.instances),
                ));
            }
            continue;
        }
        // The best first: of the role's revision, healthy, then by id.
        held.sort_by_key(|instance| {
            (
                instance.of.revision != role.revision,
                instance.health != InstanceHealth::Healthy,
                instance.vm_id,
            )
        });
        let mut held = held.into_iter();
        if let Some(best) = held.next() {
            kept.insert(slot, best);
        }
        for extra in held {
            plan.retire.push((
                extra.vm_id.to_string(),
                format!("slot {slot} has another instance"),
            ));
        }
    }
    if scaled_down > 0 {
        plan.events.push((
            "scaled".into(),
            format!(
                "role {}: {scaled_down} instance(s) retired, scaled down to {}",
                spec.name, spec.instances
            ),
        ));
    }
    let rollout = advance_rollout(role, &mut kept, &mut plan, now);
    let failed_revision = rollout
        .as_ref()
        .filter(|rollout| rollout.state == RolloutState::Failed)
        .map(|rollout| rollout.to_revision);
    if rollout != role.rollout {
        plan.rollout = rollout;
    }
    if spec.restart == RestartPolicy::Always {
        let unhealthy: Vec<u32> = kept
            .iter()
            .filter(|(_, instance)| {
                instance.health == InstanceHealth::Unhealthy
                    && !instance.host_down
                    && !instance.moving
                    && Some(instance.of.revision) != failed_revision
            })
            .map(|(slot, _)| *slot)
            .collect();
        for slot in unhealthy {
            if let Some(instance) = kept.remove(&slot) {
                plan.retire.push((
                    instance.vm_id.to_string(),
                    "unhealthy: replaced by a new instance".to_string(),
                ));
                plan.events.push((
                    "replaced".into(),
                    format!(
                        "role {}: instance {} is unhealthy and is replaced",
                        spec.name, instance.name
                    ),
                ));
            }
        }
    }
    plan.create = (0..spec.instances)
        .filter(|slot| !kept.contains_key(slot))
        .collect();
    plan
}

/// Moves the role's rollout on as far as its instances allow, retiring
/// the instances of the domain it is at that are of another revision
/// (they leave `kept`). The rollout as it is now.
fn advance_rollout(
    role: &RoleRecord,
    kept: &mut BTreeMap<u32, &Instance<'_>>,
    plan: &mut RolePlan,
    now: u64,
) -> Option<Rollout> {
    let mut rollout = role.rollout.clone()?;
    if rollout.state != RolloutState::InProgress {
        return Some(rollout);
    }
    let spec = &role.spec;
    let domains = spec.update_domains.max(1);
    rollout.domains = domains;
    let target = rollout.to_revision;
    loop {
        let domain = rollout.domain;
        if domain >= domains {
            rollout.state = RolloutState::Done;
            rollout.ended_at = Some(now);
            rollout.message = format!("all {domains} update domains at revision {target}");
            plan.events.push((
                "rollout".into(),
                format!("role {}: rollout to revision {target} done", spec.name),
            ));
            return Some(rollout);
        }
        let slots: Vec<u32> = (0..spec.instances)
            .filter(|slot| spec.update_domain(*slot) == domain)
            .collect();
        for slot in &slots {
            let stale = kept
                .get(slot)
                .is_some_and(|instance| instance.of.revision != target);
            if stale {
                if let Some(instance) = kept.remove(slot) {
                    plan.retire.push((
                        instance.vm_id.to_string(),
                        format!("replaced by revision {target} (update domain {domain})"),
                    ));
                }
            }
        }
        let failed = slots.iter().find_map(|slot| {
            kept.get(slot)
                .filter(|instance| instance.health == InstanceHealth::Unhealthy)
        });
        if let Some(instance) = failed {
            rollout.state = RolloutState::Failed;
            rollout.ended_at = Some(now);
            rollout.message = format!(
                "update domain {} of {domains}: instance {} of revision {target} is unhealthy; the rollout stopped (roll back, or upgrade again)",
                domain + 1,
                instance.name
            );
            plan.events.push((
                "rollout".into(),
                format!("role {}: {}", spec.name, rollout.message),
            ));
            return Some(rollout);
        }
        let healthy = slots
            .iter()
            .filter(|slot| {
                kept.get(slot)
                    .is_some_and(|instance| instance.health == InstanceHealth::Healthy)
            })
            .count();
        if healthy < slots.len() {
            let message = format!(
                "update domain {} of {domains}: {healthy} of {} instances of revision {target} healthy",
                domain + 1,
                slots.len()
            );
            rollout.message = message;
            return Some(rollout);
        }
        if !slots.is_empty() {
            plan.events.push((
                "rollout".into(),
                format!(
                    "role {}: update domain {} of {domains} at revision {target}",
                    spec.name,
                    domain + 1
                ),
            ));
        }
        rollout.domain = domain + 1;
    }
}

/// A new rollout of `role` from `from` to its current revision.
pub fn start_rollout(role: &RoleRecord, from: u64, rollback: bool, now: u64) -> Rollout {
    Rollout {
        from_revision: from,
        to_revision: role.revision,
        rollback,
        state: RolloutState::InProgress,
        domain: 0,
        domains: role.spec.update_domains.max(1),
        message: "starting".to_string(),
        started_at: now,
        ended_at: None,
    }
}

#[cfg(test)]
mod tests {
    use nubis_api::RoleSpec;

    use super::*;

    fn role(instances: u32, domains: u32, revision: u64) -> RoleRecord {
        let mut spec = RoleSpec::new("web", "img-1", instances);
        spec.update_domains = domains;
        RoleRecord {
            spec,
            revision,
            storage_mib: 10,
            previous: None,
            rollout: None,
            virtual_address: None,
        }
    }

    struct Fleet {
        of: Vec<(String, String, InstanceOf)>,
    }

    impl Fleet {
        /// Instances (slot, revision) named `web-{slot}-r{revision}`.
        fn new(instances: &[(u32, u64)]) -> Self {
            Fleet {
                of: instances
                    .iter()
                    .map(|(index, revision)| {
                        (
                            format!("vm-{index}-{revision}"),
                            format!("web-{index}-r{revision}"),
                            InstanceOf {
                                service: "svc-1".into(),
                                role: "web".into(),
                                index: *index,
                                revision: *revision,
                                probe: None,
                            },
                        )
                    })
                    .collect(),
            }
        }

        fn all(&self, health: InstanceHealth) -> Vec<Instance<'_>> {
            self.of
                .iter()
                .map(|(id, name, of)| Instance {
                    vm_id: id,
                    name,
                    of,
                    retiring: false,
                    health,
                    host_down: false,
                    moving: false,
                })
                .collect()
        }
    }

    fn retired(plan: &RolePlan) -> Vec<&str> {
        let mut ids: Vec<&str> = plan.retire.iter().map(|(id, _)| id.as_str()).collect();
        ids.sort();
        ids
    }

    #[test]
    fn a_new_role_fills_every_slot() {
        let plan = plan_role(&role(3, 2, 1), &[], 0);
        assert_eq!(plan.create, [0, 1, 2]);
        assert!(plan.retire.is_empty() && plan.rollout.is_none());
    }

    #[test]
    fn a_full_healthy_role_is_left_alone() {
        let fleet = Fleet::new(&[(0, 1), (1, 1), (2, 1)]);
        let plan = plan_role(&role(3, 2, 1), &fleet.all(InstanceHealth::Healthy), 0);
        assert_eq!(plan, RolePlan::default());
        // Starting instances are waited for.
        let plan = plan_role(&role(3, 2, 1), &fleet.all(InstanceHealth::Starting), 0);
        assert_eq!(plan, RolePlan::default());
    }

    #[test]
    fn scaling_down_retires_the_highest_slots_and_up_fills_new_ones() {
        let fleet = Fleet::new(&[(0, 1), (1, 1), (2, 1), (3, 1)]);
        let plan = plan_role(&role(2, 2, 1), &fleet.all(InstanceHealth::Healthy), 0);
        assert_eq!(retired(&plan), ["vm-2-1", "vm-3-1"]);
        assert!(plan.create.is_empty());
        assert_eq!(plan.events.len(), 1);
        let plan = plan_role(&role(6, 2, 1), &fleet.all(InstanceHealth::Healthy), 0);
        assert_eq!(plan.create, [4, 5]);
        assert!(plan.retire.is_empty());
    }

    #[test]
    fn unhealthy_instances_are_replaced_unless_the_role_says_never() {
        let fleet = Fleet::new(&[(0, 1), (1, 1)]);
        let mut instances = fleet.all(InstanceHealth::Healthy);
        instances[1].health = InstanceHealth::Unhealthy;
        let plan = plan_role(&role(2, 2, 1), &instances, 0);
        assert_eq!(retired(&plan), ["vm-1-1"]);
        assert_eq!(plan.create, [1]);
        assert_eq!(plan.events[0].0, "replaced");
        let mut never = role(2, 2, 1);
        never.spec.restart = RestartPolicy::Never;
        assert_eq!(plan_role(&never, &instances, 0), RolePlan::default());
        // On a down host: left to the host-loss handling.
        instances[1].host_down = true;
        assert_eq!(
            plan_role(&role(2, 2, 1), &instances, 0),
            RolePlan::default()
        );
        // Moving (a drain): its old host's report is not its health.
        instances[1].host_down = false;
        instances[1].moving = true;
        assert_eq!(
            plan_role(&role(2, 2, 1), &instances, 0),
            RolePlan::default()
        );
    }

    #[test]
    fn a_retiring_instance_leaves_its_slot_to_a_new_one() {
        let fleet = Fleet::new(&[(0, 1), (1, 1)]);
        let mut instances = fleet.all(InstanceHealth::Healthy);
        instances[1].retiring = true;
        let plan = plan_role(&role(2, 2, 1), &instances, 0);
        assert_eq!(plan.create, [1]);
        assert!(plan.retire.is_empty());
    }

    #[test]
    fn a_slot_with_two_instances_keeps_the_current_revision() {
        let fleet = Fleet::new(&[(0, 1), (0, 2)]);
        let plan = plan_role(&role(1, 1, 2), &fleet.all(InstanceHealth::Healthy), 0);
        assert_eq!(retired(&plan), ["vm-0-1"]);
        assert!(plan.create.is_empty());
    }

    fn upgraded(instances: u32, domains: u32) -> RoleRecord {
        let mut role = role(instances, domains, 2);
        role.rollout = Some(start_rollout(&role, 1, false, 100));
        role
    }

    #[test]
    fn a_rollout_replaces_one_update_domain_at_a_time() {
        let role = upgraded(4, 2);
        // Domain 0 is slots 0 and 2.
        let fleet = Fleet::new(&[(0, 1), (1, 1), (2, 1), (3, 1)]);
        let plan = plan_role(&role, &fleet.all(InstanceHealth::Healthy), 101);
        assert_eq!(retired(&plan), ["vm-0-1", "vm-2-1"]);
        assert_eq!(plan.create, [0, 2]);
        let rollout = plan.rollout.expect("the rollout's message changed");
        assert_eq!(
            (rollout.state, rollout.domain),
            (RolloutState::InProgress, 0)
        );
        assert!(rollout.message.contains("0 of 2"), "{}", rollout.message);

        // The new ones start: still domain 0, nothing more retired.
        let fleet = Fleet::new(&[(0, 2), (1, 1), (2, 2), (3, 1)]);
        let mut instances = fleet.all(InstanceHealth::Healthy);
        instances[0].health = InstanceHealth::Starting;
        let plan = plan_role(&role, &instances, 102);
        assert!(plan.retire.is_empty() && plan.create.is_empty());
        assert_eq!(plan.rollout.as_ref().map(|r| r.domain), Some(0));

        // Both healthy: domain 1 (slots 1 and 3) goes.
        let plan = plan_role(&role, &fleet.all(InstanceHealth::Healthy), 103);
        assert_eq!(retired(&plan), ["vm-1-1", "vm-3-1"]);
        assert_eq!(plan.create, [1, 3]);
        assert_eq!(plan.rollout.as_ref().map(|r| r.domain), Some(1));

        // All at revision 2 and healthy: done.
        let fleet = Fleet::new(&[(0, 2), (1, 2), (2, 2), (3, 2)]);
        let plan = plan_role(&role, &fleet.all(InstanceHealth::Healthy), 104);
        let rollout = plan.rollout.expect("done");
        assert_eq!(rollout.state, RolloutState::Done);
        assert_eq!(rollout.ended_at, Some(104));
        assert!(plan.retire.is_empty() && plan.create.is_empty());
    }

    #[test]
    fn a_failing_domain_stops_the_rollout_and_its_instances_are_kept() {
        let role = upgraded(4, 2);
        let fleet = Fleet::new(&[(0, 2), (1, 1), (2, 2), (3, 1)]);
        let mut instances = fleet.all(InstanceHealth::Healthy);
        instances[2].health = InstanceHealth::Unhealthy;
        let plan = plan_role(&role, &instances, 105);
        let rollout = plan.rollout.clone().expect("failed");
        assert_eq!((rollout.state, rollout.domain), (RolloutState::Failed, 0));
        assert!(rollout.message.contains("web-2-r2"), "{}", rollout.message);
        // Not replaced (it would fail again), and domain 1 untouched.
        assert!(plan.retire.is_empty() && plan.create.is_empty(), "{plan:?}");

        // Once failed, the next pass changes nothing.
        let mut failed = role.clone();
        failed.rollout = Some(rollout);
        assert_eq!(plan_role(&failed, &instances, 106), RolePlan::default());
        // But an old instance that fails is still replaced.
        instances[1].health = InstanceHealth::Unhealthy;
        let plan = plan_role(&failed, &instances, 107);
        assert_eq!(retired(&plan), ["vm-1-1"]);
        assert_eq!(plan.create, [1]);
    }

    #[test]
    fn a_rollback_replaces_only_the_instances_of_the_bad_revision() {
        // Back to revision 1 after a failed revision 2.
        let mut role = role(4, 2, 1);
        role.rollout = Some(start_rollout(&role, 2, true, 200));
        let fleet = Fleet::new(&[(0, 2), (1, 1), (2, 2), (3, 1)]);
        let mut instances = fleet.all(InstanceHealth::Healthy);
        instances[0].health = InstanceHealth::Unhealthy;
        let plan = plan_role(&role, &instances, 201);
        // Domain 0's instances of revision 2 go; domain 1 is at revision 1.
        assert_eq!(retired(&plan), ["vm-0-2", "vm-2-2"]);
        assert_eq!(plan.create, [0, 2]);
        let fleet = Fleet::new(&[(0, 1), (1, 1), (2, 1), (3, 1)]);
        let plan = plan_role(&role, &fleet.all(InstanceHealth::Healthy), 202);
        assert_eq!(plan.rollout.map(|r| r.state), Some(RolloutState::Done));
        assert!(plan.retire.is_empty() && plan.create.is_empty());
    }

    #[test]
    fn more_domains_than_instances_skip_the_empty_ones() {
        let role = upgraded(1, 5);
        let fleet = Fleet::new(&[(0, 2)]);
        let plan = plan_role(&role, &fleet.all(InstanceHealth::Healthy), 300);
        assert_eq!(plan.rollout.map(|r| r.state), Some(RolloutState::Done));
        let empty = upgraded(0, 3);
        let plan = plan_role(&empty, &[], 300);
        assert_eq!(plan.rollout.map(|r| r.state), Some(RolloutState::Done));
    }

    #[test]
    fn health_follows_the_state_and_the_probe() {
        use InstanceHealth::*;
        assert_eq!(health(VmState::Running, None, false), Healthy);
        assert_eq!(health(VmState::Running, None, true), Starting);
        assert_eq!(health(VmState::Running, Some(Unhealthy), true), Unhealthy);
        assert_eq!(health(VmState::Stopped, Some(Healthy), true), Unhealthy);
        assert_eq!(health(VmState::Failed, None, false), Unhealthy);
        assert_eq!(health(VmState::Pending, None, false), Starting);
        assert_eq!(health(VmState::Paused, Some(Healthy), true), Starting);
    }
}
