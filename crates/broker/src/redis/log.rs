//! The event log on Redis: the snapshot, epochs, events after a sequence, cancel signals.

use super::*;

impl Log for RedisBroker {
    async fn log_epoch(&self) -> Result<u64> {
        self.epoch_call("").await
    }

    async fn advance_log_epoch(&self, seen: u64) -> Result<u64> {
        self.epoch_call(&seen.to_string()).await
    }

    fn log_source(&self) -> u64 {
        self.link.current().generation
    }

    async fn snapshot(&self) -> Result<Snapshot> {
        let mut cmd = self.fcall("fq_snapshot", true);
        cmd.arg(self.config.snapshot_pending_limit);
        let reply = items(self.run(&cmd).await?);
        let seq = text_at(&reply, 0, "seq")?.parse::<u64>().map_err(corrupt)?;
        let mut it = reply.into_iter().skip(1);
        let mut next = || it.next().unwrap_or(Value::Nil);
        let mut snap = Snapshot { seq, ..Snapshot::default() };
        for s in codec::summaries(next()) {
            snap.jobs.insert(s.id.clone(), s);
        }
        let raw = pairs(next());
        let seen = pairs(next());
        let machines = pairs(next());
        let done = pairs(next());
        snap.paused = items(next()).iter().filter_map(text).collect();
        snap.workers = decode_workers(raw, &seen, &done)?.into_iter().collect();
        for (id, v) in machines {
            let m: MachineState =
                serde_json::from_str(&v).map_err(|e| corrupt(format!("machine {id}: {e}")))?;
            snap.machines.insert(id, m);
        }
        Ok(snap)
    }

    async fn events_after(&self, after: u64, limit: usize, wait: Duration) -> Result<Vec<Event>> {
        let limit = limit.clamp(1, 10_000);
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(self.key("ev")).arg(format!("(0-{after}")).arg("+").arg("COUNT").arg(limit);
        let entries = items(self.run(&cmd).await?);
        if !entries.is_empty() || wait.is_zero() {
            return entries.into_iter().map(event_from_entry).collect();
        }
        let block_ms = wait.as_millis().clamp(1, 60_000) as u64;
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(limit)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(self.key("ev"))
            .arg(format!("0-{after}"));
        let reply = self.run_blocking(&cmd).await?;
        // [[key, [entries…]]] (or a map under RESP3); nil on timeout.
        let mut out = Vec::new();
        for stream in items(reply) {
            for part in items(stream) {
                if matches!(part, Value::Array(_)) {
                    for entry in items(part) {
                        out.push(event_from_entry(entry)?);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Waits on the worker's signal list (`BLPOP`), then takes what else is there.
    async fn cancel_signals(&self, worker_id: &str, wait: Duration) -> Result<Vec<JobId>> {
        let key = self.key(&format!("sig:{worker_id}"));
        let mut out = Vec::new();
        if !wait.is_zero() {
            let secs = wait.as_secs_f64().clamp(0.001, 60.0);
            let mut cmd = redis::cmd("BLPOP");
            cmd.arg(&key).arg(format!("{secs:.3}"));
            let reply = self.run_blocking(&cmd).await?;
            // [key, id] (or nil on timeout)
            out.extend(items(reply).get(1).and_then(text).map(JobId));
        }
        let mut cmd = redis::cmd("LPOP");
        cmd.arg(&key).arg(256);
        out.extend(items(self.run(&cmd).await?).iter().filter_map(text).map(JobId));
        Ok(out)
    }
}
