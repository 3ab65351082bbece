//! The in-memory key index: key -> generations of revisions, as etcd's `treeIndex`.
//!
//! A generation is one life of a key, from its creation to its deletion (the deletion's
//! tombstone revision is the generation's last revision). The index answers "which
//! revision of this key is visible at revision R" without touching RocksDB, so counts,
//! limits and revision filters cost no value reads.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;

use crate::types::{KeyRange, Revision};

#[derive(Debug, Clone, PartialEq, Eq)]
struct Generation {
    /// Number of puts in this generation, compacted ones included.
    ver: i64,
    created: Revision,
    /// Ascending. For every generation but the last, the final entry is the tombstone.
    revs: Vec<Revision>,
}

impl Generation {
    fn empty() -> Self {
        Self {
            ver: 0,
            created: Revision::default(),
            revs: Vec::new(),
        }
    }
}

/// What the index knows of a key at one revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyMeta {
    pub modified: Revision,
    pub created: Revision,
    pub version: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyIndex {
    generations: Vec<Generation>,
}

impl KeyIndex {
    fn new() -> Self {
        Self {
            generations: vec![Generation::empty()],
        }
    }

    fn put(&mut self, rev: Revision) {
        let g = self
            .generations
            .last_mut()
            .expect("a key index always has a generation");
        if g.revs.is_empty() {
            g.created = rev;
        }
        g.revs.push(rev);
        g.ver += 1;
    }

    /// Starts a generation from a record whose older history was compacted away.
    fn restore(&mut self, created: Revision, modified: Revision, ver: i64) {
        let g = self
            .generations
            .last_mut()
            .expect("a key index always has a generation");
        debug_assert!(g.revs.is_empty());
        g.created = created;
        g.ver = ver;
        g.revs.push(modified);
    }

    fn tombstone(&mut self, rev: Revision) {
        self.put(rev);
        self.generations.push(Generation::empty());
    }

    fn is_live_now(&self) -> bool {
        self.generations.last().is_some_and(|g| !g.revs.is_empty())
    }

    /// The revision of this key visible at `at` (main revision), if the key exists then.
    pub fn get(&self, at: i64) -> Option<KeyMeta> {
        let last = self.generations.len() - 1;
        for (i, g) in self.generations.iter().enumerate().rev() {
            let Some(first) = g.revs.first() else {
                continue;
            };
            if first.main > at {
                continue;
            }
            // The newest revision not after `at`.
            let n = g.revs.partition_point(|r| r.main <= at) - 1;
            if i != last && n == g.revs.len() - 1 {
                // That revision is this generation's tombstone: deleted at `at`.
                return None;
            }
            let version = g.ver - (g.revs.len() - 1 - n) as i64;
            return Some(KeyMeta {
                modified: g.revs[n],
                created: g.created,
                version,
            });
        }
        None
    }

    /// Drops history older than `at`, keeping the newest revision not after `at` of a
    /// live generation. Revisions kept at or below `at` go into `keep`. Returns true
    /// when nothing is left of the key.
    fn compact(&mut self, at: i64, keep: &mut HashSet<Revision>) -> bool {
        let last = self.generations.len() - 1;
        // First generation that is still alive at `at` or was created after it.
        let mut gi = 0;
        while gi < last {
            let tomb = self.generations[gi]
                .revs
                .last()
                .expect("closed generation")
                .main;
            if tomb > at {
                break;
            }
            gi += 1;
        }
        let g = &mut self.generations[gi];
        if !g.revs.is_empty() {
            let below = g.revs.partition_point(|r| r.main <= at);
            if below > 0 {
                // `g` is alive at `at` (its tombstone, if any, is later), so the
                // newest revision not after `at` is a put that readers may still see.
                g.revs.drain(..below - 1);
                keep.insert(g.revs[0]);
            }
        }
        self.generations.drain(..gi);
        self.generations.len() == 1 && self.generations[0].revs.is_empty()
    }
}

/// Key -> [`KeyIndex`], ordered by key.
#[derive(Debug, Default)]
pub struct Index {
    keys: BTreeMap<Vec<u8>, KeyIndex>,
    /// Keys whose newest generation is alive (etcd's `keys_total`).
    live: usize,
}

impl Index {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Keys that exist now (not deleted).
    pub fn live(&self) -> usize {
        self.live
    }

    pub fn put(&mut self, key: &[u8], rev: Revision) {
        self.changing(key, |ki| ki.put(rev));
    }

    pub fn tombstone(&mut self, key: &[u8], rev: Revision) {
        self.changing(key, |ki| ki.tombstone(rev));
    }

    /// Applies `f` to the key's index, keeping the count of live keys.
    fn changing(&mut self, key: &[u8], f: impl FnOnce(&mut KeyIndex)) {
        let ki = self.entry(key);
        let was = ki.is_live_now();
        f(ki);
        let now = ki.is_live_now();
        match (was, now) {
            (false, true) => self.live += 1,
            (true, false) => self.live -= 1,
            _ => {}
        }
    }

    /// Replays a record read back from disk on start-up.
    pub fn restore(
        &mut self,
        key: &[u8],
        rev: Revision,
        created: Revision,
        version: i64,
        tombstone: bool,
    ) {
        self.changing(key, |ki| {
            if tombstone {
                ki.tombstone(rev);
            } else if ki.is_live_now() {
                ki.put(rev);
            } else {
                ki.restore(created, rev, version);
            }
        });
    }

    fn entry(&mut self, key: &[u8]) -> &mut KeyIndex {
        if !self.keys.contains_key(key) {
            self.keys.insert(key.to_vec(), KeyIndex::new());
        }
        self.keys.get_mut(key).expect("inserted above")
    }

    pub fn get(&self, key: &[u8], at: i64) -> Option<KeyMeta> {
        self.keys.get(key).and_then(|ki| ki.get(at))
    }

    /// Key indexes in `range`, in key order (reversed when `reverse`). Nothing is
    /// visited outside the range.
    pub fn range<'a>(
        &'a self,
        range: &'a KeyRange,
        reverse: bool,
    ) -> Box<dyn Iterator<Item = (&'a Vec<u8>, &'a KeyIndex)> + 'a> {
        if range.single() {
            return Box::new(self.keys.get_key_value(&range.key).into_iter());
        }
        let lower = Bound::Included(range.key.as_slice());
        let upper = if range.range_end == [0] {
            Bound::Unbounded
        } else if range.range_end.as_slice() <= range.key.as_slice() {
            return Box::new(std::iter::empty());
        } else {
            Bound::Excluded(range.range_end.as_slice())
        };
        let it = self.keys.range::<[u8], _>((lower, upper));
        if reverse {
            Box::new(it.rev())
        } else {
            Box::new(it)
        }
    }

    /// Compacts up to `n` keys after `after` (from the first key when `None`) to `at`,
    /// adding the revisions at or below `at` that must stay on disk to `keep`. Keys with
    /// no history left are removed. Returns where to continue, `None` when done.
    pub fn compact_chunk(
        &mut self,
        at: i64,
        after: Option<&[u8]>,
        n: usize,
        keep: &mut HashSet<Revision>,
    ) -> Option<Vec<u8>> {
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut dead = Vec::new();
        let mut last = None;
        let mut seen = 0;
        for (k, ki) in self.keys.range_mut::<[u8], _>((lower, Bound::Unbounded)) {
            if seen == n {
                break;
            }
            seen += 1;
            if ki.compact(at, keep) {
                dead.push(k.clone());
            }
            last = Some(k);
        }
        let next = (seen == n).then(|| last.cloned()).flatten();
        for k in dead {
            self.keys.remove(&k);
        }
        next
    }

    /// Compacts every key to `at`; returns the revisions at or below `at` that must be
    /// kept on disk.
    #[cfg(test)]
    pub fn compact(&mut self, at: i64) -> HashSet<Revision> {
        let mut keep = HashSet::new();
        let mut cursor = None;
        loop {
            cursor = self.compact_chunk(at, cursor.as_deref(), usize::MAX, &mut keep);
            if cursor.is_none() {
                return keep;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(main: i64) -> Revision {
        Revision::new(main, 0)
    }

    #[test]
    fn versions_and_generations() {
        let mut idx = Index::new();
        idx.put(b"a", r(2));
        idx.put(b"a", r(4));
        idx.tombstone(b"a", r(6));
        idx.put(b"a", r(8));
        assert_eq!(idx.get(b"a", 1), None);
        let m = idx.get(b"a", 3).unwrap();
        assert_eq!((m.modified, m.created, m.version), (r(2), r(2), 1));
        let m = idx.get(b"a", 5).unwrap();
        assert_eq!((m.modified, m.created, m.version), (r(4), r(2), 2));
        assert_eq!(idx.get(b"a", 6), None);
        assert_eq!(idx.get(b"a", 7), None);
        let m = idx.get(b"a", 9).unwrap();
        assert_eq!((m.modified, m.created, m.version), (r(8), r(8), 1));
    }

    #[test]
    fn compaction_keeps_visible_revision_and_drops_dead_generations() {
        let mut idx = Index::new();
        idx.put(b"a", r(2));
        idx.put(b"a", r(3));
        idx.put(b"a", r(5));
        idx.put(b"b", r(4));
        idx.tombstone(b"b", r(6));
        let keep = idx.compact(4);
        assert_eq!(keep, HashSet::from([r(3), r(4)]));
        let m = idx.get(b"a", 4).unwrap();
        assert_eq!((m.modified, m.version), (r(3), 2));
        assert_eq!(idx.get(b"a", 9).unwrap().version, 3);
        // b's tombstone is after 4, so its live revision stays.
        assert_eq!(idx.get(b"b", 5).unwrap().modified, r(4));
        let keep = idx.compact(6);
        assert_eq!(keep, HashSet::from([r(5)]));
        assert_eq!(idx.len(), 1, "b is gone entirely");
    }

    #[test]
    fn range_bounds() {
        let mut idx = Index::new();
        for (i, k) in [b"a", b"b", b"c", b"d"].iter().enumerate() {
            idx.put(*k, r(i as i64 + 2));
        }
        let keys = |range: KeyRange, rev: bool| -> Vec<Vec<u8>> {
            idx.range(&range, rev).map(|(k, _)| k.clone()).collect()
        };
        assert_eq!(keys(KeyRange::new("b", ""), false), vec![b"b".to_vec()]);
        assert_eq!(keys(KeyRange::new("b", "d"), false).len(), 2);
        assert_eq!(keys(KeyRange::new("b", vec![0]), false).len(), 3);
        assert_eq!(keys(KeyRange::new("d", "b"), false).len(), 0);
        assert_eq!(keys(KeyRange::new("a", vec![0]), true)[0], b"d".to_vec());
    }
}
