//! Which range watchers contain a key, without looking at every watcher.
//!
//! The key space is cut at every range endpoint into elementary segments; each segment
//! stores the set of ranges covering it. A lookup is one ordered-map search
//! (`O(log segments)`); adding or removing a range touches the segments it spans.
//! Disjoint or nested prefix watches (the common case) span few segments each.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;

/// The end of a key range: exclusive, or unbounded (etcd's `range_end = "\0"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum End {
    Before(Vec<u8>),
    Unbounded,
}

/// Sets of ids keyed by half-open key ranges.
#[derive(Debug, Default)]
pub struct IntervalMap {
    /// Segment start -> ids covering `[start, next start)`.
    segments: BTreeMap<Vec<u8>, HashSet<u64>>,
}

impl IntervalMap {
    /// The set in force at `key` (that of the segment starting at or before it).
    fn set_at(&self, key: &[u8]) -> Option<&HashSet<u64>> {
        self.segments
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .map(|(_, s)| s)
    }

    /// Makes `at` a segment boundary.
    fn split(&mut self, at: &[u8]) {
        if self.segments.contains_key(at) {
            return;
        }
        let set = self.set_at(at).cloned().unwrap_or_default();
        self.segments.insert(at.to_vec(), set);
    }

    fn span<'a>(
        &'a mut self,
        start: &'a [u8],
        end: &'a End,
    ) -> impl Iterator<Item = (&'a Vec<u8>, &'a mut HashSet<u64>)> {
        let upper = match end {
            End::Before(e) => Bound::Excluded(e.as_slice()),
            End::Unbounded => Bound::Unbounded,
        };
        self.segments
            .range_mut::<[u8], _>((Bound::Included(start), upper))
    }

    pub fn insert(&mut self, start: &[u8], end: &End, id: u64) {
        self.split(start);
        if let End::Before(e) = end {
            self.split(e);
        }
        for (_, set) in self.span(start, end) {
            set.insert(id);
        }
    }

    pub fn remove(&mut self, start: &[u8], end: &End, id: u64) {
        for (_, set) in self.span(start, end) {
            set.remove(&id);
        }
        self.merge(start);
        if let End::Before(e) = end {
            self.merge(e);
        }
    }

    /// Drops the boundary at `at` if it no longer separates different sets.
    fn merge(&mut self, at: &[u8]) {
        let Some(set) = self.segments.get(at) else {
            return;
        };
        let before = self
            .segments
            .range::<[u8], _>((Bound::Unbounded, Bound::Excluded(at)))
            .next_back()
            .map(|(_, s)| s);
        let redundant = match before {
            Some(b) => b == set,
            None => set.is_empty(),
        };
        if redundant {
            self.segments.remove(at);
        }
    }

    /// Every id whose range contains `key`.
    pub fn stab(&self, key: &[u8]) -> impl Iterator<Item = u64> + '_ {
        self.set_at(key).into_iter().flatten().copied()
    }

    #[cfg(test)]
    fn segments(&self) -> usize {
        self.segments.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(m: &IntervalMap, k: &str) -> Vec<u64> {
        let mut v: Vec<u64> = m.stab(k.as_bytes()).collect();
        v.sort();
        v
    }

    fn before(s: &str) -> End {
        End::Before(s.as_bytes().to_vec())
    }

    #[test]
    fn overlapping_nested_and_unbounded_ranges() {
        let mut m = IntervalMap::default();
        m.insert(b"b", &before("f"), 1);
        m.insert(b"d", &before("h"), 2);
        m.insert(b"c", &before("d"), 3);
        m.insert(b"g", &End::Unbounded, 4);
        assert_eq!(ids(&m, "a"), Vec::<u64>::new());
        assert_eq!(ids(&m, "b"), vec![1]);
        assert_eq!(ids(&m, "c"), vec![1, 3]);
        assert_eq!(ids(&m, "cz"), vec![1, 3]);
        assert_eq!(ids(&m, "d"), vec![1, 2]);
        assert_eq!(ids(&m, "f"), vec![2]);
        assert_eq!(ids(&m, "g"), vec![2, 4]);
        assert_eq!(ids(&m, "h"), vec![4]);
        assert_eq!(ids(&m, "zzzz"), vec![4]);
    }

    #[test]
    fn removal_restores_and_compacts_segments() {
        let mut m = IntervalMap::default();
        m.insert(b"b", &before("f"), 1);
        m.insert(b"d", &before("h"), 2);
        m.insert(b"a", &End::Unbounded, 3);
        m.remove(b"d", &before("h"), 2);
        assert_eq!(ids(&m, "e"), vec![1, 3]);
        assert_eq!(ids(&m, "g"), vec![3]);
        m.remove(b"b", &before("f"), 1);
        assert_eq!(ids(&m, "c"), vec![3]);
        m.remove(b"a", &End::Unbounded, 3);
        assert_eq!(ids(&m, "c"), Vec::<u64>::new());
        assert_eq!(
            m.segments(),
            0,
            "no boundaries left once every range is gone"
        );
    }

    #[test]
    fn matches_a_brute_force_model() {
        // Deterministic pseudo-random ranges over a small alphabet.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut m = IntervalMap::default();
        let mut live: Vec<(Vec<u8>, End, u64)> = Vec::new();
        for id in 0..400u64 {
            if next() % 3 == 0 && !live.is_empty() {
                let i = (next() % live.len() as u64) as usize;
                let (s, e, id) = live.swap_remove(i);
                m.remove(&s, &e, id);
            } else {
                let a = (next() % 20) as u8;
                let b = a + 1 + (next() % 6) as u8;
                let end = if next() % 7 == 0 {
                    End::Unbounded
                } else {
                    End::Before(vec![b])
                };
                m.insert(&[a], &end, id);
                live.push((vec![a], end, id));
            }
            for k in 0..30u8 {
                let mut want: Vec<u64> = live
                    .iter()
                    .filter(|(s, e, _)| {
                        [k].as_slice() >= s.as_slice()
                            && match e {
                                End::Before(e) => [k].as_slice() < e.as_slice(),
                                End::Unbounded => true,
                            }
                    })
                    .map(|x| x.2)
                    .collect();
                want.sort();
                let mut got: Vec<u64> = m.stab(&[k]).collect();
                got.sort();
                assert_eq!(got, want, "key {k}");
            }
        }
    }
}
