//! Translation between the wire types (`concord-proto`) and the store's own types
//! (`concord-mvcc`), and of store errors into the gateway's etcd errors.

use concord_gateway::Error as ApiError;
use concord_mvcc as mvcc;
use concord_proto::etcdserverpb as pb;
use concord_proto::mvccpb;

pub fn api_error(e: mvcc::Error) -> ApiError {
    match e {
        mvcc::Error::Compacted => ApiError::Compacted,
        mvcc::Error::FutureRevision => ApiError::FutureRev,
        mvcc::Error::KeyNotFound => ApiError::KeyNotFound,
        mvcc::Error::LeaseNotFound => ApiError::LeaseNotFound,
        e @ (mvcc::Error::Storage(_) | mvcc::Error::Corrupt(_) | mvcc::Error::Poisoned(_)) => {
            ApiError::Internal(format!("etcdserver: {e}"))
        }
    }
}

fn sort_order(v: i32) -> mvcc::SortOrder {
    match pb::range_request::SortOrder::try_from(v) {
        Ok(pb::range_request::SortOrder::Ascend) => mvcc::SortOrder::Ascend,
        Ok(pb::range_request::SortOrder::Descend) => mvcc::SortOrder::Descend,
        _ => mvcc::SortOrder::None,
    }
}

fn sort_target(v: i32) -> mvcc::SortTarget {
    use pb::range_request::SortTarget as T;
    match T::try_from(v) {
        Ok(T::Version) => mvcc::SortTarget::Version,
        Ok(T::Create) => mvcc::SortTarget::Create,
        Ok(T::Mod) => mvcc::SortTarget::Mod,
        Ok(T::Value) => mvcc::SortTarget::Value,
        _ => mvcc::SortTarget::Key,
    }
}

pub fn range_req(r: pb::RangeRequest) -> mvcc::RangeRequest {
    mvcc::RangeRequest {
        range: mvcc::KeyRange::new(r.key, r.range_end),
        limit: r.limit,
        revision: r.revision,
        sort_order: sort_order(r.sort_order),
        sort_target: sort_target(r.sort_target),
        keys_only: r.keys_only,
        count_only: r.count_only,
        min_mod_revision: r.min_mod_revision,
        max_mod_revision: r.max_mod_revision,
        min_create_revision: r.min_create_revision,
        max_create_revision: r.max_create_revision,
    }
}

pub fn put_req(r: pb::PutRequest) -> mvcc::PutRequest {
    mvcc::PutRequest {
        key: r.key,
        value: r.value,
        lease: r.lease,
        prev_kv: r.prev_kv,
        ignore_value: r.ignore_value,
        ignore_lease: r.ignore_lease,
    }
}

pub fn delete_req(r: pb::DeleteRangeRequest) -> mvcc::DeleteRangeRequest {
    mvcc::DeleteRangeRequest {
        range: mvcc::KeyRange::new(r.key, r.range_end),
        prev_kv: r.prev_kv,
    }
}

fn compare(c: pb::Compare) -> mvcc::Compare {
    use pb::compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
    let result = match R::try_from(c.result) {
        Ok(R::Greater) => mvcc::CompareResult::Greater,
        Ok(R::Less) => mvcc::CompareResult::Less,
        Ok(R::NotEqual) => mvcc::CompareResult::NotEqual,
        _ => mvcc::CompareResult::Equal,
    };
    // The operand is read from the union member that matches the target; any other
    // member means the zero value, as in etcd.
    let u = c.target_union;
    let target = match T::try_from(c.target) {
        Ok(T::Create) => mvcc::CompareTarget::Create(match u {
            Some(U::CreateRevision(v)) => v,
            _ => 0,
        }),
        Ok(T::Mod) => mvcc::CompareTarget::Mod(match u {
            Some(U::ModRevision(v)) => v,
            _ => 0,
        }),
        Ok(T::Value) => mvcc::CompareTarget::Value(match u {
            Some(U::Value(v)) => v,
            _ => Vec::new(),
        }),
        Ok(T::Lease) => mvcc::CompareTarget::Lease(match u {
            Some(U::Lease(v)) => v,
            _ => 0,
        }),
        _ => mvcc::CompareTarget::Version(match u {
            Some(U::Version(v)) => v,
            _ => 0,
        }),
    };
    mvcc::Compare {
        range: mvcc::KeyRange::new(c.key, c.range_end),
        result,
        target,
    }
}

fn ops(ops: Vec<pb::RequestOp>) -> Vec<mvcc::RequestOp> {
    use pb::request_op::Request as R;
    ops.into_iter()
        .filter_map(|op| {
            Some(match op.request? {
                R::RequestRange(r) => mvcc::RequestOp::Range(range_req(r)),
                R::RequestPut(r) => mvcc::RequestOp::Put(put_req(r)),
                R::RequestDeleteRange(r) => mvcc::RequestOp::DeleteRange(delete_req(r)),
                R::RequestTxn(t) => mvcc::RequestOp::Txn(txn_req(t)),
            })
        })
        .collect()
}

pub fn txn_req(t: pb::TxnRequest) -> mvcc::TxnRequest {
    mvcc::TxnRequest {
        compare: t.compare.into_iter().map(compare).collect(),
        success: ops(t.success),
        failure: ops(t.failure),
    }
}

pub fn kv(k: mvcc::KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: k.key,
        create_revision: k.create_revision,
        mod_revision: k.mod_revision,
        version: k.version,
        value: k.value,
        lease: k.lease,
    }
}

/// A header that carries only a revision, as etcd sets inside txn responses.
fn rev_header(revision: i64) -> Option<pb::ResponseHeader> {
    Some(pb::ResponseHeader {
        revision,
        ..Default::default()
    })
}

pub fn range_resp(r: mvcc::RangeResponse) -> pb::RangeResponse {
    pb::RangeResponse {
        header: rev_header(r.header_revision),
        kvs: r.kvs.into_iter().map(kv).collect(),
        more: r.more,
        count: r.count,
    }
}

pub fn put_resp(r: mvcc::PutResponse) -> pb::PutResponse {
    pb::PutResponse {
        header: rev_header(r.header_revision),
        prev_kv: r.prev_kv.map(kv),
    }
}

pub fn delete_resp(r: mvcc::DeleteRangeResponse) -> pb::DeleteRangeResponse {
    pb::DeleteRangeResponse {
        header: rev_header(r.header_revision),
        deleted: r.deleted,
        prev_kvs: r.prev_kvs.into_iter().map(kv).collect(),
    }
}

pub fn txn_resp(t: mvcc::TxnResponse) -> pb::TxnResponse {
    use pb::response_op::Response as R;
    pb::TxnResponse {
        header: rev_header(t.header_revision),
        succeeded: t.succeeded,
        responses: t
            .responses
            .into_iter()
            .map(|r| pb::ResponseOp {
                response: Some(match r {
                    mvcc::ResponseOp::Range(x) => R::ResponseRange(range_resp(x)),
                    mvcc::ResponseOp::Put(x) => R::ResponsePut(put_resp(x)),
                    mvcc::ResponseOp::DeleteRange(x) => R::ResponseDeleteRange(delete_resp(x)),
                    mvcc::ResponseOp::Txn(x) => R::ResponseTxn(txn_resp(x)),
                }),
            })
            .collect(),
    }
}
