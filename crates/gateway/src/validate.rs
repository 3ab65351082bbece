//! Request checks the gateway makes before a request reaches the backend, with etcd's
//! rules and errors (`api/v3rpc/key.go`): empty keys, bad option combinations, txn op
//! counts and keys written twice in one txn.

use std::collections::HashSet;

use concord_proto::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, range_request,
    request_op::Request,
};

use crate::error::{Error, Result};

/// Request size and shape limits (etcd's `--max-request-bytes` and `--max-txn-ops`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_bytes: 1536 * 1024,
            max_txn_ops: 128,
        }
    }
}

impl Limits {
    /// What gRPC itself accepts: the request limit plus etcd's 512 KiB allowance for
    /// framing, so that a request just over the limit gets etcd's own error text.
    pub fn max_grpc_message(&self) -> usize {
        self.max_request_bytes + 512 * 1024
    }

    /// A write's encoded size must fit the limit (etcd checks the proposal's size).
    pub fn check_size(&self, encoded_len: usize) -> Result<()> {
        if encoded_len > self.max_request_bytes {
            return Err(Error::RequestTooLarge);
        }
        Ok(())
    }
}

pub fn check_range(r: &RangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if range_request::SortOrder::try_from(r.sort_order).is_err()
        || range_request::SortTarget::try_from(r.sort_target).is_err()
    {
        return Err(Error::InvalidSortOption);
    }
    Ok(())
}

pub fn check_put(r: &PutRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(Error::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(Error::LeaseProvided);
    }
    Ok(())
}

pub fn check_delete(r: &DeleteRangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    Ok(())
}

/// etcd's txn checks: op counts, every op's own checks, and no key written twice on
/// one path (a put twice, or a put inside a delete's range).
pub fn check_txn(r: &TxnRequest, limits: &Limits) -> Result<()> {
    check_txn_ops(r, limits.max_txn_ops)?;
    check_intervals(&r.success)?;
    check_intervals(&r.failure)?;
    Ok(())
}

fn check_txn_ops(r: &TxnRequest, max_ops: usize) -> Result<()> {
    if r.compare.len().max(r.success.len()).max(r.failure.len()) > max_ops {
        return Err(Error::TooManyOps);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(Error::EmptyKey);
    }
    for op in r.success.iter().chain(&r.failure) {
        match &op.request {
            Some(Request::RequestRange(x)) => check_range(x)?,
            Some(Request::RequestPut(x)) => check_put(x)?,
            Some(Request::RequestDeleteRange(x)) => check_delete(x)?,
            Some(Request::RequestTxn(x)) => check_txn_ops(x, max_ops)?,
            None => return Err(Error::KeyNotFound),
        }
    }
    Ok(())
}

/// A delete's key selection: one key, `[key, end)`, or `[key, +inf)` for end `\0`.
#[derive(Debug, Clone)]
struct Interval {
    key: Vec<u8>,
    end: Option<Vec<u8>>,
    unbounded: bool,
}

impl Interval {
    fn contains(&self, k: &[u8]) -> bool {
        match &self.end {
            None => k == self.key.as_slice(),
            Some(end) => k >= self.key.as_slice() && (self.unbounded || k < end.as_slice()),
        }
    }
}

/// Returns the keys put and the ranges deleted on these ops (nested txns included),
/// or `DuplicateKey` when a key is written twice.
fn check_intervals(ops: &[RequestOp]) -> Result<(HashSet<Vec<u8>>, Vec<Interval>)> {
    let mut dels: Vec<Interval> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(Request::RequestDeleteRange(d)) => Some(Interval {
                key: d.key.clone(),
                end: (!d.range_end.is_empty()).then(|| d.range_end.clone()),
                unbounded: d.range_end == [0],
            }),
            _ => None,
        })
        .collect();
    let deleted = |dels: &[Interval], k: &[u8]| dels.iter().any(|iv| iv.contains(k));

    let mut puts: HashSet<Vec<u8>> = HashSet::new();
    for op in ops {
        let Some(Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || deleted(&dels, k) {
                return Err(Error::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in puts_else {
            // then and else exclude each other: the same key in both is fine.
            if (puts.contains(&k) && !puts_then.contains(&k)) || deleted(&dels, &k) {
                return Err(Error::DuplicateKey);
            }
            puts.insert(k);
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let Some(Request::RequestPut(p)) = &op.request else {
            continue;
        };
        if puts.contains(&p.key) || deleted(&dels, &p.key) {
            return Err(Error::DuplicateKey);
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: k.into(),
                ..Default::default()
            })),
        }
    }

    fn del(k: &str, end: &[u8]) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: k.into(),
                range_end: end.to_vec(),
                prev_kv: false,
            })),
        }
    }

    fn txn(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
        TxnRequest {
            compare: vec![],
            success,
            failure,
        }
    }

    fn nested(t: TxnRequest) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestTxn(t)),
        }
    }

    #[test]
    fn duplicate_keys() {
        let l = Limits::default();
        assert_eq!(
            check_txn(&txn(vec![put("a"), put("a")], vec![]), &l),
            Err(Error::DuplicateKey)
        );
        assert_eq!(
            check_txn(&txn(vec![put("b"), del("a", b"c")], vec![]), &l),
            Err(Error::DuplicateKey)
        );
        assert_eq!(
            check_txn(&txn(vec![put("z"), del("a", &[0])], vec![]), &l),
            Err(Error::DuplicateKey)
        );
        // then/else of one branch are exclusive, and the outer branches too.
        assert!(check_txn(&txn(vec![put("a")], vec![put("a")]), &l).is_ok());
        assert!(
            check_txn(
                &txn(vec![nested(txn(vec![put("a")], vec![put("a")]))], vec![]),
                &l
            )
            .is_ok()
        );
        assert_eq!(
            check_txn(
                &txn(vec![put("a"), nested(txn(vec![put("a")], vec![]))], vec![]),
                &l
            ),
            Err(Error::DuplicateKey)
        );
        assert_eq!(
            check_txn(
                &txn(
                    vec![del("a", b"b"), nested(txn(vec![], vec![put("a")]))],
                    vec![]
                ),
                &l
            ),
            Err(Error::DuplicateKey)
        );
        assert!(check_txn(&txn(vec![del("a", b""), del("a", b"")], vec![]), &l).is_ok());
    }

    #[test]
    fn op_limits_and_empty_keys() {
        let l = Limits {
            max_txn_ops: 2,
            ..Limits::default()
        };
        assert_eq!(
            check_txn(&txn(vec![put("a"), put("b"), put("c")], vec![]), &l),
            Err(Error::TooManyOps)
        );
        assert_eq!(
            check_txn(&txn(vec![put("")], vec![]), &l),
            Err(Error::EmptyKey)
        );
        assert_eq!(
            check_txn(&txn(vec![RequestOp { request: None }], vec![]), &l),
            Err(Error::KeyNotFound)
        );
        let bad_sort = RangeRequest {
            key: b"a".to_vec(),
            sort_order: 9,
            ..Default::default()
        };
        assert_eq!(check_range(&bad_sort), Err(Error::InvalidSortOption));
        let p = PutRequest {
            key: b"a".to_vec(),
            value: b"v".to_vec(),
            ignore_value: true,
            ..Default::default()
        };
        assert_eq!(check_put(&p), Err(Error::ValueProvided));
    }
}
