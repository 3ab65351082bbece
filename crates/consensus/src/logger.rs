//! raft-rs logs through `slog`; this drain hands its records to `tracing`, so the node
//! has one log stream with one filter. Fields that print whole messages or entries
//! (raft-rs's `msg` at debug, `ents` at trace) are left out: entries hold clients'
//! keys and values, which never go into the log.

use std::fmt::Write as _;

use slog::{Drain, Level, OwnedKVList, Record};

struct TracingDrain;

struct Fields(String);

/// raft-rs's fields whose values print entries' data.
const WITH_USER_DATA: &[&str] = &["msg", "ents"];

impl slog::Serializer for Fields {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        if !WITH_USER_DATA.contains(&key) {
            let _ = write!(self.0, " {key}={val}");
        }
        Ok(())
    }
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        let mut fields = Fields(String::new());
        let _ = slog::KV::serialize(&record.kv(), record, &mut fields);
        let _ = slog::KV::serialize(values, record, &mut fields);
        let msg = record.msg();
        let f = fields.0;
        match record.level() {
            Level::Critical | Level::Error => tracing::error!(target: "raft", "{msg}{f}"),
            Level::Warning => tracing::warn!(target: "raft", "{msg}{f}"),
            Level::Info => tracing::info!(target: "raft", "{msg}{f}"),
            Level::Debug => tracing::debug!(target: "raft", "{msg}{f}"),
            Level::Trace => tracing::trace!(target: "raft", "{msg}{f}"),
        }
        Ok(())
    }
}

/// A logger for raft-rs tagged with the member id.
pub(crate) fn raft_logger(id: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!("raft_id" => format!("{id:x}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use slog::Serializer as _;

    #[test]
    fn fields_with_entries_are_left_out() {
        let mut f = Fields(String::new());
        f.emit_arguments("to", &format_args!("2")).unwrap();
        f.emit_arguments("msg", &format_args!("entries {{data: \"secret\"}}"))
            .unwrap();
        f.emit_arguments("ents", &format_args!("[secret]")).unwrap();
        assert_eq!(f.0, " to=2");
    }
}
