//! ReadIndex: reads queued between two Ready rounds share one `read_index` round
//! (context = member id + sequence); unanswered rounds are asked again every few ticks.

use super::*;

pub(super) struct ReadBatch {
    pub(super) ctx: Vec<u8>,
    pub(super) waiters: Vec<oneshot::Sender<Result<u64>>>,
    pub(super) issued_tick: u64,
}

#[derive(Default)]
pub(super) struct Reads {
    pub(super) new: Vec<oneshot::Sender<Result<u64>>>,
    pub(super) in_flight: Vec<ReadBatch>,
    pub(super) seq: u64,
}

impl Reads {
    pub(super) fn fail_all(&mut self, e: fn() -> Error) {
        let failed = self.new.len()
            + self
                .in_flight
                .iter()
                .map(|b| b.waiters.len())
                .sum::<usize>();
        if failed > 0 {
            ::metrics::counter!(crate::metrics::READ_INDEXES_FAILED).increment(failed as u64);
        }
        for w in self.new.drain(..) {
            let _ = w.send(Err(e()));
        }
        for b in self.in_flight.drain(..) {
            for w in b.waiters {
                let _ = w.send(Err(e()));
            }
        }
    }
}

impl<O: Send + 'static> Driver<O> {
    pub(super) fn flush_reads(&mut self) {
        if self.reads.new.is_empty() {
            return;
        }
        if self.raw.raft.leader_id == 0 {
            for w in self.reads.new.drain(..) {
                let _ = w.send(Err(Error::NoLeader));
            }
            return;
        }
        self.reads.seq += 1;
        let mut ctx = Vec::with_capacity(16);
        ctx.extend_from_slice(&self.cfg.id.to_be_bytes());
        ctx.extend_from_slice(&self.reads.seq.to_be_bytes());
        self.raw.read_index(ctx.clone());
        let waiters = std::mem::take(&mut self.reads.new);
        self.reads.in_flight.push(ReadBatch {
            ctx,
            waiters,
            issued_tick: self.ticks,
        });
    }

    pub(super) fn read_states(&mut self, states: Vec<ReadState>) {
        for rs in states {
            if let Some(pos) = self
                .reads
                .in_flight
                .iter()
                .position(|b| b.ctx == rs.request_ctx)
            {
                let b = self.reads.in_flight.swap_remove(pos);
                for w in b.waiters {
                    let _ = w.send(Ok(rs.index));
                }
            }
        }
    }
}
