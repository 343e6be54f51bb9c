//! Per-vCPU CPUID: KVM's supported set, with the topology (APIC id, logical
//! processor count, x2APIC topology leaves) each vCPU must report, the
//! hypervisor bit set, the PMU hidden, and on `kvm_pvm` hosts the features
//! that KVM's instruction emulator cannot run hidden too.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use crate::platform::KvmFlavor;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXTENDED_FEATURES: u32 = 0x7;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

// KVM paravirtual features (leaf 0x4000_0001 EAX) that are hypercalls. On
// kvm_pvm hosts a guest hypercall does not return (measured: a 2-vCPU Linux
// hangs in kvm_hypercall4(KVM_HC_SEND_IPI) while bringing up CPU 1).
const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;

// Leaf 1 ECX.
const ECX_PCID: u32 = 1 << 17;
const ECX_CX16: u32 = 1 << 13;
const ECX_MOVBE: u32 = 1 << 22;
const ECX_POPCNT: u32 = 1 << 23;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_RDRAND: u32 = 1 << 30;
const ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 1 EDX.
const EDX_HTT: u32 = 1 << 28;
// Leaf 7 subleaf 0 EBX.
const EBX7_FSGSBASE: u32 = 1 << 0;
const EBX7_AVX2: u32 = 1 << 5;
const EBX7_INVPCID: u32 = 1 << 10;
const EBX7_RDSEED: u32 = 1 << 18;
const EBX7_SMAP: u32 = 1 << 20;
const EBX7_AVX512F: u32 = 1 << 16;
// Leaf 7 subleaf 0 ECX.
const ECX7_PKU: u32 = 1 << 3;
const ECX7_OSPKE: u32 = 1 << 4;
const ECX7_RDPID: u32 = 1 << 22;

/// Where a vCPU sits in the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuTopology {
    pub index: u32,
    pub count: u32,
}

impl VcpuTopology {
    /// APIC ids equal vCPU indices.
    pub fn apic_id(&self) -> u32 {
        self.index
    }
}

/// Bits needed to number `count` logical processors.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Rewrites `entries` for one vCPU.
pub fn filter_entries(
    entries: &mut [kvm_cpuid_entry2],
    topology: VcpuTopology,
    flavor: KvmFlavor,
    tsc_deadline: bool,
) {
    let apic_id = topology.apic_id();
    let count = topology.count;
    for entry in entries.iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX: APIC id, logical processors per package, CLFLUSH size (8 * 8 bytes).
                entry.ebx = (apic_id << 24) | ((count & 0xff) << 16) | (8 << 8);
                entry.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    entry.ecx |= ECX_TSC_DEADLINE;
                } else {
                    entry.ecx &= !ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
                if flavor == KvmFlavor::Pvm {
                    entry.ecx &= !(ECX_PCID
                        | ECX_CX16
                        | ECX_MOVBE
                        | ECX_POPCNT
                        | ECX_XSAVE
                        | ECX_OSXSAVE
                        | ECX_AVX
                        | ECX_RDRAND);
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1. One core per vCPU.
                entry.eax = (entry.eax & 0x03ff_ffff) | ((count.saturating_sub(1) & 0x3f) << 26);
            }
            LEAF_EXTENDED_FEATURES if entry.index == 0 && flavor == KvmFlavor::Pvm => {
                entry.ebx &= !(EBX7_FSGSBASE
                    | EBX7_AVX2
                    | EBX7_INVPCID
                    | EBX7_RDSEED
                    | EBX7_SMAP
                    | EBX7_AVX512F);
                entry.ecx &= !(ECX7_PKU | ECX7_OSPKE | ECX7_RDPID);
            }
            LEAF_KVM_FEATURES if flavor == KvmFlavor::Pvm => {
                entry.eax &=
                    !(KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD);
            }
            LEAF_PMU => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_XSAVE if flavor == KvmFlavor::Pvm => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                entry.edx = apic_id;
                match entry.index {
                    // SMT level: one thread per core.
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = (1 << 8) | entry.index;
                    }
                    // Core level: every vCPU is a core of one package.
                    1 => {
                        entry.eax = id_bits(count);
                        entry.ebx = count;
                        entry.ecx = (2 << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            _ => {}
        }
    }
}

/// Applies [`filter_entries`] to a whole CPUID set.
pub fn filter_cpuid(
    cpuid: &mut CpuId,
    topology: VcpuTopology,
    flavor: KvmFlavor,
    tsc_deadline: bool,
) {
    filter_entries(cpuid.as_mut_slice(), topology, flavor, tsc_deadline);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn sample() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(1, 0),
            entry(4, 0),
            entry(7, 0),
            entry(0xa, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0xd, 0),
            entry(LEAF_KVM_FEATURES, 0),
        ]
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn apic_ids_and_counts() {
        for index in 0..4 {
            let mut entries = sample();
            let topology = VcpuTopology { index, count: 4 };
            filter_entries(&mut entries, topology, KvmFlavor::Hardware, true);
            let leaf1 = find(&entries, 1, 0);
            assert_eq!(leaf1.ebx >> 24, index);
            assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
            assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
            assert_ne!(leaf1.edx & EDX_HTT, 0);
            assert_eq!(find(&entries, 4, 0).eax >> 26, 3);
            let core = find(&entries, 0xb, 1);
            assert_eq!(core.ebx, 4);
            assert_eq!(core.eax, 2);
            assert_eq!(core.edx, index);
            assert_eq!((core.ecx >> 8) & 0xff, 2);
            let smt = find(&entries, 0xb, 0);
            assert_eq!(smt.ebx, 1);
            assert_eq!((smt.ecx >> 8) & 0xff, 1);
            assert_eq!((find(&entries, 0xb, 2).ecx >> 8) & 0xff, 0);
        }
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut entries = sample();
        filter_entries(
            &mut entries,
            VcpuTopology { index: 0, count: 1 },
            KvmFlavor::Hardware,
            false,
        );
        let leaf1 = find(&entries, 1, 0);
        assert_eq!(leaf1.edx & EDX_HTT, 0);
        assert_eq!(leaf1.ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(find(&entries, 0xb, 1).eax, 0);
    }

    #[test]
    fn pmu_is_hidden() {
        let mut entries = sample();
        filter_entries(
            &mut entries,
            VcpuTopology { index: 0, count: 1 },
            KvmFlavor::Hardware,
            false,
        );
        let pmu = find(&entries, 0xa, 0);
        assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
    }

    #[test]
    fn pvm_hides_unemulatable_features_and_hardware_keeps_them() {
        let mut pvm = sample();
        let topology = VcpuTopology { index: 0, count: 1 };
        filter_entries(&mut pvm, topology, KvmFlavor::Pvm, false);
        let leaf1 = find(&pvm, 1, 0);
        for bit in [
            ECX_CX16, ECX_XSAVE, ECX_POPCNT, ECX_RDRAND, ECX_MOVBE, ECX_PCID,
        ] {
            assert_eq!(leaf1.ecx & bit, 0, "bit {bit:#x}");
        }
        let leaf7 = find(&pvm, 7, 0);
        assert_eq!(
            leaf7.ebx & (EBX7_SMAP | EBX7_RDSEED | EBX7_FSGSBASE | EBX7_INVPCID),
            0
        );
        assert_eq!(leaf7.ecx & (ECX7_PKU | ECX7_RDPID), 0);
        assert_eq!(find(&pvm, 0xd, 0).eax, 0);
        let kvm = find(&pvm, LEAF_KVM_FEATURES, 0).eax;
        assert_eq!(kvm & (KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_UNHALT), 0);

        let mut hw = sample();
        filter_entries(&mut hw, topology, KvmFlavor::Hardware, false);
        assert_ne!(find(&hw, 1, 0).ecx & ECX_XSAVE, 0);
        assert_ne!(find(&hw, 7, 0).ebx & EBX7_SMAP, 0);
        assert_ne!(
            find(&hw, LEAF_KVM_FEATURES, 0).eax & KVM_FEATURE_PV_SEND_IPI,
            0
        );
    }

    #[test]
    fn id_bits_counts() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
        assert_eq!(id_bits(254), 8);
    }
}
