//! Member and cluster identity: ids derived as etcd derives them (from peer URLs and
//! the cluster token), fixed in the store's metadata at the first start.

use concord_mvcc as mvcc;

use crate::config::Config;

pub(crate) const META_MEMBER_ID: &str = "member_id";
pub(crate) const META_CLUSTER_ID: &str = "cluster_id";

/// Member and cluster identity, fixed when the data directory is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub cluster_id: u64,
    pub member_id: u64,
}

/// 64-bit FNV-1a: a stable hash for deriving ids (the same inputs give the same id on
/// every machine and every build).
fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(b"\0") {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// As etcd derives it: from the member's peer URLs and the cluster token.
pub fn member_id(peer_urls: &[String], token: &str) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    // 0 means "none" to Raft.
    fnv64(&[urls.join(",").as_bytes(), token.as_bytes()]).max(1)
}

/// Every member of `--initial-cluster` with its derived id, in the listed order.
pub fn initial_members(cfg: &Config) -> anyhow::Result<Vec<(u64, String, Vec<String>)>> {
    let mut out = Vec::new();
    for (name, urls) in cfg.initial_member_urls()? {
        out.push((member_id(&urls, &cfg.initial_cluster_token), name, urls));
    }
    let mut ids: Vec<u64> = out.iter().map(|m| m.0).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() != out.len() {
        anyhow::bail!("--initial-cluster lists the same peer URLs under two names");
    }
    Ok(out)
}

impl Identity {
    /// As etcd derives them: each member id from its peer URLs and the cluster token,
    /// the cluster id from all member ids.
    pub fn derive(cfg: &Config) -> anyhow::Result<Identity> {
        let members = initial_members(cfg)?;
        let member_id = members
            .iter()
            .find(|m| m.1 == cfg.name)
            .map(|m| m.0)
            .ok_or_else(|| anyhow::anyhow!("{:?} is not in --initial-cluster", cfg.name))?;
        let mut ids: Vec<u64> = members.iter().map(|m| m.0).collect();
        ids.sort_unstable();
        let joined: Vec<u8> = ids.iter().flat_map(|i| i.to_be_bytes()).collect();
        let cluster_id = fnv64(&[&joined, cfg.initial_cluster_token.as_bytes()]);
        Ok(Identity {
            cluster_id,
            member_id,
        })
    }
}

pub(crate) fn meta_u64(store: &mvcc::Store, name: &str) -> mvcc::Result<Option<u64>> {
    store.meta(name)?.map_or(Ok(None), |v| {
        let b: [u8; 8] = v
            .as_slice()
            .try_into()
            .map_err(|_| mvcc::Error::Corrupt(format!("server meta {name:?}")))?;
        Ok(Some(u64::from_be_bytes(b)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_depend_on_token_and_urls() {
        let cfg = |token: &str, url: &str| {
            let a = crate::config::Args {
                initial_cluster_token: Some(token.into()),
                initial_advertise_peer_urls: Some(url.into()),
                initial_cluster: Some(format!("default={url}")),
                ..Default::default()
            };
            Config::load(&a).unwrap()
        };
        let id = |t: &str, u: &str| Identity::derive(&cfg(t, u)).unwrap();
        let a = id("t1", "http://127.0.0.1:2380");
        assert_eq!(a, id("t1", "http://127.0.0.1:2380"));
        assert_ne!(a, id("t2", "http://127.0.0.1:2380"));
        assert_ne!(a.member_id, id("t1", "http://127.0.0.1:2381").member_id);
    }

    #[test]
    fn every_member_derives_the_same_ids() {
        let cluster = "n1=http://127.0.0.1:7001,n2=http://127.0.0.1:7002,n3=http://127.0.0.1:7003";
        let ids: Vec<Identity> = (1..=3)
            .map(|i| {
                let a = crate::config::Args {
                    name: Some(format!("n{i}")),
                    initial_advertise_peer_urls: Some(format!("http://127.0.0.1:700{i}")),
                    initial_cluster: Some(cluster.into()),
                    ..Default::default()
                };
                Identity::derive(&Config::load(&a).unwrap()).unwrap()
            })
            .collect();
        assert!(ids.iter().all(|i| i.cluster_id == ids[0].cluster_id));
        let members = initial_members(
            &Config::load(&crate::config::Args {
                name: Some("n1".into()),
                initial_advertise_peer_urls: Some("http://127.0.0.1:7001".into()),
                initial_cluster: Some(cluster.into()),
                ..Default::default()
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            members.iter().map(|m| m.0).collect::<Vec<_>>(),
            ids.iter().map(|i| i.member_id).collect::<Vec<_>>()
        );
    }
}
