//! Reads on Redis: jobs, listings, queue position and page, depths, workers, machines.

use super::*;

impl Read for RedisBroker {
    async fn job(&self, id: &JobId) -> Result<Option<JobRecord>> {
        let mut cmd = self.fcall("fq_job", true);
        cmd.arg(&id.0);
        let reply = items(self.run(&cmd).await?);
        if reply.is_empty() {
            return Ok(None);
        }
        let summary =
            codec::summary_from_state(&text_at(&reply, 0, "job state")?, &text_at(&reply, 1, "flag")?)?;
        let spec_text = text_at(&reply, 2, "spec")?;
        let spec = serde_json::from_str(&spec_text).map_err(|e| corrupt(format!("spec: {e}")))?;
        // Optional JSON documents: '' when absent.
        fn optional<T: serde::de::DeserializeOwned>(
            reply: &[Value],
            i: usize,
            what: &str,
        ) -> Result<Option<T>> {
            reply
                .get(i)
                .and_then(text)
                .filter(|t| !t.is_empty())
                .map(|t| serde_json::from_str(&t))
                .transpose()
                .map_err(|e| corrupt(format!("{what}: {e}")))
        }
        let outcome = optional(&reply, 3, "outcome")?;
        let history = optional(&reply, 4, "history")?.unwrap_or_default();
        Ok(Some(JobRecord { summary, spec, outcome, history }))
    }

    async fn jobs(&self, filter: &JobFilter) -> Result<JobPage> {
        let cursor = filter.cursor.clone().unwrap_or_default();
        let valid = cursor.is_empty()
            || (cursor.len() > 12
                && cursor.is_char_boundary(12)
                && cursor[..12].bytes().all(|b| b.is_ascii_hexdigit()));
        self.listing("fq_jobs", filter, cursor, valid).await
    }

    async fn finished(&self, filter: &JobFilter) -> Result<JobPage> {
        let cursor = filter.cursor.clone().unwrap_or_default();
        let valid = cursor.is_empty()
            || cursor
                .split_once(':')
                .is_some_and(|(t, m)| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) && m.len() > 12);
        self.listing("fq_finished", filter, cursor, valid).await
    }

    async fn queue_position(&self, id: &JobId) -> Result<Option<u64>> {
        let mut cmd = self.fcall("fq_position", true);
        cmd.arg(&id.0);
        match self.run(&cmd).await? {
            Value::Int(n) if n > 0 => Ok(Some(n as u64)),
            Value::Nil | Value::Boolean(false) => Ok(None),
            other => Err(corrupt(format!("queue position: {other:?}"))),
        }
    }

    async fn queue(&self, filter: &QueueFilter) -> Result<JobPage> {
        let cursor = filter.checked_cursor()?.unwrap_or("");
        let mut cmd = self.fcall("fq_queue", true);
        cmd.arg(filter.service.as_deref().unwrap_or(""))
            .arg(filter.workflow.as_deref().unwrap_or(""))
            .arg(filter.customer.as_deref().unwrap_or(""))
            .arg(cursor)
            .arg(filter.page_limit())
            .arg(filter.owner.as_deref().unwrap_or(""));
        page_reply(self.run(&cmd).await?)
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL")
            .arg(self.key("workers"))
            .cmd("ZRANGE")
            .arg(self.key("wseen"))
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .cmd("HGETALL")
            .arg(self.key("wdone"));
        let primary = self.link.current();
        let mut conn = primary.conn.clone();
        let (raw, seen, done): (Value, Value, Value) = match pipe.query_async(&mut conn).await {
            Ok(reply) => reply,
            Err(e) => {
                // A read: once the primary moved, it is asked again there.
                if !self.link.failed(primary.generation, &e).await {
                    return Err(e.into());
                }
                pipe.query_async(&mut self.link.current().conn.clone()).await?
            }
        };
        let mut out: Vec<WorkerInfo> =
            decode_workers(pairs(raw), &pairs(seen), &pairs(done))?.into_values().collect();
        out.sort_by(|a, b| a.registration.worker_id.cmp(&b.registration.worker_id));
        Ok(out)
    }

    async fn queue_depths(&self) -> Result<std::collections::BTreeMap<String, crate::ServiceDepth>> {
        let reply = items(self.run(&self.fcall("fq_depths", true)).await?);
        let mut out = std::collections::BTreeMap::new();
        for row in reply.chunks_exact(4) {
            let n = |i: usize| -> Result<u64> { text_at(row, i, "depth")?.parse().map_err(corrupt) };
            out.insert(
                text_at(row, 0, "service")?,
                crate::ServiceDepth { pending: n(1)?, delayed: n(2)?, running: n(3)? },
            );
        }
        Ok(out)
    }

    async fn machines(&self) -> Result<Vec<MachineState>> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.key("machines"));
        let mut out = pairs(self.run(&cmd).await?)
            .into_iter()
            .map(|(id, v)| serde_json::from_str(&v).map_err(|e| corrupt(format!("machine {id}: {e}"))))
            .collect::<Result<Vec<MachineState>>>()?;
        out.sort_by(|a, b| a.machine_id.cmp(&b.machine_id));
        Ok(out)
    }
}

impl RedisBroker {
    /// A listing function's page (`fq_jobs`, `fq_finished`: the same arguments) from `cursor`,
    /// refused by name unless `valid`.
    async fn listing(
        &self,
        function: &str,
        filter: &JobFilter,
        cursor: String,
        valid: bool,
    ) -> Result<JobPage> {
        if !valid {
            return Err(ValidationError::new("cursor", "not a cursor of this broker").into());
        }
        let mut cmd = self.fcall(function, true);
        cmd.arg(filter.status.map(JobStatus::as_str).unwrap_or(""))
            .arg(filter.service.as_deref().unwrap_or(""))
            .arg(cursor)
            .arg(page_limit(filter))
            .arg(filter.worker.as_deref().unwrap_or(""))
            .arg(filter.workflow.as_deref().unwrap_or(""))
            .arg(filter.customer.as_deref().unwrap_or(""))
            .arg(filter.owner.as_deref().unwrap_or(""));
        page_reply(self.run(&cmd).await?)
    }
}
