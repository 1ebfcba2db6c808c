#!lua name=fleetq
-- fleetq's Redis functions. Every mutation of queue state happens here, atomically, and appends
-- its event to the stream in the same call. KEYS[1] is the queue's key prefix (`fleetq:{q}:`);
-- every key used is built from it, so all share one hash slot.
--
-- Never compare order keys with Lua's `<` on strings (it uses strcoll): `key_less` compares the
-- fixed-width hex chunks numerically. Never unpack unbounded lists: only fixed field lists are.

local VERSION = '1'

local SUMMARY = {'id', 'service', 'partition', 'status', 'attempt', 'max_attempts', 'priority',
  'workflow_id', 'workflow_priority', 'workflow_datetime', 'step_number', 'customer_id', 'worker_id',
  'progress', 'message', 'created_at', 'updated_at', 'started_at', 'finished_at', 'run_at',
  'cancel_requested', 'error'}

local LOAD = {'status', 'partition', 'order', 'workflow_id', 'attempt', 'max_attempts', 'worker_id',
  'cancel_requested', 'ckey', 'backoff', 'progress_dirty', 'progress_evt_at', 'idem'}

local LEASE_ERR = '{"message":"lease expired: worker stopped reporting","category":"lease_expired","retryable":true}'

local function jkey(P, id) return P .. 'j:' .. id end

local function cfg(P)
  local v = redis.call('HMGET', P .. 'cfg', 'max_events', 'lease_ms', 'avoid_ms', 'coalesce_ms',
    'retention_ms', 'worker_ttl_ms')
  return {max_events = tonumber(v[1]) or 100000, lease_ms = tonumber(v[2]) or 30000,
    avoid_ms = tonumber(v[3]) or 5000, coalesce_ms = tonumber(v[4]) or 250,
    retention_ms = tonumber(v[5]) or 604800000, worker_ttl_ms = tonumber(v[6]) or 30000}
end

local function load(P, id)
  local v = redis.call('HMGET', jkey(P, id), unpack(LOAD))
  local j = {}
  for i, f in ipairs(LOAD) do j[f] = v[i] end
  return j
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

local function summary(P, id)
  local vals = redis.call('HMGET', jkey(P, id), unpack(SUMMARY))
  local out = {}
  local status, part
  for i, f in ipairs(SUMMARY) do
    local v = vals[i]
    if v then
      out[#out + 1] = f
      out[#out + 1] = v
      if f == 'status' then status = v elseif f == 'partition' then part = v end
    end
  end
  local unw = '0'
  if status == 'pending' and part and redis.call('HGET', P .. 'punw', part) == '1' then unw = '1' end
  out[#out + 1] = 'unworkable'
  out[#out + 1] = unw
  return out
end

local function emit_job(P, C, nows, t, id, reason)
  local args = {'XADD', P .. 'ev', 'MAXLEN', '~', C.max_events, '0-*', 't', t, 'at', nows}
  if reason then
    args[#args + 1] = 'r'
    args[#args + 1] = reason
  end
  local s = summary(P, id)
  for i = 1, #s do args[#args + 1] = s[i] end
  return redis.call(unpack(args))
end

local function emit_data(P, C, nows, t, data)
  return redis.call('XADD', P .. 'ev', 'MAXLEN', '~', C.max_events, '0-*', 't', t, 'at', nows, 'd', data)
end

local function ix_move(P, id, ckey, from, to)
  local m = ckey .. id
  if from then redis.call('ZREM', P .. 'ix:' .. from, m) end
  if to then redis.call('ZADD', P .. 'ix:' .. to, 0, m) end
end

local function wake(P, list)
  redis.call('LPUSH', P .. 'wake:' .. list, '1')
  redis.call('LTRIM', P .. 'wake:' .. list, 0, 63)
end

local function enqueue(P, id, j)
  local m = j.order .. id
  redis.call('ZADD', P .. 'pq:' .. j.partition, 0, m)
  if j.workflow_id and j.workflow_id ~= '' then redis.call('ZADD', P .. 'wfq:' .. j.workflow_id, 0, m) end
  wake(P, 'p:' .. j.partition)
end

local function dequeue(P, id, j)
  local m = j.order .. id
  redis.call('ZREM', P .. 'pq:' .. j.partition, m)
  if j.workflow_id and j.workflow_id ~= '' then redis.call('ZREM', P .. 'wfq:' .. j.workflow_id, m) end
  redis.call('ZREM', P .. 'delayed', id)
end

local function finish(P, id, j, nows, status, outcome)
  local k = jkey(P, id)
  redis.call('HSET', k, 'status', status, 'finished_at', nows, 'updated_at', nows)
  redis.call('HDEL', k, 'lease_deadline')
  redis.call('ZREM', P .. 'leases', id)
  if outcome then redis.call('SET', P .. 'out:' .. id, outcome) end
  ix_move(P, id, j.ckey, j.status, status)
  redis.call('ZADD', P .. 'done', tonumber(nows), j.ckey .. id)
end

local function flush(P, C, nows, id, j)
  if j.progress_dirty == '1' then
    redis.call('HSET', jkey(P, id), 'progress_dirty', '0')
    emit_job(P, C, nows, 'job_progress', id)
  end
end

local function is_running(s) return s == 'assigned' or s == 'in_progress' end

-- The end of an attempt that did not complete: cancel if requested, retry while allowed, else fail.
local function give_back(P, C, nows, id, j, err, retryable, backoff, reason, refund, fail_out, cancel_out)
  local now = tonumber(nows)
  local k = jkey(P, id)
  if j.cancel_requested == '1' then
    finish(P, id, j, nows, 'cancelled', cancel_out)
    emit_job(P, C, nows, 'job_cancelled', id)
    return {'cancelled'}
  end
  local attempt = tonumber(j.attempt)
  if refund then
    attempt = attempt - 1
    redis.call('HSET', k, 'attempt', attempt)
  end
  if retryable and attempt < tonumber(j.max_attempts) then
    local delay = 0
    if backoff then
      local base = tonumber(j.backoff)
      local shift = math.min(math.max(attempt - 1, 0), 30)
      delay = math.min(base * 2 ^ shift, math.max(300000, base))
    end
    local run_at = now + delay
    redis.call('HSET', k, 'status', 'pending', 'updated_at', nows, 'progress', '0', 'error', err,
      'avoid_worker', j.worker_id, 'avoid_until', run_at + C.avoid_ms, 'progress_dirty', '0')
    redis.call('HDEL', k, 'lease_deadline')
    redis.call('ZREM', P .. 'leases', id)
    if delay > 0 then
      redis.call('HSET', k, 'run_at', run_at)
      redis.call('ZADD', P .. 'delayed', run_at, id)
    else
      redis.call('HDEL', k, 'run_at')
      enqueue(P, id, j)
    end
    ix_move(P, id, j.ckey, j.status, 'pending')
    emit_job(P, C, nows, 'job_requeued', id, reason)
    return {'retrying', tostring(run_at)}
  end
  redis.call('HSET', k, 'error', err)
  finish(P, id, j, nows, 'failed', fail_out)
  emit_job(P, C, nows, 'job_failed', id)
  return {'failed'}
end

local function lease_outcomes()
  return '{"kind":"error","error":' .. LEASE_ERR .. '}',
    '{"kind":"error","error":{"message":"cancelled","category":"lease_expired","retryable":false}}'
end

local function reap_leases(P, C, nows, limit)
  local ids = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', nows, 'LIMIT', 0, limit)
  local requeued, finished = 0, 0
  local fail_out, cancel_out = lease_outcomes()
  for _, id in ipairs(ids) do
    local j = load(P, id)
    if is_running(j.status) then
      flush(P, C, nows, id, j)
      local r = give_back(P, C, nows, id, j, LEASE_ERR, true, false, 'lease_expired', false, fail_out, cancel_out)
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
    if j.status == 'pending' then enqueue(P, id, j) end
  end
  return #ids
end

local function take(P, C, nows, worker, id)
  local now = tonumber(nows)
  local j = load(P, id)
  dequeue(P, id, j)
  local k = jkey(P, id)
  redis.call('HINCRBY', k, 'attempt', 1)
  local deadline = now + C.lease_ms
  redis.call('HSET', k, 'status', 'assigned', 'worker_id', worker, 'started_at', nows, 'updated_at', nows,
    'progress', '0', 'cancel_requested', '0', 'lease_deadline', deadline, 'progress_dirty', '0')
  redis.call('HDEL', k, 'message', 'run_at', 'avoid_worker', 'avoid_until', 'progress_evt_at')
  redis.call('ZADD', P .. 'leases', deadline, id)
  ix_move(P, id, j.ckey, j.status, 'assigned')
  emit_job(P, C, nows, 'job_claimed', id)
  local out = {'job', redis.call('GET', P .. 'spec:' .. id), tostring(deadline)}
  local s = summary(P, id)
  for i = 1, #s do out[#out + 1] = s[i] end
  return out
end

-- argv[at] = worker, pver, workflow restriction ('' for none), n, then n (partition, shared) pairs.
local function claim(P, C, nows, argv, at)
  local worker, pver, wf = argv[at], argv[at + 1], argv[at + 2]
  if (redis.call('GET', P .. 'pver') or '0') ~= pver then return {'refresh'} end
  if redis.call('HEXISTS', P .. 'workers', worker) == 0 then return {'unknown'} end
  local now = tonumber(nows)
  reap_leases(P, C, nows, 16)
  promote(P, nows, 64)
  redis.call('ZADD', P .. 'wseen', now, worker)
  local n = tonumber(argv[at + 3])
  local allowed, shared, cands = {}, {}, {}
  for i = 1, n do
    local p = argv[at + 2 + 2 * i]
    allowed[p] = true
    shared[p] = argv[at + 3 + 2 * i] == '1'
    if wf == '' then
      local head = redis.call('ZRANGE', P .. 'pq:' .. p, 0, 0)[1]
      if head then cands[#cands + 1] = {head, p} end
    end
  end
  if wf ~= '' then
    for _, m in ipairs(redis.call('ZRANGE', P .. 'wfq:' .. wf, 0, 255)) do
      local p = redis.call('HGET', jkey(P, string.sub(m, 37)), 'partition')
      if p and allowed[p] then cands[#cands + 1] = {m, p} end
    end
  else
    table.sort(cands, function(a, b) return key_less(a[1], b[1]) end)
  end
  for _, c in ipairs(cands) do
    local id = string.sub(c[1], 37)
    local av = redis.call('HMGET', jkey(P, id), 'avoid_worker', 'avoid_until')
    local avoided = av[1] == worker and av[2] and now < tonumber(av[2])
    if not (avoided and shared[c[2]]) then return take(P, C, nows, worker, id) end
  end
  return false
end

local function fence(P, id, attempt, worker)
  local j = load(P, id)
  if not j.status then return nil, 'missing' end
  if not is_running(j.status) or j.attempt ~= attempt or j.worker_id ~= worker then return nil, 'lost' end
  return j
end

-- ----- registered functions -------------------------------------------------------------------

redis.register_function{function_name = 'fq_version', flags = {'no-writes'},
  callback = function() return VERSION end}

-- ARGV: now, count, then per job: id, spec, partition, partition spec, order prefix (20 hex),
-- ckey (12 hex), idempotency key, workflow id, backoff, service, n, n summary pairs.
redis.register_function('fq_submit', function(keys, argv)
  local P = keys[1]
  local C = cfg(P)
  local nows = argv[1]
  local count = tonumber(argv[2])
  local at = 3
  local created, newparts = {}, {}
  for _ = 1, count do
    local id, spec, part, pspec, prefix = argv[at], argv[at + 1], argv[at + 2], argv[at + 3], argv[at + 4]
    local ckey, idem, wf, backoff, service = argv[at + 5], argv[at + 6], argv[at + 7], argv[at + 8], argv[at + 9]
    local n = tonumber(argv[at + 10])
    local fields_at = at + 11
    at = fields_at + 2 * n
    local existing = false
    if idem ~= '' then existing = redis.call('GET', P .. 'idem:' .. idem) end
    if existing then
      created[#created + 1] = existing
      created[#created + 1] = '0'
    else
      if redis.call('HSETNX', P .. 'parts', part, pspec) == 1 then
        redis.call('INCR', P .. 'pver')
        newparts[#newparts + 1] = part
        wake(P, 's:' .. service)
      end
      local seq = redis.call('INCR', P .. 'jseq')
      local order = prefix .. string.format('%08x%08x', math.floor(seq / 4294967296), seq % 4294967296)
      local k = jkey(P, id)
      for i = 0, n - 1 do
        redis.call('HSET', k, argv[fields_at + 2 * i], argv[fields_at + 2 * i + 1])
      end
      redis.call('HSET', k, 'order', order, 'ckey', ckey, 'backoff', backoff, 'workflow_id', wf)
      if wf == '' then redis.call('HDEL', k, 'workflow_id') end
      if idem ~= '' then
        redis.call('HSET', k, 'idem', idem)
        redis.call('SET', P .. 'idem:' .. idem, id)
      end
      redis.call('SET', P .. 'spec:' .. id, spec)
      enqueue(P, id, {order = order, partition = part, workflow_id = wf})
      redis.call('ZADD', P .. 'ix:all', 0, ckey .. id)
      ix_move(P, id, ckey, nil, 'pending')
      emit_job(P, C, nows, 'job_submitted', id)
      created[#created + 1] = id
      created[#created + 1] = '1'
    end
  end
  local out = {#newparts}
  for _, p in ipairs(newparts) do out[#out + 1] = p end
  for _, v in ipairs(created) do out[#out + 1] = v end
  return out
end)

-- ARGV: now, then the claim arguments.
redis.register_function('fq_claim', function(keys, argv)
  local P = keys[1]
  return claim(P, cfg(P), argv[1], argv, 2)
end)

-- ARGV: now, id, attempt, worker, has_progress, progress, message ('' = none), has_message.
redis.register_function('fq_renew', function(keys, argv)
  local P = keys[1]
  local C = cfg(P)
  local nows, id = argv[1], argv[2]
  local now = tonumber(nows)
  local j, err = fence(P, id, argv[3], argv[4])
  if not j then return {err} end
  local k = jkey(P, id)
  local deadline = now + C.lease_ms
  redis.call('HSET', k, 'lease_deadline', deadline)
  redis.call('ZADD', P .. 'leases', deadline, id)
  if argv[5] == '1' then
    local changed = j.status ~= 'in_progress'
    if changed then
      redis.call('HSET', k, 'status', 'in_progress')
      ix_move(P, id, j.ckey, j.status, 'in_progress')
    end
    redis.call('HSET', k, 'progress', argv[6], 'updated_at', nows)
    if argv[8] == '1' then redis.call('HSET', k, 'message', argv[7]) else redis.call('HDEL', k, 'message') end
    local last = tonumber(j.progress_evt_at)
    if changed or not last or now - last >= C.coalesce_ms then
      redis.call('HSET', k, 'progress_evt_at', nows, 'progress_dirty', '0')
      emit_job(P, C, nows, 'job_progress', id)
    else
      redis.call('HSET', k, 'progress_dirty', '1')
    end
  end
  return {'ok', tostring(deadline), redis.call('HGET', k, 'cancel_requested') or '0'}
end)

-- ARGV: now, id, attempt, worker, outcome json, then optionally the claim arguments (next job).
redis.register_function('fq_complete', function(keys, argv)
  local P = keys[1]
  local C = cfg(P)
  local nows, id = argv[1], argv[2]
  local j, err = fence(P, id, argv[3], argv[4])
  if not j then return {err} end
  flush(P, C, nows, id, j)
  redis.call('HSET', jkey(P, id), 'progress', '100')
  finish(P, id, j, nows, 'completed', argv[5])
  emit_job(P, C, nows, 'job_completed', id)
  if #argv > 5 then
    local next_job = claim(P, C, nows, argv, 6)
    if next_job then
      table.insert(next_job, 1, 'next')
      return next_job
    end
  end
  return {'ok'}
end)

-- ARGV: now, id, attempt, worker, error json, retryable, backoff, reason, refund, fail outcome, cancel outcome.
redis.register_function('fq_fail', function(keys, argv)
  local P = keys[1]
  local C = cfg(P)
  local nows, id = argv[1], argv[2]
  local j, err = fence(P, id, argv[3], argv[4])
  if not j then return {err} end
  flush(P, C, nows, id, j)
  return give_back(P, C, nows, id, j, argv[5], argv[6] == '1', argv[7] == '1', argv[8], argv[9] == '1',
    argv[10], argv[11])
end)

-- ARGV: now, id.
redis.register_function('fq_cancel', function(keys, argv)
  local P = keys[1]
  local C = cfg(P)
  local nows, id = argv[1], argv[2]
  local j = load(P, id)
  if not j.status then return 'missing' end
  if j.status == 'pending' then
    dequeue(P, id, j)
    redis.call('HDEL', jkey(P, id), 'lease_deadline')
    finish(P, id, j, nows, 'cancelled', nil)
    emit_job(P, C, nows, 'job_cancelled', id)
    return 'cancelled'
  elseif is_running(j.status) then
    if j.cancel_requested ~= '1' then
      redis.call('HSET', jkey(P, id), 'cancel_requested', '1', 'updated_at', nows)
      emit_job(P, C, nows, 'job_cancel_requested', id)
    end
    return 'requested'
  end
  return 'finished'
end)

-- ARGV: now, id.
redis.register_function('fq_retry', function(keys, argv)
  local P = keys[1]
  local C = cfg(P)
  local nows, id = argv[1], argv[2]
  local j = load(P, id)
  if not j.status then return 'missing' end
  if j.status ~= 'failed' and j.status ~= 'cancelled' then return j.status end
  local k = jkey(P, id)
  redis.call('HSET', k, 'status', 'pending', 'attempt', '0', 'progress', '0', 'cancel_requested', '0',
    'updated_at', nows, 'progress_dirty', '0')
  redis.call('HDEL', k, 'message', 'finished_at', 'started_at', 'run_at', 'error', 'worker_id',
    'avoid_worker', 'avoid_until', 'progress_evt_at')
  redis.call('DEL', P .. 'out:' .. id)
  redis.call('ZREM', P .. 'done', j.ckey .. id)
  enqueue(P, id, j)
  ix_move(P, id, j.ckey, j.status, 'pending')
  emit_job(P, C, nows, 'job_retried', id)
  return 'ok'
end)

-- ARGV: now. Returns requeued, finished, promoted, expired workers (as strings).
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
  local expired = redis.call('ZRANGEBYSCORE', P .. 'wseen', '-inf', '(' .. (now - C.worker_ttl_ms), 'LIMIT', 0, 1000)
  for _, w in ipairs(expired) do
    redis.call('HDEL', P .. 'workers', w)
    redis.call('ZREM', P .. 'wseen', w)
    emit_data(P, C, nows, 'worker_removed', '{"type":"worker_removed","worker_id":"' .. w .. '","reason":"expired"}')
  end
  if #expired > 0 then redis.call('INCR', P .. 'pver') end
  local old = redis.call('ZRANGEBYSCORE', P .. 'done', '-inf', '(' .. (now - C.retention_ms), 'LIMIT', 0, 1000)
  for _, m in ipairs(old) do
    local id = string.sub(m, 13)
    local k = jkey(P, id)
    local st, idem = unpack(redis.call('HMGET', k, 'status', 'idem'))
    if st then redis.call('ZREM', P .. 'ix:' .. st, m) end
    if idem then redis.call('DEL', P .. 'idem:' .. idem) end
    redis.call('ZREM', P .. 'ix:all', m)
    redis.call('ZREM', P .. 'done', m)
    redis.call('DEL', k, P .. 'spec:' .. id, P .. 'out:' .. id)
  end
  return {tostring(requeued), tostring(finished), tostring(promoted), tostring(#expired)}
end)

-- ARGV: now, n, then n (partition, flag '1'/'0') pairs. Only changed flags are stored and evented.
redis.register_function('fq_workability', function(keys, argv)
  local P = keys[1]
  local C = cfg(P)
  local changed = 0
  for i = 1, tonumber(argv[2]) do
    local p, flag = argv[1 + 2 * i], argv[2 + 2 * i]
    local cur = redis.call('HGET', P .. 'punw', p) == '1'
    if cur ~= (flag == '1') then
      if flag == '1' then redis.call('HSET', P .. 'punw', p, '1') else redis.call('HDEL', P .. 'punw', p) end
      local b = 'false'
      if flag == '1' then b = 'true' end
      emit_data(P, C, argv[1], 'partition_workability',
        '{"type":"partition_workability","partition":"' .. p .. '","unworkable":' .. b .. '}')
      changed = changed + 1
    end
  end
  return changed
end)

-- Compare-and-set of one field of a hash, with an event: the caller folded the new value from the
-- expected old one (worker registration, connector reports, machine events).
-- ARGV: now, hash name, field, expected ('' = absent), new value, event type ('' = none), event json,
-- touch worker (1/0), bump pver (1/0).
redis.register_function('fq_cas', function(keys, argv)
  local P = keys[1]
  local C = cfg(P)
  local h = P .. argv[2]
  local cur = redis.call('HGET', h, argv[3]) or ''
  if cur ~= argv[4] then return 'conflict' end
  redis.call('HSET', h, argv[3], argv[5])
  if argv[8] == '1' then redis.call('ZADD', P .. 'wseen', tonumber(argv[1]), argv[3]) end
  if argv[9] == '1' then redis.call('INCR', P .. 'pver') end
  if argv[6] ~= '' then emit_data(P, C, argv[1], argv[6], argv[7]) end
  return 'ok'
end)

-- ARGV: now, worker, event json.
redis.register_function('fq_deregister', function(keys, argv)
  local P = keys[1]
  if redis.call('HDEL', P .. 'workers', argv[2]) == 0 then return 'unknown' end
  redis.call('ZREM', P .. 'wseen', argv[2])
  redis.call('INCR', P .. 'pver')
  emit_data(P, cfg(P), argv[1], 'worker_removed', argv[3])
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

redis.register_function{function_name = 'fq_view', flags = {'no-writes'}, callback = function(keys)
  local P = keys[1]
  return {redis.call('GET', P .. 'pver') or '0', redis.call('HGETALL', P .. 'parts'),
    redis.call('HGETALL', P .. 'workers'), redis.call('HGETALL', P .. 'punw'),
    redis.call('ZRANGE', P .. 'wseen', 0, -1, 'WITHSCORES')}
end}

-- ARGV: id. Returns summary pairs, spec, outcome.
redis.register_function{function_name = 'fq_job', flags = {'no-writes'}, callback = function(keys, argv)
  local P = keys[1]
  if redis.call('EXISTS', jkey(P, argv[1])) == 0 then return false end
  return {summary(P, argv[1]), redis.call('GET', P .. 'spec:' .. argv[1]), redis.call('GET', P .. 'out:' .. argv[1])}
end}

-- ARGV: status ('' = all), service ('' = all), cursor ('' = newest), limit.
redis.register_function{function_name = 'fq_jobs', flags = {'no-writes'}, callback = function(keys, argv)
  local P = keys[1]
  local ix = P .. 'ix:all'
  if argv[1] ~= '' then ix = P .. 'ix:' .. argv[1] end
  local limit = tonumber(argv[4])
  local start = '+'
  if argv[3] ~= '' then start = '(' .. argv[3] end
  local out, next_cursor, scanned = {}, '', 0
  while #out < limit and scanned < 10000 do
    local batch = redis.call('ZRANGE', ix, start, '-', 'BYLEX', 'REV', 'LIMIT', 0, 256)
    if #batch == 0 then break end
    for _, m in ipairs(batch) do
      scanned = scanned + 1
      start = '(' .. m
      local id = string.sub(m, 13)
      local svc = redis.call('HGET', jkey(P, id), 'service')
      if svc and (argv[2] == '' or svc == argv[2]) then
        out[#out + 1] = summary(P, id)
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
  if #out < limit and scanned >= 10000 then next_cursor = string.sub(start, 2) end
  return {next_cursor, out}
end}

-- ARGV: pending limit. Returns seq, job summaries, workers, worker presence, machines.
redis.register_function{function_name = 'fq_snapshot', flags = {'no-writes'}, callback = function(keys, argv)
  local P = keys[1]
  local jobs = {}
  for _, st in ipairs({'assigned', 'in_progress'}) do
    for _, m in ipairs(redis.call('ZRANGE', P .. 'ix:' .. st, 0, -1)) do jobs[#jobs + 1] = summary(P, string.sub(m, 13)) end
  end
  local limit = tonumber(argv[1])
  if limit > 0 then
    for _, m in ipairs(redis.call('ZRANGE', P .. 'ix:pending', 0, limit - 1)) do
      jobs[#jobs + 1] = summary(P, string.sub(m, 13))
    end
  end
  return {last_seq(P), jobs, redis.call('HGETALL', P .. 'workers'),
    redis.call('ZRANGE', P .. 'wseen', 0, -1, 'WITHSCORES'), redis.call('HGETALL', P .. 'machines')}
end}
