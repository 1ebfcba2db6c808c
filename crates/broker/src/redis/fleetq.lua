#!lua name=fleetq
-- fleetq's Redis functions. Every mutation of queue state happens here, atomically, and appends
-- its event to the stream in the same call. KEYS[1] is the queue's key prefix (`fleetq:{q}:`);
-- every key used is built from it, so all share one hash slot.
--
-- Cost discipline (Redis CPU per job is the scaling budget): a job is one hash, read once per call
-- into a Lua table (`load`), changed in the table (`set`), written back with one HSET (`save`);
-- events are built from the table without re-reading. An absent optional field is stored as ''.
-- Order keys are never compared with Lua's `<` on strings (strcoll): see `key_less`. Only fixed,
-- short field lists are ever unpacked.

local VERSION = '25'

-- A job's state is one JSON object of strings, its spec and its outcome JSON documents: fields named
-- by the job's id in the hashes `J`, `S` and `O` (a key per job would cost a key's overhead and the
-- queue prefix again for each). State is decoded and encoded by Redis's C cjson; absent optional
-- fields are omitted. The stored state leaves out what its place or its other fields say: the id
-- (the field's name) and the service (the partition's prefix); `load` adds them back and `save`
-- returns the whole document. A new job's state also leaves out what is zero, default or
-- derivable (attempt, priority, progress, cancel_requested, updated_at = created_at, ckey,
-- max_attempts = 3, backoff = 1000): readers default them. Summary fields plus internal ones:
-- order, ckey, backoff, progress_dirty, progress_evt_at, idem, avoid_worker, avoid_until. Events
-- carry the whole state JSON as field `j` (readers ignore internals).

local LEASE_ERR = '{"message":"lease expired: worker stopped reporting","category":"lost_lease","retryable":true}'
local LEASE_FAIL = '{"kind":"error","error":' .. LEASE_ERR .. '}'
local LEASE_CANCEL = '{"kind":"error","error":{"message":"cancelled","category":"cancelled","retryable":false}}'

local function num(n) return string.format('%.0f', n) end

-- How often (callers' ms) claims do the reaper's work themselves.
local REAP_EVERY_MS = 100

-- 12 hex digits of a non-negative integer below 2^48 (exact: two halves, each exact in a double).
local function hex12(t) return string.format('%04x%08x', math.floor(t / 4294967296), t % 4294967296) end

-- The creation-time key of a job's listing entries (stored by jobs submitted before it was
-- derived).
local function ckey(j) return j.ckey or hex12(tonumber(j.created_at)) end

local function cfg(P)
  local v = redis.call('HMGET', P .. 'cfg', 'max_events', 'avoid_ms', 'coalesce_ms',
    'retention_ms', 'worker_ttl_ms', 'max_event_age_ms', 'fair', 'npaused')
  return {max_events = tonumber(v[1]) or 100000, avoid_ms = tonumber(v[2]) or 5000,
    coalesce_ms = tonumber(v[3]) or 250, retention_ms = tonumber(v[4]) or 604800000,
    worker_ttl_ms = tonumber(v[5]) or 30000, max_event_age_ms = tonumber(v[6]) or 86400000,
    fair = v[7] == '1', npaused = tonumber(v[8]) or 0}
end

-- Whether a service's queue is paused (`paused`: nothing of it is claimed). Free while nothing is
-- (the count rides on the configuration read every call already makes).
local function paused(P, C, service)
  return C.npaused > 0 and redis.call('HEXISTS', P .. 'paused', service) == 1
end

-- What a new job's state leaves out (`fleetq_core::job::DEFAULT_MAX_ATTEMPTS`,
-- `DEFAULT_RETRY_BACKOFF_MS`).
local DEFAULT_MAX_ATTEMPTS = '3'
local DEFAULT_BACKOFF = '1000'
-- The retry delay's cap (`fleetq_core::job::MAX_RETRY_BACKOFF_MS`; a larger base is its own cap).
local MAX_BACKOFF = 300000
-- The time's characters in an order key (`fleetq_core::OrderKey`: 8 hex of priority, then 12 of
-- time, ending at `order::PREFIX_LEN`).
local ORDER_TIME = {9, 20}

-- The service a partition belongs to (its key is `{service}:{hash}`).
local function service_of(p) return string.match(p, '^(.*):[^:]*$') end

-- The job as a table, or nil when it does not exist.
local function load(P, id)
  local raw = redis.call('HGET', P .. 'J', id)
  if not raw then return nil end
  local j = cjson.decode(raw)
  j.id = id
  if not j.service then j.service = service_of(j.partition) end
  return j
end

-- Stores the job and returns its whole encoded state (reused for the event and the reply). A
-- partition key always begins with its service (`PartitionSpec::key`), so the service is never
-- stored.
local function save(P, j)
  local id, service = j.id, j.service
  j.id, j.service = nil, nil
  local stored = cjson.encode(j)
  j.id, j.service = id, service
  redis.call('HSET', P .. 'J', id, stored)
  local head = '{"id":' .. cjson.encode(id) .. ',"service":' .. cjson.encode(service)
  if stored == '{}' then return head .. '}' end
  return head .. ',' .. string.sub(stored, 2)
end

-- 36-hex order keys: 8 priority, 12 time, 16 sequence (two 8-hex halves, each exact in a double).
local function key_less(a, b)
  for _, r in ipairs({{1, 8}, {9, 20}, {21, 28}, {29, 36}}) do
    local x = tonumber(string.sub(a, r[1], r[2]), 16)
    local y = tonumber(string.sub(b, r[1], r[2]), 16)
    if x ~= y then return x < y end
  end
  return false
end

local function unworkable(P, j)
  if j.status == 'pending' and redis.call('HGET', P .. 'punw', j.partition) == '1' then return '1' end
  return '0'
end

-- `json` is the job's encoded state when the caller has it already.
local function emit_job(P, C, nows, t, j, reason, json)
  json = json or cjson.encode(j)
  if reason then
    return redis.call('XADD', P .. 'ev', 'MAXLEN', '~', C.max_events, '0-*', 't', t, 'at', nows,
      'j', json, 'u', unworkable(P, j), 'r', reason)
  end
  return redis.call('XADD', P .. 'ev', 'MAXLEN', '~', C.max_events, '0-*', 't', t, 'at', nows,
    'j', json, 'u', unworkable(P, j))
end

local function emit_data(P, C, nows, t, data)
  return redis.call('XADD', P .. 'ev', 'MAXLEN', '~', C.max_events, '0-*', 't', t, 'at', nows, 'd', data)
end

-- Pushes up to `n` tokens (at most 64 kept) to a class's wake list: each can wake one waiting
-- worker of that class.
local function wake(P, class, n)
  local toks = {}
  for i = 1, math.min(n, 64) do toks[i] = '1' end
  redis.call('LPUSH', P .. 'wake:c:' .. class, unpack(toks))
  redis.call('LTRIM', P .. 'wake:c:' .. class, 0, 63)
end

-- ----- partitions and worker classes --------------------------------------------------------------
--
-- A live partition (one with an unfinished job: `pn` counts them) has its spec in `parts`, the
-- classes that match it in `pcl:{p}` (computed by the submitter, which knows the classes as of
-- `cver`) and its claimable jobs in `pq:{p}`. Each live class has `ch:{c}`: the head of every
-- partition it matches, in claim order, so a claim reads the first members of one sorted set
-- whatever the number of partitions. A partition whose last unfinished job finishes is removed
-- (spec, classes, flag); the next submission recreates it. A class lives while a worker of it is
-- registered (`cw` counts them).

-- {{k, v}, …} of a flat HGETALL reply.
local function pairs_of(flat)
  local out = {}
  for i = 1, #flat, 2 do out[#out + 1] = {flat[i], flat[i + 1]} end
  return out
end

local function head_of(P, p) return redis.call('ZRANGE', P .. 'pq:' .. p, 0, 0)[1] end

-- The live classes matching partition p (dropped classes are forgotten on the way).
local function classes_of(P, p)
  local out = {}
  for _, c in ipairs(redis.call('SMEMBERS', P .. 'pcl:' .. p)) do
    if redis.call('HEXISTS', P .. 'cw', c) == 1 then
      out[#out + 1] = c
    else
      redis.call('SREM', P .. 'pcl:' .. p, c)
    end
  end
  return out
end

-- Moves partition p's entry in its classes' head indexes from `old` to its current head and wakes
-- each class with `n` tokens. Returns nothing.
local function rehead(P, p, old, n)
  local new = head_of(P, p)
  if new == old and n == 0 then return end
  for _, c in ipairs(classes_of(P, p)) do
    if new ~= old then
      if old then redis.call('ZREM', P .. 'ch:' .. c, old) end
      if new then redis.call('ZADD', P .. 'ch:' .. c, 0, new) end
    end
    if n > 0 then wake(P, c, n) end
  end
end

local function emit_flag(P, C, nows, p, unworkable)
  local b = 'false'
  if unworkable then b = 'true' end
  emit_data(P, C, nows, 'partition_workability',
    '{"type":"partition_workability","partition":"' .. p .. '","unworkable":' .. b .. '}')
end

-- Creates partition p unless it is live. `classes` is a comma-separated list of the classes the
-- caller matched it to; a partition no class matches is flagged unworkable at once (its jobs are
-- submitted flagged) and its event emitted unless `quiet` (the caller emits it after the jobs').
-- Returns true when it was flagged.
local function ensure_partition(P, C, nows, p, pspec, service, classes, quiet)
  if redis.call('HSETNX', P .. 'parts', p, pspec) == 0 then return false end
  redis.call('HSET', P .. 'pn', p, 0)
  redis.call('HINCRBY', P .. 'svcs', service, 1)
  local any = false
  for c in string.gmatch(classes, '[^,]+') do
    local n = tonumber(redis.call('HGET', P .. 'cw', c))
    if n then
      redis.call('SADD', P .. 'pcl:' .. p, c)
      -- A class kept idle (no worker) indexes the partition but does not serve it.
      any = any or n > 0
    end
  end
  if not any then
    redis.call('HSET', P .. 'punw', p, '1')
    if not quiet then emit_flag(P, C, nows, p, true) end
  end
  return not any
end

-- Partition p lost an unfinished job; at none it is removed with its classes and flag.
local function release_partition(P, p, service)
  if redis.call('HINCRBY', P .. 'pn', p, -1) > 0 then return end
  redis.call('HDEL', P .. 'pn', p)
  redis.call('HDEL', P .. 'parts', p)
  redis.call('HDEL', P .. 'punw', p)
  redis.call('DEL', P .. 'pcl:' .. p)
  if redis.call('HINCRBY', P .. 'svcs', service, -1) <= 0 then redis.call('HDEL', P .. 'svcs', service) end
end

-- How long a class without a worker is kept (fleetq_core::class::CLASS_IDLE_MS): a worker that
-- moves between classes as its services fill up and free up finds them ready instead of matching
-- every partition again.
local CLASS_IDLE_MS = 60000

-- A worker of class c left it; the last one leaves it idle (kept, dropped by the reaper later).
-- Returns true when the class became idle (its partitions may have lost their last server).
local function leave_class(P, c, nows)
  if not c then return false end
  if redis.call('HINCRBY', P .. 'cw', c, -1) > 0 then return false end
  redis.call('HSET', P .. 'cidle', c, nows)
  return true
end

-- Drops class c: its index and wake list go, and `cver` moves so submitters refresh.
local function drop_class(P, c)
  for _, h in ipairs({'cw', 'classes', 'cready', 'cwf', 'cidle'}) do redis.call('HDEL', P .. h, c) end
  redis.call('UNLINK', P .. 'ch:' .. c, P .. 'wake:c:' .. c)
  redis.call('INCR', P .. 'cver')
end

-- A claimable job is in its partition's queue (claims), its service's queue `sq:` (queue order and
-- position: ZRANK is O(log n)) and its workflow's queue.
local function enqueue(P, j)
  local m = j.order .. j.id
  local old = head_of(P, j.partition)
  redis.call('ZADD', P .. 'pq:' .. j.partition, 0, m)
  redis.call('ZADD', P .. 'sq:' .. j.service, 0, m)
  if j.workflow_id then redis.call('ZADD', P .. 'wfq:' .. j.workflow_id, 0, m) end
  rehead(P, j.partition, old, 1)
end

local function dequeue(P, j)
  local m = j.order .. j.id
  local old = head_of(P, j.partition)
  redis.call('ZREM', P .. 'pq:' .. j.partition, m)
  redis.call('ZREM', P .. 'sq:' .. j.service, m)
  if j.workflow_id then redis.call('ZREM', P .. 'wfq:' .. j.workflow_id, m) end
  if j.run_at then redis.call('ZREM', P .. 'delayed', j.id) end
  if old == m then rehead(P, j.partition, old, 0) end
end

local function is_running(s) return s == 'assigned' or s == 'in_progress' end

local function finish(P, j, nows, status, outcome)
  j.status = status
  j.message = nil
  j.finished_at = nows
  j.updated_at = nows
  local json = save(P, j)
  if outcome then redis.call('HSET', P .. 'O', j.id, outcome) end
  redis.call('ZREM', P .. 'leases', j.id)
  redis.call('ZADD', P .. 'done', tonumber(nows), ckey(j) .. j.id)
  release_partition(P, j.partition, j.service)
  return json
end

-- Emits the progress that coalescing held back, so it precedes the terminal event.
local function flush(P, C, nows, j)
  if j.progress_dirty == '1' then
    j.progress_dirty = nil
    emit_job(P, C, nows, 'job_progress', j)
  end
end

-- How many attempt ends a job's history keeps (fleetq_core::job::HISTORY_LEN).
local HISTORY_LEN = 50

-- Appends how attempt `ran` ended (fleetq_core::AttemptEnd) to the job's history in hash `H`, the
-- newest HISTORY_LEN kept. `err` is an error's JSON or nil.
local function note_attempt(P, j, nows, ran, ending, reason, err)
  local h = redis.call('HGET', P .. 'H', j.id)
  local list = h and cjson.decode(h) or {}
  local e = {attempt = tonumber(ran) or 0, worker_id = j.worker_id, started_at = tonumber(j.started_at),
    ended_at = tonumber(nows), reason = reason}
  e['end'] = ending
  if err then e.error = cjson.decode(err) end
  list[#list + 1] = e
  while #list > HISTORY_LEN do table.remove(list, 1) end
  redis.call('HSET', P .. 'H', j.id, cjson.encode(list))
end

-- The end of an attempt that did not complete: cancel if requested, retry while allowed, else fail.
local function give_back(P, C, nows, j, err, retryable, backoff, reason, refund, fail_out, cancel_out)
  local now = tonumber(nows)
  j.progress_dirty = nil
  j.message = nil -- the ended attempt's
  local ran = j.attempt
  if j.cancel_requested == '1' then
    note_attempt(P, j, nows, ran, 'cancelled', nil, nil)
    finish(P, j, nows, 'cancelled', cancel_out)
    emit_job(P, C, nows, 'job_cancelled', j)
    return {'cancelled'}
  end
  local attempt = tonumber(j.attempt) or 0
  if refund then
    attempt = attempt - 1
    j.attempt = num(attempt)
  end
  if retryable and attempt < tonumber(j.max_attempts or DEFAULT_MAX_ATTEMPTS) then
    local delay = 0
    if backoff then
      local base = tonumber(j.backoff or DEFAULT_BACKOFF)
      local shift = math.min(math.max(attempt - 1, 0), 30)
      delay = math.min(base * 2 ^ shift, math.max(MAX_BACKOFF, base))
    end
    local run_at = now + delay
    j.status = 'pending'
    j.updated_at = nows
    j.progress = '0'
    j.error = err
    j.avoid_worker = j.worker_id
    j.avoid_until = num(run_at + C.avoid_ms)
    note_attempt(P, j, nows, ran, 'pending', reason, err)
    if delay > 0 then
      j.run_at = num(run_at)
      redis.call('ZADD', P .. 'delayed', run_at, j.id)
    else
      j.run_at = nil
      enqueue(P, j)
    end
    save(P, j)
    redis.call('ZREM', P .. 'leases', j.id)
    emit_job(P, C, nows, 'job_requeued', j, reason)
    return {'retrying', num(run_at)}
  end
  -- No attempt is left: the recorded error is not retryable any more, whatever it was.
  local e = cjson.decode(err)
  if e.retryable then
    e.retryable = false
    err = cjson.encode(e)
    fail_out = '{"kind":"error","error":' .. err .. '}'
  end
  -- 'retry' is how a failure asks to be retried; the last one was not, so it names no reason.
  local final_reason = reason
  if reason == 'retry' then final_reason = nil end
  note_attempt(P, j, nows, ran, 'failed', final_reason, err)
  j.error = err
  finish(P, j, nows, 'failed', fail_out)
  emit_job(P, C, nows, 'job_failed', j)
  return {'failed'}
end

local function reap_leases(P, C, nows, limit)
  local ids = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', nows, 'LIMIT', 0, limit)
  local requeued, finished = 0, 0
  for _, id in ipairs(ids) do
    local j = load(P, id)
    if j and is_running(j.status) then
      flush(P, C, nows, j)
      local r = give_back(P, C, nows, j, LEASE_ERR, true, false, 'lease_expired', false, LEASE_FAIL, LEASE_CANCEL)
      if r[1] == 'retrying' then requeued = requeued + 1 else finished = finished + 1 end
    else
      redis.call('ZREM', P .. 'leases', id)
    end
  end
  return requeued, finished
end

local function promote(P, nows, limit)
  local ids = redis.call('ZRANGEBYSCORE', P .. 'delayed', '-inf', nows, 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do
    redis.call('ZREM', P .. 'delayed', id)
    local j = load(P, id)
    if j and j.status == 'pending' then enqueue(P, j) end
  end
  return #ids
end

-- ----- fair share (fleetq_core::fair; its tests are the rule's) ---------------------------------
-- `fv` service → virtual time V, `ff:{service}` customer → finish tag F, `fw` customer → weight,
-- `fwf:{workflow}` → the key time of the workflow's first step (expires with retention).

-- The order key's time component of job j under fair share.
local function fair_time(P, C, j, now)
  if j.workflow_id then
    local kept = redis.call('GET', P .. 'fwf:' .. j.workflow_id)
    if kept then return tonumber(kept) end
  end
  local s, c = j.service, j.customer_id or ''
  local v = tonumber(redis.call('HGET', P .. 'fv', s))
  if not v then
    local head = redis.call('ZRANGE', P .. 'sq:' .. s, 0, 0)[1]
    local t = now
    if head then t = tonumber(string.sub(head, ORDER_TIME[1], ORDER_TIME[2]), 16) end
    v = t * 1000
    redis.call('HSET', P .. 'fv', s, num(v))
  end
  local start = math.max(tonumber(redis.call('HGET', P .. 'ff:' .. s, c)) or 0, v)
  local w = math.min(math.max(tonumber(redis.call('HGET', P .. 'fw', c)) or 1, 1), 1000)
  redis.call('HSET', P .. 'ff:' .. s, c, num(start + math.floor(1000000 / w)))
  local t = math.floor(start / 1000)
  if j.workflow_id then redis.call('SET', P .. 'fwf:' .. j.workflow_id, num(t), 'PX', C.retention_ms) end
  return t
end

-- A claimed job moves its service's virtual time to its start tag.
local function fair_claimed(P, j)
  local t = tonumber(string.sub(j.order, ORDER_TIME[1], ORDER_TIME[2]), 16) * 1000
  local v = tonumber(redis.call('HGET', P .. 'fv', j.service))
  if not v or t > v then redis.call('HSET', P .. 'fv', j.service, num(t)) end
end

-- Forgets up to 100 finish tags a service's virtual time has passed (they mean what no tag means).
local function fair_forget(P, s)
  local v = tonumber(redis.call('HGET', P .. 'fv', s)) or 0
  local cursor = redis.call('HGET', P .. 'ffc', s) or '0'
  local r = redis.call('HSCAN', P .. 'ff:' .. s, cursor, 'COUNT', 100)
  for i = 1, #r[2], 2 do
    if tonumber(r[2][i + 1]) <= v then redis.call('HDEL', P .. 'ff:' .. s, r[2][i]) end
  end
  redis.call('HSET', P .. 'ffc', s, r[1])
end

local function take(P, C, nows, worker, lease_ms, j)
  local now = tonumber(nows)
  if C.fair then fair_claimed(P, j) end
  dequeue(P, j)
  local deadline = now + lease_ms
  j.attempt = num((tonumber(j.attempt) or 0) + 1)
  j.status = 'assigned'
  j.worker_id = worker
  j.started_at = nows
  j.updated_at = nows
  j.progress = '0'
  j.message = nil
  j.run_at = nil
  j.cancel_requested = '0'
  j.progress_dirty = nil
  j.progress_evt_at = nil
  j.avoid_worker = nil
  j.avoid_until = nil
  local json = save(P, j)
  redis.call('ZADD', P .. 'leases', deadline, j.id)
  emit_job(P, C, nows, 'job_claimed', j, nil, json)
  return {'job', redis.call('HGET', P .. 'S', j.id), num(deadline), json, '0'}
end

-- Whether `worker` (of class c) may take j now: a job it gave back avoids it for a while, unless
-- no other registered worker can serve the job's partition.
local function usable(P, j, worker, now)
  if not (j.avoid_worker == worker and j.avoid_until and now < tonumber(j.avoid_until)) then return true end
  local others = -1
  for _, c in ipairs(classes_of(P, j.partition)) do
    others = others + (tonumber(redis.call('HGET', P .. 'cw', c)) or 0)
  end
  return others <= 0
end

-- The best job `worker` may take, taken; {'empty', class} when there is none (the caller waits on
-- the class's wake list), {'unknown'} for a worker without a class. The lease length is the
-- caller's: each process holds jobs as long as it says.
local function claim(P, C, nows, lease_ms, worker)
  lease_ms = tonumber(lease_ms)
  local now = tonumber(nows)
  -- Claims reap expired leases and promote due retries, at most every REAP_EVERY_MS of the
  -- callers' clock (two range reads per claim were ~15% of a job's Redis CPU).
  if now >= (tonumber(redis.call('GET', P .. 'reap_at')) or 0) then
    local r, f = reap_leases(P, C, nows, 16)
    local promoted = promote(P, nows, 64)
    if r + f < 16 and promoted < 64 then redis.call('SET', P .. 'reap_at', num(now + REAP_EVERY_MS)) end
  end
  local c = redis.call('HGET', P .. 'wclass', worker)
  if not c then return {'unknown'} end
  if redis.call('HEXISTS', P .. 'cready', c) == 0 then return {'empty', c} end
  local wf = redis.call('HGET', P .. 'cwf', c)
  if wf then
    for _, m in ipairs(redis.call('ZRANGE', P .. 'wfq:' .. wf, 0, 255)) do
      local j = load(P, string.sub(m, 37))
      if j and not paused(P, C, j.service) and redis.call('SISMEMBER', P .. 'pcl:' .. j.partition, c) == 1
          and usable(P, j, worker, now) then
        return take(P, C, nows, worker, lease_ms, j)
      end
    end
    return {'empty', c}
  end
  -- Heads in claim order; only a head this worker must avoid sends the walk further.
  for start = 0, 248, 8 do
    local heads = redis.call('ZRANGE', P .. 'ch:' .. c, start, start + 7)
    for _, m in ipairs(heads) do
      local j = load(P, string.sub(m, 37))
      if j and not paused(P, C, j.service) and usable(P, j, worker, now) then
        return take(P, C, nows, worker, lease_ms, j)
      end
    end
    if #heads < 8 then break end
  end
  return {'empty', c}
end

local function fence(P, id, attempt, worker)
  local j = load(P, id)
  if not j then return nil, 'missing' end
  if not is_running(j.status) or j.attempt ~= attempt or j.worker_id ~= worker then return nil, 'lost' end
  return j
end

-- The start of a holder's terminal operation (ARGV: now, id, attempt, worker, …): the fenced job,
-- with progress that coalescing held back flushed first.
local function holder(keys, argv)
  local P = keys[1]
  local C = cfg(P)
  local j, err = fence(P, argv[2], argv[3], argv[4])
  if j then flush(P, C, argv[1], j) end
  return P, C, argv[1], j, err
end

-- The start of an operation on one job by id (ARGV: now, id, …).
local function job_call(keys, argv)
  local P = keys[1]
  return P, cfg(P), argv[1], load(P, argv[2])
end

-- ----- registered functions -------------------------------------------------------------------

redis.register_function{function_name = 'fq_version', flags = {'no-writes'},
  callback = function() return VERSION end}

-- ARGV: now, cver, n partitions, count, then per partition: key, spec, service, matching classes
-- (comma-separated, as of `cver`); then per job: state json (no order), spec, partition index
-- (1-based), order prefix (20 hex), idempotency key. Replies {'refresh'} when the caller's
-- classes are stale (nothing is written), else {'ok', id, created (1/0), …}.
redis.register_function('fq_submit', function(keys, argv)
  local P = keys[1]
  if (redis.call('GET', P .. 'cver') or '0') ~= argv[2] then return {'refresh'} end
  local C = cfg(P)
  local nows = argv[1]
  local nparts, count = tonumber(argv[3]), tonumber(argv[4])
  local parts, heads, added, flagged = {}, {}, {}, {}
  for i = 1, nparts do
    local at = 5 + 4 * (i - 1)
    local p = argv[at]
    flagged[i] = ensure_partition(P, C, nows, p, argv[at + 1], argv[at + 2], argv[at + 3], true)
    parts[i] = p
    heads[i] = head_of(P, p) or false
    added[i] = 0
  end
  local seq = redis.call('INCRBY', P .. 'jseq', count) - count
  local out = {'ok'}
  for k = 0, count - 1 do
    local at = 5 + 4 * nparts + 5 * k
    local state, spec, pi = argv[at], argv[at + 1], tonumber(argv[at + 2])
    local prefix, idem = argv[at + 3], argv[at + 4]
    local existing = false
    if idem ~= '' then existing = redis.call('GET', P .. 'idem:' .. idem) end
    if existing then
      out[#out + 1] = existing
      out[#out + 1] = '0'
    else
      seq = seq + 1
      local j = cjson.decode(state)
      if C.fair then prefix = string.sub(prefix, 1, 8) .. hex12(fair_time(P, C, j, tonumber(nows))) end
      j.order = prefix .. string.format('%08x%08x', math.floor(seq / 4294967296), seq % 4294967296)
      local json = save(P, j)
      redis.call('HSET', P .. 'S', j.id, spec)
      if idem ~= '' then redis.call('SET', P .. 'idem:' .. idem, j.id) end
      local m = j.order .. j.id
      redis.call('ZADD', P .. 'pq:' .. parts[pi], 0, m)
      redis.call('ZADD', P .. 'sq:' .. j.service, 0, m)
      if j.workflow_id then redis.call('ZADD', P .. 'wfq:' .. j.workflow_id, 0, m) end
      redis.call('HINCRBY', P .. 'pn', parts[pi], 1)
      added[pi] = added[pi] + 1
      redis.call('ZADD', P .. 'ix:all', 0, ckey(j) .. j.id)
      emit_job(P, C, nows, 'job_submitted', j, nil, json)
      out[#out + 1] = j.id
      out[#out + 1] = '1'
    end
  end
  for i = 1, nparts do
    if added[i] > 0 then rehead(P, parts[i], heads[i] or nil, added[i]) end
    if flagged[i] and added[i] > 0 then emit_flag(P, C, nows, parts[i], true) end
  end
  -- A partition created for jobs that all turned out to exist already (idempotency) holds none.
  for i = 1, nparts do
    if tonumber(redis.call('HGET', P .. 'pn', parts[i])) == 0 then
      redis.call('HSET', P .. 'pn', parts[i], 1)
      release_partition(P, parts[i], argv[5 + 4 * (i - 1) + 2])
    end
  end
  return out
end)

-- ARGV: now, lease ms, worker.
redis.register_function('fq_claim', function(keys, argv)
  local P = keys[1]
  return claim(P, cfg(P), argv[1], argv[2], argv[3])
end)

-- ARGV: now, id, attempt, worker, has_progress, progress, message, has_message, lease ms.
redis.register_function('fq_renew', function(keys, argv)
  local P = keys[1]
  local C = cfg(P)
  local nows = argv[1]
  local now = tonumber(nows)
  local j, err = fence(P, argv[2], argv[3], argv[4])
  if not j then return {err} end
  local deadline = now + tonumber(argv[9])
  redis.call('ZADD', P .. 'leases', deadline, j.id)
  if argv[5] == '1' then
    local changed = j.status ~= 'in_progress'
    j.status = 'in_progress'
    j.progress = argv[6]
    j.updated_at = nows
    if argv[8] == '1' then j.message = argv[7] else j.message = nil end
    local last = tonumber(j.progress_evt_at)
    if changed or not last or now - last >= C.coalesce_ms then
      j.progress_evt_at = nows
      j.progress_dirty = nil
      emit_job(P, C, nows, 'job_progress', j)
    else
      j.progress_dirty = '1'
    end
    save(P, j)
  end
  return {'ok', num(deadline), j.cancel_requested or '0'}
end)

-- ARGV: now, id, attempt, worker, outcome json, then optionally a lease ms (claim the next job).
redis.register_function('fq_complete', function(keys, argv)
  local P, C, nows, j, err = holder(keys, argv)
  if not j then return {err} end
  j.progress = '100'
  -- A completed job has no error: an earlier attempt's lives in its history.
  j.error = nil
  -- Counted per worker for every viewer (`wdone`, dropped with the worker's presence).
  redis.call('HINCRBY', P .. 'wdone', argv[4], 1)
  note_attempt(P, j, nows, j.attempt, 'completed', nil, nil)
  local json = finish(P, j, nows, 'completed', argv[5])
  emit_job(P, C, nows, 'job_completed', j, nil, json)
  if #argv > 5 then
    local next_job = claim(P, C, nows, argv[6], argv[4])
    table.insert(next_job, 1, 'next')
    return next_job
  end
  return {'ok'}
end)

-- ARGV: now, id, attempt, worker, error json, retryable, backoff, reason, refund, fail outcome, cancel
-- outcome, then for a release because the service died: the crash count that fails the job, its
-- error json and fail outcome.
redis.register_function('fq_fail', function(keys, argv)
  local P, C, nows, j, err = holder(keys, argv)
  if not j then return {err} end
  if argv[12] then
    local n = (tonumber(j.service_crashes) or 0) + 1
    j.service_crashes = num(n)
    if n >= tonumber(argv[12]) then
      return give_back(P, C, nows, j, argv[13], false, false, argv[8], false, argv[14], argv[11])
    end
  end
  return give_back(P, C, nows, j, argv[5], argv[6] == '1', argv[7] == '1', argv[8], argv[9] == '1',
    argv[10], argv[11])
end)

-- ARGV: now, id, attempt, worker, error json, fail outcome, cancel outcome, cver, then the
-- partition the job moves to when it is retried: key, spec, matching classes (comma-separated, as
-- of `cver`), and the job's new spec. Replies {'refresh'} (nothing written) when the caller's
-- classes are stale and the job would move.
redis.register_function('fq_fail_requiring', function(keys, argv)
  local P, C, nows, j, err = holder(keys, argv)
  if not j then return {err} end
  local retried = j.cancel_requested ~= '1'
    and (tonumber(j.attempt) or 0) < tonumber(j.max_attempts or DEFAULT_MAX_ATTEMPTS)
  local p = argv[9]
  if retried and p ~= j.partition then
    if (redis.call('GET', P .. 'cver') or '0') ~= argv[8] then return {'refresh'} end
    ensure_partition(P, C, nows, p, argv[10], j.service, argv[11])
    redis.call('HINCRBY', P .. 'pn', p, 1)
    release_partition(P, j.partition, j.service)
    j.partition = p
    redis.call('HSET', P .. 'S', j.id, argv[12])
  end
  return give_back(P, C, nows, j, argv[5], true, true, 'retry', false, argv[6], argv[7])
end)

-- ARGV: now, id.
redis.register_function('fq_cancel', function(keys, argv)
  local P, C, nows, j = job_call(keys, argv)
  if not j then return 'missing' end
  if j.status == 'pending' then
    dequeue(P, j)
    finish(P, j, nows, 'cancelled', nil)
    emit_job(P, C, nows, 'job_cancelled', j)
    return 'cancelled'
  elseif is_running(j.status) then
    if j.cancel_requested ~= '1' then
      j.cancel_requested = '1'
      j.updated_at = nows
      save(P, j)
      emit_job(P, C, nows, 'job_cancel_requested', j)
      -- Tell the holder now (it waits on its signal list); bounded, and gone with a dead worker.
      local sig = P .. 'sig:' .. j.worker_id
      redis.call('RPUSH', sig, j.id)
      redis.call('LTRIM', sig, -256, -1)
      redis.call('PEXPIRE', sig, 600000)
    end
    return 'requested'
  end
  return 'finished'
end)

-- ARGV: now, service, '1' to pause or '0' to resume, the event json. Returns 1 when it changed.
redis.register_function('fq_pause', function(keys, argv)
  local P = keys[1]
  local changed
  if argv[3] == '1' then
    changed = redis.call('HSET', P .. 'paused', argv[2], argv[1])
  else
    changed = redis.call('HDEL', P .. 'paused', argv[2])
  end
  if changed == 0 then return 0 end
  redis.call('HSET', P .. 'cfg', 'npaused', redis.call('HLEN', P .. 'paused'))
  if argv[3] == '0' then
    -- Its jobs are claimable again: every class's waiting workers look.
    for _, c in ipairs(redis.call('HKEYS', P .. 'classes')) do wake(P, c, 64) end
  end
  emit_data(P, cfg(P), argv[1], 'service_paused', argv[4])
  return 1
end)

-- ARGV: now, id, then optionally cver, partition spec, matching classes. A finished job's partition
-- may be gone: then the reply is 'partition' and the caller, having matched it, calls again.
redis.register_function('fq_retry', function(keys, argv)
  local P, C, nows, j = job_call(keys, argv)
  if not j then return 'missing' end
  if j.status ~= 'failed' and j.status ~= 'cancelled' then return j.status end
  if redis.call('HEXISTS', P .. 'parts', j.partition) == 0 then
    if not argv[3] then return 'partition' end
    if (redis.call('GET', P .. 'cver') or '0') ~= argv[3] then return 'refresh' end
    ensure_partition(P, C, nows, j.partition, argv[4], j.service, argv[5])
  end
  redis.call('HINCRBY', P .. 'pn', j.partition, 1)
  for _, f in ipairs({'message', 'finished_at', 'started_at', 'run_at', 'error', 'worker_id',
      'avoid_worker', 'avoid_until', 'progress_evt_at', 'progress_dirty'}) do j[f] = nil end
  -- A fresh budget of attempts, numbered on from the last: the attempt number is the lease's
  -- fence, so it never repeats for a job.
  local spec = cjson.decode(redis.call('HGET', P .. 'S', j.id) or '{}')
  j.max_attempts = num((tonumber(j.attempt) or 0) + (tonumber(spec.max_attempts) or tonumber(DEFAULT_MAX_ATTEMPTS)))
  j.status = 'pending'
  j.progress = '0'
  j.cancel_requested = '0'
  j.updated_at = nows
  save(P, j)
  redis.call('HDEL', P .. 'O', j.id)
  redis.call('ZREM', P .. 'done', ckey(j) .. j.id)
  enqueue(P, j)
  emit_job(P, C, nows, 'job_retried', j)
  return 'ok'
end)

-- ARGV: now. Returns requeued, finished, promoted, expired workers, trimmed events, dropped classes
-- (as strings).
redis.register_function('fq_reap', function(keys, argv)
  local P = keys[1]
  local C = cfg(P)
  local nows = argv[1]
  local now = tonumber(nows)
  local requeued, finished = 0, 0
  repeat
    local r, f = reap_leases(P, C, nows, 500)
    requeued, finished = requeued + r, finished + f
  until r + f < 500
  local promoted = promote(P, nows, 1000)
  for _, s in ipairs(redis.call('HKEYS', P .. 'fv')) do fair_forget(P, s) end
  local expired = redis.call('ZRANGEBYSCORE', P .. 'wseen', '-inf', '(' .. num(now - C.worker_ttl_ms), 'LIMIT', 0, 1000)
  -- Classes that went idle or were dropped: the caller re-judges workability.
  local dropped = 0
  for _, w in ipairs(expired) do
    redis.call('HDEL', P .. 'workers', w)
    redis.call('ZREM', P .. 'wseen', w)
    redis.call('HDEL', P .. 'wdone', w)
    if leave_class(P, redis.call('HGET', P .. 'wclass', w), nows) then dropped = dropped + 1 end
    redis.call('HDEL', P .. 'wclass', w)
    emit_data(P, C, nows, 'worker_removed', '{"type":"worker_removed","worker_id":"' .. w .. '","reason":"expired"}')
  end
  -- Classes without a worker for CLASS_IDLE_MS (also one whose registrant died after declaring
  -- it; one being filled that long finds itself gone and is declared again).
  for _, kv in ipairs(pairs_of(redis.call('HGETALL', P .. 'cidle'))) do
    if now - tonumber(kv[2]) >= CLASS_IDLE_MS and (tonumber(redis.call('HGET', P .. 'cw', kv[1])) or 0) <= 0 then
      drop_class(P, kv[1])
      dropped = dropped + 1
    end
  end
  local old = redis.call('ZRANGEBYSCORE', P .. 'done', '-inf', '(' .. num(now - C.retention_ms), 'LIMIT', 0, 1000)
  for _, m in ipairs(old) do
    local id = string.sub(m, 13)
    local j = load(P, id)
    if j and j.idem then redis.call('DEL', P .. 'idem:' .. j.idem) end
    redis.call('ZREM', P .. 'ix:all', m)
    redis.call('ZREM', P .. 'done', m)
    for _, h in ipairs({'J', 'S', 'O', 'H'}) do redis.call('HDEL', P .. h, id) end
  end
  -- Events older than max_event_age_ms: times follow the sequence, so they are a prefix.
  local cutoff = now - C.max_event_age_ms
  local trimmed = 0
  for _ = 1, 16 do
    local chunk = redis.call('XRANGE', P .. 'ev', '-', '+', 'COUNT', 1000)
    local last, old = nil, 0
    for _, e in ipairs(chunk) do
      local at
      for i = 1, #e[2], 2 do
        if e[2][i] == 'at' then at = tonumber(e[2][i + 1]) end
      end
      if not at or at >= cutoff then break end
      last, old = e[1], old + 1
    end
    if last then
      local seq = tonumber(string.match(last, '%-(%d+)$'))
      trimmed = trimmed + redis.call('XTRIM', P .. 'ev', 'MINID', '0-' .. num(seq + 1))
    end
    if old < 1000 then break end
  end
  return {num(requeued), num(finished), num(promoted), num(#expired), num(trimmed), num(dropped)}
end)

-- ARGV: now, cver, n, then n (partition, flag '1'/'0') pairs, judged against the classes as of
-- `cver` ('refresh' when they moved on). Only live partitions' changed flags are stored and evented.
redis.register_function('fq_workability', function(keys, argv)
  local P = keys[1]
  if (redis.call('GET', P .. 'cver') or '0') ~= argv[2] then return 'refresh' end
  local C = cfg(P)
  local changed = 0
  for i = 1, tonumber(argv[3]) do
    local p, flag = argv[2 + 2 * i], argv[3 + 2 * i]
    local cur = redis.call('HGET', P .. 'punw', p) == '1'
    if cur ~= (flag == '1') and redis.call('HEXISTS', P .. 'parts', p) == 1 then
      if flag == '1' then redis.call('HSET', P .. 'punw', p, '1') else redis.call('HDEL', P .. 'punw', p) end
      emit_flag(P, C, argv[1], p, flag == '1')
      changed = changed + 1
    end
  end
  return changed
end)

-- ARGV: now, class, class spec json, workflow restriction ('' for none). Declares a class: 'new'
-- (the caller fills its index, then marks it ready), 'building' (another caller is filling it, or
-- died doing so: fill it too, filling is idempotent) or 'ready'.
redis.register_function('fq_class', function(keys, argv)
  local P, c = keys[1], argv[2]
  if redis.call('HEXISTS', P .. 'classes', c) == 1 then
    if redis.call('HEXISTS', P .. 'cready', c) == 1 then return 'ready' end
    return 'building'
  end
  redis.call('HSET', P .. 'classes', c, argv[3])
  redis.call('HSET', P .. 'cw', c, 0)
  redis.call('HSET', P .. 'cidle', c, argv[1])
  if argv[4] ~= '' then redis.call('HSET', P .. 'cwf', c, argv[4]) end
  redis.call('INCR', P .. 'cver')
  return 'new'
end)

-- ARGV: now, class, n, then n partitions the class matches (of those live when the caller read
-- them). Each still live gains the class: its head enters the class's index, and a partition that
-- no class matched before becomes workable. Returns 'gone' when the class was dropped meanwhile.
redis.register_function('fq_class_fill', function(keys, argv)
  local P, c = keys[1], argv[2]
  if redis.call('HEXISTS', P .. 'classes', c) == 0 then return 'gone' end
  local C = cfg(P)
  for i = 1, tonumber(argv[3]) do
    local p = argv[3 + i]
    -- The class may be in pcl:{p} already: a class dropped and declared again (same key, same
    -- match) leaves its old entries behind, and its index must still get the head.
    if redis.call('HEXISTS', P .. 'parts', p) == 1 then
      redis.call('SADD', P .. 'pcl:' .. p, c)
      local head = head_of(P, p)
      if head then redis.call('ZADD', P .. 'ch:' .. c, 0, head) end
      if redis.call('HDEL', P .. 'punw', p) == 1 then emit_flag(P, C, argv[1], p, false) end
    end
  end
  return 'ok'
end)

-- ARGV: class. Its index is complete: its workers may claim.
redis.register_function('fq_class_ready', function(keys, argv)
  local P = keys[1]
  if redis.call('HEXISTS', P .. 'classes', argv[1]) == 0 then return 'gone' end
  redis.call('HSET', P .. 'cready', argv[1], '1')
  return 'ok'
end)

-- Compare-and-set registration of a worker in class c: ARGV now, worker, expected info ('' =
-- absent), new info, event json, class. Replies 'gone' when the class was dropped since the caller
-- declared it, 'conflict' when the info changed, 'changed' when a class gained its first worker or
-- lost its last (the caller re-judges workability), else 'ok'.
redis.register_function('fq_register', function(keys, argv)
  local P = keys[1]
  local w, c = argv[2], argv[6]
  if redis.call('HEXISTS', P .. 'classes', c) == 0 then return 'gone' end
  if (redis.call('HGET', P .. 'workers', w) or '') ~= argv[3] then return 'conflict' end
  redis.call('HSET', P .. 'workers', w, argv[4])
  redis.call('ZADD', P .. 'wseen', tonumber(argv[1]), w)
  local old = redis.call('HGET', P .. 'wclass', w)
  local reply = 'ok'
  if old ~= c then
    redis.call('HSET', P .. 'wclass', w, c)
    -- Its first worker (new or idle class) may serve partitions nobody served: re-judge them.
    if redis.call('HINCRBY', P .. 'cw', c, 1) == 1 then reply = 'changed' end
    redis.call('HDEL', P .. 'cidle', c)
    if leave_class(P, old, argv[1]) then reply = 'changed' end
  end
  emit_data(P, cfg(P), argv[1], 'worker_registered', argv[5])
  return reply
end)

-- Compare-and-set of one field of a hash, with an event: the caller folded the new value from the
-- expected old one (connector reports, machine events).
-- ARGV: now, hash name, field, expected ('' = absent), new value, event type ('' = none), event json,
-- touch worker (1/0).
redis.register_function('fq_cas', function(keys, argv)
  local P = keys[1]
  local C = cfg(P)
  local h = P .. argv[2]
  local cur = redis.call('HGET', h, argv[3]) or ''
  if cur ~= argv[4] then return 'conflict' end
  redis.call('HSET', h, argv[3], argv[5])
  if argv[8] == '1' then redis.call('ZADD', P .. 'wseen', tonumber(argv[1]), argv[3]) end
  if argv[6] ~= '' then emit_data(P, C, argv[1], argv[6], argv[7]) end
  return 'ok'
end)

-- ARGV: now, worker, event json.
redis.register_function('fq_deregister', function(keys, argv)
  local P = keys[1]
  if redis.call('HDEL', P .. 'workers', argv[2]) == 0 then return 'unknown' end
  redis.call('ZREM', P .. 'wseen', argv[2])
  redis.call('HDEL', P .. 'wdone', argv[2])
  local idled = leave_class(P, redis.call('HGET', P .. 'wclass', argv[2]), argv[1])
  redis.call('HDEL', P .. 'wclass', argv[2])
  emit_data(P, cfg(P), argv[1], 'worker_removed', argv[3])
  if idled then return 'changed' end
  return 'ok'
end)

-- ARGV: now, worker.
redis.register_function('fq_heartbeat', function(keys, argv)
  local P = keys[1]
  if redis.call('HEXISTS', P .. 'workers', argv[2]) == 0 then return 'unknown' end
  redis.call('ZADD', P .. 'wseen', tonumber(argv[1]), argv[2])
  return 'ok'
end)

-- Read-only views ---------------------------------------------------------------------------------

local function last_seq(P)
  if redis.call('EXISTS', P .. 'ev') == 0 then return '0' end
  local info = redis.call('XINFO', 'STREAM', P .. 'ev')
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then return string.match(info[i + 1], '%-(%d+)$') end
  end
  return '0'
end

-- The first `limit` claimable jobs after `start` (a BYLEX bound) of all services, in claim order: a
-- merge of the service queues (services are few; a queue of all services would cost every pending
-- job another index entry).
local function all_services(P, start, limit)
  local out = {}
  for _, s in ipairs(redis.call('HKEYS', P .. 'svcs')) do
    for _, m in ipairs(redis.call('ZRANGE', P .. 'sq:' .. s, start, '+', 'BYLEX', 'LIMIT', 0, limit)) do
      out[#out + 1] = m
    end
  end
  table.sort(out, key_less)
  for i = #out, limit + 1, -1 do out[i] = nil end
  return out
end

-- A job as {state json, unworkable flag}.
local function view_of(P, j) return {cjson.encode(j), unworkable(P, j)} end

-- The live classes as of a version: {cver, {class, spec, …}, {class, workers, …}}.
redis.register_function{function_name = 'fq_classes', flags = {'no-writes'}, callback = function(keys)
  local P = keys[1]
  return {redis.call('GET', P .. 'cver') or '0', redis.call('HGETALL', P .. 'classes'),
    redis.call('HGETALL', P .. 'cw')}
end}

-- ARGV: id. Returns state json, unworkable flag, spec, outcome.
redis.register_function{function_name = 'fq_job', flags = {'no-writes'}, callback = function(keys, argv)
  local P = keys[1]
  local j = load(P, argv[1])
  if not j then return false end
  local v = view_of(P, j)
  return {v[1], v[2], redis.call('HGET', P .. 'S', j.id), redis.call('HGET', P .. 'O', j.id) or '',
    redis.call('HGET', P .. 'H', j.id) or ''}
end}

-- Whether a job passes a listing's filters (ARGV of `fq_jobs` and `fq_finished`: status, service,
-- -, -, worker, workflow, customer, owner; '' = any).
local function listed(j, argv)
  return (argv[1] == '' or j.status == argv[1]) and (argv[2] == '' or j.service == argv[2])
    and (argv[5] == '' or j.worker_id == argv[5]) and (argv[6] == '' or j.workflow_id == argv[6])
    and (argv[7] == '' or j.customer_id == argv[7]) and (argv[8] == '' or j.owner == argv[8])
end

-- ARGV: status ('' = all), service ('' = all), cursor ('' = newest), limit, worker, workflow,
-- customer, owner ('' = all). Newest first; a call
-- scans at most 10,000 entries and returns a cursor to continue from.
redis.register_function{function_name = 'fq_jobs', flags = {'no-writes'}, callback = function(keys, argv)
  local P = keys[1]
  local ix = P .. 'ix:all'
  local limit = tonumber(argv[4])
  local start = '+'
  if argv[3] ~= '' then start = '(' .. argv[3] end
  local out, next_cursor, scanned, last = {}, '', 0, nil
  while #out < limit and scanned < 10000 do
    local batch = redis.call('ZRANGE', ix, start, '-', 'BYLEX', 'REV', 'LIMIT', 0, 256)
    if #batch == 0 then break end
    for _, m in ipairs(batch) do
      scanned = scanned + 1
      start = '(' .. m
      last = m
      local j = load(P, string.sub(m, 13))
      if j and listed(j, argv) then
        out[#out + 1] = view_of(P, j)
        if #out == limit then
          next_cursor = m
          break
        end
      end
    end
  end
  if next_cursor ~= '' and #redis.call('ZRANGE', ix, '(' .. next_cursor, '-', 'BYLEX', 'REV', 'LIMIT', 0, 1) == 0 then
    next_cursor = ''
  end
  if #out < limit and scanned >= 10000 and last then next_cursor = last end
  return {next_cursor, out}
end}

-- ARGV: status ('' = every finished one), service, cursor ('' = the latest; 'finish time:member'),
-- limit, worker, workflow, customer, owner ('' = all). Finished jobs, the latest to finish first
-- (`done`: score the finish time; the same time orders by member, descending); a call scans at
-- most 10,000 entries and returns a cursor to continue from.
redis.register_function{function_name = 'fq_finished', flags = {'no-writes'}, callback = function(keys, argv)
  local P = keys[1]
  local limit = tonumber(argv[4])
  local max, after = '+inf', nil
  if argv[3] ~= '' then
    local t, m = string.match(argv[3], '^(%d+):(.+)$')
    if not t then return {'', {}} end
    max, after = t, m
  end
  local out, next_cursor, scanned, off, last = {}, '', 0, 0, nil
  while #out < limit and scanned < 10000 do
    local batch = redis.call('ZRANGE', P .. 'done', max, '-inf', 'BYSCORE', 'REV', 'LIMIT', off, 256, 'WITHSCORES')
    if #batch == 0 then break end
    off = off + #batch / 2
    for i = 1, #batch, 2 do
      local m, t = batch[i], batch[i + 1]
      -- Entries at the cursor's time up to its member were on earlier pages.
      if not (after and t == max and m >= after) then
        scanned = scanned + 1
        last = t .. ':' .. m
        local j = load(P, string.sub(m, 13))
        if j and listed(j, argv) then
          out[#out + 1] = view_of(P, j)
          if #out == limit then
            next_cursor = last
            break
          end
        end
      end
    end
  end
  if #out < limit and scanned >= 10000 and last then next_cursor = last end
  return {next_cursor, out}
end}

-- Builds the service queues (`sq:`) of a queue written by a library
-- older than version 13, once (marker `qix`). Returns the number of jobs indexed.
redis.register_function('fq_reindex', function(keys)
  local P = keys[1]
  if redis.call('GET', P .. 'qix') == '1' then return 0 end
  local n = 0
  for _, p in ipairs(redis.call('HKEYS', P .. 'parts')) do
    local service = service_of(p)
    local start = '-'
    while true do
      local batch = redis.call('ZRANGE', P .. 'pq:' .. p, start, '+', 'BYLEX', 'LIMIT', 0, 1000)
      if #batch == 0 then break end
      for _, m in ipairs(batch) do
        redis.call('ZADD', P .. 'sq:' .. service, 0, m)
        start = '(' .. m
      end
      n = n + #batch
    end
  end
  redis.call('SET', P .. 'qix', '1')
  return n
end)

-- Moves the per-job keys of a queue written by library 16 or older (`j:{id}`, `s:{id}`,
-- `o:{id}`) into the hashes `J`, `S` and `O`.
local function move_job_keys(P)
  local glob = string.gsub(P, '[%*%?%[%]\\]', '\\%0')
  for _, kind in ipairs({{'j:', 'J'}, {'s:', 'S'}, {'o:', 'O'}}) do
    local cursor = '0'
    repeat
      local r = redis.call('SCAN', cursor, 'MATCH', glob .. kind[1] .. '*', 'COUNT', 1000)
      cursor = r[1]
      for _, key in ipairs(r[2]) do
        local raw = redis.call('GET', key)
        if raw then redis.call('HSET', P .. kind[2], string.sub(key, #P + #kind[1] + 1), raw) end
        redis.call('DEL', key)
      end
    until cursor == '0'
  end
end

-- Brings a queue written by an older library to this layout (marker `layout`), once: per-job keys
-- move into hashes (library 16 and older); live partitions get their count of unfinished jobs and
-- the others are removed (library 15 and older; workers registered before have no class: their
-- next claim sends them to register again). Returns the number of partitions removed.
redis.register_function('fq_upgrade', function(keys)
  local P = keys[1]
  local layout = redis.call('GET', P .. 'layout')
  if layout == '17' then return 0 end
  move_job_keys(P)
  local removed = 0
  if layout ~= '16' then
    local held = {}
    for _, set in ipairs({'delayed', 'leases'}) do
      for _, id in ipairs(redis.call('ZRANGE', P .. set, 0, -1)) do
        local j = load(P, id)
        if j then held[j.partition] = (held[j.partition] or 0) + 1 end
      end
    end
    for _, p in ipairs(redis.call('HKEYS', P .. 'parts')) do
      local n = redis.call('ZCARD', P .. 'pq:' .. p) + (held[p] or 0)
      if n > 0 then
        redis.call('HSET', P .. 'pn', p, n)
        redis.call('HINCRBY', P .. 'svcs', service_of(p), 1)
      else
        redis.call('HDEL', P .. 'parts', p)
        redis.call('HDEL', P .. 'punw', p)
        removed = removed + 1
      end
      redis.call('DEL', P .. 'wake:p:' .. p)
    end
    redis.call('DEL', P .. 'pver', P .. 'aq')
  end
  redis.call('SET', P .. 'layout', '17')
  return removed
end)

-- ARGV: the epoch the caller saw ('' to read only). The log's epoch, moved on from `seen` once.
redis.register_function('fq_epoch', function(keys, argv)
  local P = keys[1]
  local now = tonumber(redis.call('GET', P .. 'epoch') or '0')
  if argv[1] ~= '' and tonumber(argv[1]) == now then now = redis.call('INCR', P .. 'epoch') end
  return now
end)

-- ARGV: id. The 1-based place of a claimable job in its service's queue, or false.
redis.register_function{function_name = 'fq_position', flags = {'no-writes'}, callback = function(keys, argv)
  local P = keys[1]
  local j = load(P, argv[1])
  if not j or j.status ~= 'pending' or j.run_at then return false end
  local r = redis.call('ZRANK', P .. 'sq:' .. j.service, j.order .. j.id)
  if not r then return false end
  return r + 1
end}

-- ARGV: service, workflow, customer ('' = all), cursor (an order key, '' = from the head), limit,
-- owner ('' = all).
-- Claimable jobs in claim order from the narrowest queue that holds them; a call reads at most
-- 10,000 members and returns a cursor to continue from ('' at the end).
redis.register_function{function_name = 'fq_queue', flags = {'no-writes'}, callback = function(keys, argv)
  local P = keys[1]
  local service, workflow, customer = argv[1], argv[2], argv[3]
  local limit = tonumber(argv[5])
  local set = nil
  if workflow ~= '' then set = P .. 'wfq:' .. workflow elseif service ~= '' then set = P .. 'sq:' .. service end
  local start = '-'
  if argv[4] ~= '' then start = '(' .. argv[4] .. '\255' end
  local out, scanned, last, taken, full = {}, 0, nil, nil, false
  while not full and scanned < 10000 do
    local batch
    if set then
      batch = redis.call('ZRANGE', set, start, '+', 'BYLEX', 'LIMIT', 0, 256)
    else
      batch = all_services(P, start, 256)
    end
    if #batch == 0 then break end
    for _, m in ipairs(batch) do
      scanned = scanned + 1
      start = '(' .. m
      last = m
      local j = load(P, string.sub(m, 37))
      if j and (service == '' or j.service == service) and (customer == '' or j.customer_id == customer)
          and (argv[6] == '' or j.owner == argv[6]) then
        if #out == limit then
          full = true
          break
        end
        out[#out + 1] = view_of(P, j)
        taken = m
      end
    end
  end
  local next_cursor = ''
  if full then
    next_cursor = string.sub(taken, 1, 36)
  elseif scanned >= 10000 and last then
    next_cursor = string.sub(last, 1, 36)
  end
  return {next_cursor, out}
end}

-- Unfinished jobs per service: {service, pending, delayed, running, …}. Pending from the service
-- queues (one ZCARD per service with a live partition); delayed and running by reading their
-- (bounded) jobs.
redis.register_function{function_name = 'fq_depths', flags = {'no-writes'}, callback = function(keys)
  local P = keys[1]
  local d = {}
  local function add(service, i, n)
    d[service] = d[service] or {0, 0, 0}
    d[service][i] = d[service][i] + n
  end
  for _, service in ipairs(redis.call('HKEYS', P .. 'svcs')) do
    local n = redis.call('ZCARD', P .. 'sq:' .. service)
    if n > 0 then add(service, 1, n) end
  end
  for i, set in ipairs({'delayed', 'leases'}) do
    for _, id in ipairs(redis.call('ZRANGE', P .. set, 0, 9999)) do
      local j = load(P, id)
      if j then add(j.service, i + 1, 1) end
    end
  end
  local out = {}
  for service, c in pairs(d) do
    out[#out + 1] = service
    out[#out + 1] = num(c[1])
    out[#out + 1] = num(c[2])
    out[#out + 1] = num(c[3])
  end
  return out
end}

-- ARGV: pending limit. Returns seq, jobs (running, then up to `limit` pending: delayed first, then
-- the claimable in claim order), workers, worker presence, machines.
redis.register_function{function_name = 'fq_snapshot', flags = {'no-writes'}, callback = function(keys, argv)
  local P = keys[1]
  local jobs = {}
  local function add(id)
    local j = load(P, id)
    if j then jobs[#jobs + 1] = view_of(P, j) end
  end
  for _, id in ipairs(redis.call('ZRANGE', P .. 'leases', 0, -1)) do add(id) end
  local budget = tonumber(argv[1])
  if budget > 0 then
    local delayed = redis.call('ZRANGE', P .. 'delayed', 0, budget - 1)
    for _, id in ipairs(delayed) do add(id) end
    budget = budget - #delayed
  end
  if budget > 0 then
    for _, m in ipairs(all_services(P, '-', budget)) do add(string.sub(m, 37)) end
  end
  return {last_seq(P), jobs, redis.call('HGETALL', P .. 'workers'),
    redis.call('ZRANGE', P .. 'wseen', 0, -1, 'WITHSCORES'), redis.call('HGETALL', P .. 'machines'),
    redis.call('HGETALL', P .. 'wdone'), redis.call('HKEYS', P .. 'paused')}
end}
