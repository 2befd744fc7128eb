//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016), built in userspace.
//!
//! The table is a pure function of the backend set: backends are sorted by address and
//! each backend's permutation comes from a fixed hash of its address, so two balancers
//! (or one balancer after a restart) with the same set build byte-identical tables and
//! pick the same backend for every flow, whatever order the backends were added in.
//!
//! Weights: every round each backend earns `weight` credit and claims its next preferred
//! free slot once its credit reaches the largest weight. A backend of weight w therefore
//! claims w/max_w of the rounds, and its share of the table is proportional to w. With
//! equal weights this is exactly the paper's round-robin population. Weight 0 (drained)
//! backends claim nothing.

use crate::{NO_BACKEND, TableEntry, hash_words};
use std::vec;
use std::vec::Vec;

/// Seeds of the two permutation hashes (offset and skip). Fixed forever: changing them
/// moves every flow on every balancer.
const SEED_OFFSET: u32 = 0x6d61_676c; // "magl"
const SEED_SKIP: u32 = 0x6576_3121; // "ev1!"

/// One backend as the builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// 16-byte address (IPv4-mapped for IPv4): the sort key and the permutation seed.
    pub addr: [u8; 16],
    pub weight: u32,
    /// What the table stores for this backend (the datapath's backend id).
    pub id: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaglevError {
    /// M must be a prime >= 3 (the permutation needs every skip to be coprime to M).
    NotPrime(u32),
    /// Two backends with the same address in one service.
    DuplicateBackend([u8; 16]),
}

impl core::fmt::Display for MaglevError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MaglevError::NotPrime(m) => write!(f, "table size {m} is not a prime >= 3"),
            MaglevError::DuplicateBackend(a) => write!(f, "duplicate backend address {a:02x?}"),
        }
    }
}

impl std::error::Error for MaglevError {}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = n as u64;
    let mut d = 2u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

fn addr_words(a: &[u8; 16]) -> [u32; 4] {
    core::array::from_fn(|i| u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]]))
}

/// The Maglev pick, as the datapath makes it for a flow without a flow-table entry:
/// `table[flow_hash(key) % M]` (a backend id, or `NO_BACKEND`). The one predictor of
/// "which backend" outside the datapath: the control plane's tests, the fixtures and the
/// e2e tests call this (or [`predict`]) instead of indexing a table themselves.
pub fn pick(table: &[u32], key: &crate::FlowKey) -> u32 {
    table[slot(key, table.len() as u32)]
}

/// The position [`pick`] reads in a table of `m` entries.
pub fn slot(key: &crate::FlowKey, m: u32) -> usize {
    (crate::flow_hash(key) % m) as usize
}

/// [`pick`] on the table of `backends` with `m` entries.
pub fn predict(backends: &[MaglevBackend], m: u32, key: &crate::FlowKey) -> Result<u32, MaglevError> {
    Ok(pick(&build(backends, m)?, key))
}

/// Builds a table of `m` entries holding backend ids. Every entry is `NO_BACKEND` when
/// no backend has a non-zero weight.
pub fn build(backends: &[MaglevBackend], m: u32) -> Result<Vec<u32>, MaglevError> {
    build_seeded(backends, m, SEED_OFFSET, SEED_SKIP)
}

/// Seed of the per-slot hash that picks secondaries (`build_pairs`).
const SEED_SECONDARY: u32 = 0x7365_636f; // "seco"

/// The (primary, secondary) pair of every slot, for second-chance delivery (issue 15):
/// `primary` is exactly [`build`]`(backends)`, so shares and collateral are Maglev's.
/// `former` are backends that take no new flows but may still hold connections:
/// drained (weight 0 in `backends`) or removed, each with its weight before it left.
///
/// The secondary of a slot is where the slot's flows went before: the owner of the
/// slot in the table of the live backends plus `former`, when that differs from the
/// primary (so a drained or removed backend is the secondary of every slot it was
/// primary of, and a slot moved as collateral keeps its old owner as secondary).
/// Otherwise it is another live backend drawn by a hash of the slot, with probability
/// proportional to its weight: a backend's second chances spread over all the others
/// by weight. (A second Maglev table with other seeds does not: a backend's primary
/// slots and another's slots in it are two arithmetic progressions mod M, which for
/// some pairs overlap several times more than their share, or never.) Every secondary
/// differs from its primary while two backends are known; `NO_BACKEND` otherwise. A
/// pure function of the two sets, like `build`.
pub fn build_pairs(backends: &[MaglevBackend], former: &[MaglevBackend], m: u32) -> Result<(Vec<u32>, Vec<u32>), MaglevError> {
    let mut before: Vec<MaglevBackend> = backends.iter().copied().filter(|b| b.weight > 0).collect();
    before.extend(former.iter().copied().filter(|b| b.weight > 0));
    // A former backend that is also live is a caller's mistake: refuse it as a duplicate.
    build(&before, m)?;
    build_pairs_since(backends, &before, m)
}

/// The pairs of `backends` after a change from the set `before` (each backend with its
/// weight and id then): the secondary of a slot is its owner in `before`'s table when
/// that differs from its new primary, so every connection made under `before` finds
/// its backend within the slot's pair, whatever the change (removals, drains,
/// additions, weights, several at once); other slots draw a secondary as
/// [`build_pairs`] says. `before` = the live set plus the gone backends is
/// `build_pairs`. Every backend of `before` must stay reachable as a hop (the control
/// plane keeps removed ones as hops while a change window is open).
pub fn build_pairs_since(backends: &[MaglevBackend], before: &[MaglevBackend], m: u32) -> Result<(Vec<u32>, Vec<u32>), MaglevError> {
    let primary = build(backends, m)?;
    let mut live: Vec<MaglevBackend> = backends.iter().copied().filter(|b| b.weight > 0).collect();
    live.sort_by_key(|b| b.addr);
    let previous = build(before, m)?;
    // cum[k] = total weight of live[..=k].
    let cum: Vec<u64> = live
        .iter()
        .scan(0u64, |t, b| {
            *t += b.weight as u64;
            Some(*t)
        })
        .collect();
    let total = cum.last().copied().unwrap_or(0);
    let secondary = (0..m as usize)
        .map(|i| {
            let p = primary[i];
            if previous[i] != p && previous[i] != NO_BACKEND {
                return previous[i];
            }
            let Some(at) = live.iter().position(|b| b.id == p) else { return NO_BACKEND };
            let w = live[at].weight as u64;
            if live.len() < 2 {
                return NO_BACKEND;
            }
            // A point in the other backends' total weight, skipping the primary's range.
            let mut r = hash_words(&[i as u32, p], SEED_SECONDARY) as u64 % (total - w);
            if r >= cum[at] - w {
                r += w;
            }
            live[cum.partition_point(|&c| c <= r)].id
        })
        .collect();
    Ok((primary, secondary))
}

/// [`build_pairs_since`] as the datapath's `TABLES` entries.
pub fn build_entries(backends: &[MaglevBackend], before: &[MaglevBackend], m: u32) -> Result<Vec<TableEntry>, MaglevError> {
    let (p, s) = build_pairs_since(backends, before, m)?;
    Ok(p.into_iter().zip(s).map(|(primary, secondary)| TableEntry { primary, secondary }).collect())
}

/// The pair the datapath reads for a flow without a flow-table entry (or any TCP flow of
/// a `flow_table = "off"` service): `table[flow_hash(key) % M]`. The pair's `primary` is
/// [`pick`]'s backend; `secondary` the hop a gue packet carries.
pub fn pick_pair(table: &[TableEntry], key: &crate::FlowKey) -> TableEntry {
    table[slot(key, table.len() as u32)]
}

/// [`pick_pair`] on the entries of `backends` after a change from `before`.
pub fn predict_pair(backends: &[MaglevBackend], before: &[MaglevBackend], m: u32, key: &crate::FlowKey) -> Result<TableEntry, MaglevError> {
    Ok(pick_pair(&build_entries(backends, before, m)?, key))
}

fn build_seeded(backends: &[MaglevBackend], m: u32, seed_offset: u32, seed_skip: u32) -> Result<Vec<u32>, MaglevError> {
    if m < 3 || !is_prime(m) {
        return Err(MaglevError::NotPrime(m));
    }
    let mut sorted: Vec<MaglevBackend> = backends.to_vec();
    sorted.sort_by_key(|b| b.addr);
    for w in sorted.windows(2) {
        if w[0].addr == w[1].addr {
            return Err(MaglevError::DuplicateBackend(w[0].addr));
        }
    }
    sorted.retain(|b| b.weight > 0);
    let mut table = vec![NO_BACKEND; m as usize];
    if sorted.is_empty() {
        return Ok(table);
    }
    let m64 = m as u64;
    // (offset, skip, next) per backend: the j-th preference is (offset + j*skip) mod M.
    let mut perm: Vec<(u64, u64, u64)> = sorted
        .iter()
        .map(|b| {
            let w = addr_words(&b.addr);
            let offset = hash_words(&w, seed_offset) as u64 % m64;
            let skip = hash_words(&w, seed_skip) as u64 % (m64 - 1) + 1;
            (offset, skip, 0)
        })
        .collect();
    let max_w = sorted.iter().map(|b| b.weight as u64).max().unwrap_or(1);
    let mut credit = vec![0u64; sorted.len()];
    let mut filled = 0u32;
    // Each round fills at least one slot (the heaviest backend always claims), so this
    // ends after at most M rounds.
    'rounds: loop {
        for (i, b) in sorted.iter().enumerate() {
            credit[i] += b.weight as u64;
            if credit[i] < max_w {
                continue;
            }
            credit[i] -= max_w;
            let (offset, skip, next) = &mut perm[i];
            let slot = loop {
                let c = ((*offset + *next * *skip) % m64) as usize;
                *next += 1;
                if table[c] == NO_BACKEND {
                    break c;
                }
            };
            table[slot] = b.id;
            filled += 1;
            if filled == m {
                break 'rounds;
            }
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn backend(i: u32, weight: u32) -> MaglevBackend {
        // 10.1.x.y, IPv4-mapped: distinct, realistic addresses.
        let a = crate::v4_mapped_bytes([10, 1, (i >> 8) as u8, i as u8]);
        MaglevBackend { addr: a, weight, id: i }
    }

    fn shares(table: &[u32]) -> HashMap<u32, usize> {
        let mut h = HashMap::new();
        for &id in table {
            *h.entry(id).or_default() += 1;
        }
        h
    }

    #[test]
    fn rejects_non_prime_and_duplicates() {
        assert_eq!(build(&[backend(1, 1)], 65536), Err(MaglevError::NotPrime(65536)));
        assert_eq!(build(&[backend(1, 1)], 1), Err(MaglevError::NotPrime(1)));
        let dup = [backend(1, 1), MaglevBackend { id: 9, ..backend(1, 1) }];
        assert!(matches!(build(&dup, 251), Err(MaglevError::DuplicateBackend(_))));
    }

    #[test]
    fn empty_or_all_drained_gives_no_backend() {
        assert!(build(&[], 251).unwrap().iter().all(|&x| x == NO_BACKEND));
        let t = build(&[backend(1, 0), backend(2, 0)], 251).unwrap();
        assert!(t.iter().all(|&x| x == NO_BACKEND));
    }

    #[test]
    fn equal_weights_distribute_within_one_percent() {
        let m = 65537;
        for n in [1u32, 2, 3, 7, 10, 33, 64, 99, 100] {
            let bs: Vec<_> = (0..n).map(|i| backend(i, 100)).collect();
            let t = build(&bs, m).unwrap();
            assert!(t.iter().all(|&x| x < n));
            let s = shares(&t);
            assert_eq!(s.len(), n as usize, "every backend gets slots (n={n})");
            let avg = m as f64 / n as f64;
            let max = *s.values().max().unwrap() as f64;
            assert!(max <= 1.01 * avg, "n={n}: max {max} > 1.01 x avg {avg}");
        }
    }

    #[test]
    fn shares_follow_weights() {
        let m = 65537;
        let weights = [100u32, 50, 25, 200, 1, 100, 75];
        let bs: Vec<_> = weights.iter().enumerate().map(|(i, &w)| backend(i as u32, w)).collect();
        let t = build(&bs, m).unwrap();
        let s = shares(&t);
        let total_w: u32 = weights.iter().sum();
        for (i, &w) in weights.iter().enumerate() {
            let expect = m as f64 * w as f64 / total_w as f64;
            let got = *s.get(&(i as u32)).unwrap_or(&0) as f64;
            // Within 2% of the ideal share, or 2 slots for tiny shares.
            assert!((got - expect).abs() <= (0.02 * expect).max(2.0), "backend {i} weight {w}: got {got}, expected {expect:.1}");
        }
        // A drained backend (weight 0) gets nothing; the rest still cover the table.
        let mut bs2 = bs.clone();
        bs2[3].weight = 0;
        let t2 = build(&bs2, m).unwrap();
        assert!(!t2.contains(&3));
        assert!(!t2.contains(&NO_BACKEND));
    }

    #[test]
    fn removing_one_backend_moves_its_flows_and_under_one_percent_more() {
        let m = 65537u32;
        for n in [5u32, 10, 50, 100] {
            let bs: Vec<_> = (0..n).map(|i| backend(i, 1)).collect();
            let before = build(&bs, m).unwrap();
            for removed in [0, n / 2, n - 1] {
                let rest: Vec<_> = bs.iter().copied().filter(|b| b.id != removed).collect();
                let after = build(&rest, m).unwrap();
                let mut collateral = 0usize;
                for (b, a) in before.iter().zip(&after) {
                    if *b == removed {
                        assert_ne!(*a, removed);
                    } else if a != b {
                        collateral += 1;
                    }
                }
                let frac = collateral as f64 / m as f64;
                assert!(frac < 0.01, "n={n} removed={removed}: collateral {:.3}%", frac * 100.0);
            }
        }
    }

    #[test]
    fn deterministic_and_independent_of_insertion_order() {
        let bs: Vec<_> = (0..37).map(|i| backend(i, 1 + i % 5)).collect();
        let a = build(&bs, 65537).unwrap();
        let mut rev = bs.clone();
        rev.reverse();
        let mut shuffled = bs.clone();
        shuffled.rotate_left(11);
        shuffled.swap(3, 20);
        assert_eq!(a, build(&rev, 65537).unwrap());
        assert_eq!(a, build(&shuffled, 65537).unwrap());
        assert_eq!(a, build(&bs, 65537).unwrap());
        // Pin the output: the table must be byte-identical on any machine and any
        // release, or two balancers would disagree. A change here is a flow-moving
        // change and must be deliberate.
        let small = build(&bs[..5], 251).unwrap();
        let digest = crate::hash_words(&core::array::from_fn::<u32, 251, _>(|i| small[i]), 0);
        assert_eq!(digest, GOLDEN_DIGEST_251, "Maglev output changed");
    }

    /// Counts of `f(slot)` over the slots where `keep(slot)`.
    fn count_where(n: usize, keep: impl Fn(usize) -> bool, f: impl Fn(usize) -> u32) -> HashMap<u32, usize> {
        let mut h = HashMap::new();
        for i in (0..n).filter(|&i| keep(i)) {
            *h.entry(f(i)).or_default() += 1;
        }
        h
    }

    #[test]
    fn pairs_keep_maglev_primaries_and_spread_distinct_secondaries() {
        let m = 65537u32;
        for n in [2u32, 3, 10, 50] {
            let bs: Vec<_> = (0..n).map(|i| backend(i, 1)).collect();
            let (p, s) = build_pairs(&bs, &[], m).unwrap();
            assert_eq!(p, build(&bs, m).unwrap(), "primaries are the Maglev table");
            assert!(p.iter().zip(&s).all(|(a, b)| a != b && *b < n), "n={n}: a secondary equal to its primary or missing");
            // Secondaries are balanced: each backend is the secondary of about 1/n of
            // the slots. A hash draw per slot spreads binomially (3 standard
            // deviations are 8% at n=50), so within 12%, not Maglev's 1%.
            let avg = m as f64 / n as f64;
            for (id, c) in shares(&s) {
                assert!((c as f64 - avg).abs() <= 0.12 * avg, "n={n}: backend {id} secondary of {c} slots, avg {avg:.0}");
            }
            // A backend's second chances fall on all the others, none takes more than
            // twice its fair part of them.
            for id in 0..n {
                let of = count_where(m as usize, |i| p[i] == id, |i| s[i]);
                let fair = *shares(&p).get(&id).unwrap() as f64 / (n - 1) as f64;
                assert_eq!(of.len(), (n - 1) as usize, "n={n}: backend {id}: {of:?}");
                assert!(of.values().all(|&c| c as f64 <= 2.0 * fair), "n={n}: backend {id}: {of:?}");
            }
        }
        // Second chances follow weight: backend 0's go 1 : 8 to backends 1 and 2.
        let (p, s) = build_pairs(&[backend(0, 1), backend(1, 1), backend(2, 8)], &[], m).unwrap();
        let of0 = count_where(m as usize, |i| p[i] == 0, |i| s[i]);
        let ratio = of0[&2] as f64 / of0[&1] as f64;
        assert!((6.5..9.5).contains(&ratio), "weight 8 vs 1: {of0:?}");
        let one = build_pairs(&[backend(1, 1)], &[], 251).unwrap();
        assert!(one.1.iter().all(|&x| x == NO_BACKEND), "one backend: no second chance");
    }

    #[test]
    fn a_drained_or_removed_backend_is_the_secondary_of_its_former_slots() {
        let m = 65537u32;
        for n in [5u32, 10, 50] {
            let bs: Vec<_> = (0..n).map(|i| backend(i, 1)).collect();
            let (before, _) = build_pairs(&bs, &[], m).unwrap();
            let gone = n / 2;
            let drained: Vec<_> = bs.iter().map(|b| if b.id == gone { MaglevBackend { weight: 0, ..*b } } else { *b }).collect();
            let removed: Vec<_> = bs.iter().copied().filter(|b| b.id != gone).collect();
            let former = [backend(gone, 1)];
            let (pd, sd) = build_pairs(&drained, &former, m).unwrap();
            let (pr, sr) = build_pairs(&removed, &former, m).unwrap();
            assert_eq!((&pd, &sd), (&pr, &sr), "drained and removed give the same pairs");
            assert_eq!(pd, build(&removed, m).unwrap());
            let mut collateral = 0usize;
            for i in 0..m as usize {
                if before[i] == gone {
                    assert_ne!(pd[i], gone);
                    assert_eq!(sd[i], gone, "n={n} slot {i}: the old primary is the secondary");
                } else {
                    assert_ne!(sd[i], gone, "n={n} slot {i}: the gone backend is secondary only where it was primary");
                    if pd[i] != before[i] {
                        // Collateral: the slot's old owner is its secondary.
                        assert_eq!(sd[i], before[i]);
                        collateral += 1;
                    }
                }
            }
            assert!((collateral as f64) < 0.01 * m as f64, "n={n}: collateral {collateral}");
            // Forgotten (no longer former): the pairs of the remaining set alone.
            assert_eq!(build_pairs(&removed, &[], m).unwrap().0, pd);
        }
        // Deterministic and independent of order.
        let bs: Vec<_> = (0..20).map(|i| backend(i, 1 + i % 3)).collect();
        let mut rev = bs.clone();
        rev.reverse();
        assert_eq!(build_pairs(&bs, &[backend(99, 2)], 251).unwrap(), build_pairs(&rev, &[backend(99, 2)], 251).unwrap());
        assert!(matches!(build_pairs(&bs, &[backend(3, 1)], 251), Err(MaglevError::DuplicateBackend(_))));
    }

    #[test]
    fn a_change_window_keeps_every_old_owner_as_secondary() {
        // Removed, then another added, in one window: every slot whose owner changed
        // has its owner under `before` as secondary.
        let m = 65537u32;
        let bs: Vec<_> = (0..10).map(|i| backend(i, 1)).collect();
        let before = build(&bs, m).unwrap();
        let mut after: Vec<_> = bs.iter().copied().filter(|b| b.id != 4).collect();
        after.push(backend(10, 1));
        let entries = build_entries(&after, &bs, m).unwrap();
        assert_eq!(entries.iter().map(|e| e.primary).collect::<Vec<_>>(), build(&after, m).unwrap());
        let mut moved = 0;
        for (i, e) in entries.iter().enumerate() {
            assert_ne!(e.primary, e.secondary);
            if e.primary != before[i] {
                assert_eq!(e.secondary, before[i], "slot {i}");
                moved += 1;
            }
        }
        // 1/10 removed plus about 1/10 taken by the new one.
        assert!((0.15..0.25).contains(&(moved as f64 / m as f64)), "{moved}");
        let k = crate::FlowKey::new("192.0.2.1".parse().unwrap(), 1234, "10.0.0.100".parse().unwrap(), 80, crate::PROTO_TCP);
        assert_eq!(predict_pair(&after, &bs, m, &k).unwrap(), entries[slot(&k, m)]);
        assert_eq!(predict_pair(&after, &bs, m, &k).unwrap().primary, predict(&after, m, &k).unwrap());
    }

    /// Digest of the 5-backend, M=251 table in the test above (recorded once).
    const GOLDEN_DIGEST_251: u32 = 3681931412;
}
