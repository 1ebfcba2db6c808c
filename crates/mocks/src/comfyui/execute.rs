//! Execution: the executor task that takes queued prompts in order, runs each node (with the
//! cache, progress, interrupts and the probe nodes) and sends the messages of docs/services.md §1.7.

use super::*;

/// Nodes to run for `outputs`, dependencies first (depth-first from each output, inputs in order).
pub(super) fn execution_order(prompt: &Map<String, Value>, outputs: &[String]) -> Vec<String> {
    fn visit(prompt: &Map<String, Value>, id: &str, out: &mut Vec<String>) {
        if out.iter().any(|x| x == id) {
            return;
        }
        if let Some(inputs) = prompt.get(id).and_then(|n| n.get("inputs")).and_then(Value::as_object) {
            for v in inputs.values() {
                if let Value::Array(link) = v
                    && link.len() == 2
                {
                    visit(prompt, &link_id(&link[0]), out);
                }
            }
        }
        out.push(id.to_owned());
    }
    let mut out = Vec::new();
    for o in outputs {
        visit(prompt, o, &mut out);
    }
    out
}

/// A cache key for a node: its class and inputs, with links replaced by the linked node's key.
pub(super) fn signature(prompt: &Map<String, Value>, id: &str, depth: usize) -> String {
    let Some(node) = prompt.get(id) else { return String::new() };
    let mut s = node.get("class_type").map(Value::to_string).unwrap_or_default();
    if let Some(inputs) = node.get("inputs").and_then(Value::as_object) {
        let sorted: BTreeMap<&String, &Value> = inputs.iter().collect();
        for (k, v) in sorted {
            s.push('|');
            s.push_str(k);
            s.push('=');
            match v {
                Value::Array(link) if link.len() == 2 && depth < 64 => {
                    s.push('(');
                    s.push_str(&signature(prompt, &link_id(&link[0]), depth + 1));
                    s.push_str(&link[1].to_string());
                    s.push(')');
                }
                other => s.push_str(&other.to_string()),
            }
        }
    }
    s
}

pub(super) enum NodeEnd {
    Done(Option<Value>),
    Failed { kind: &'static str, message: String },
    Interrupted,
}

pub(super) struct Run {
    q: Queued,
    client: Option<String>,
    states: Vec<(String, Value, Value, &'static str)>,
    messages: Vec<Value>,
}

impl Run {
    fn emit(&self, shared: &Shared, kind: &str, data: Value) {
        shared.lock().emit(self.client.as_deref(), kind, data);
    }

    fn set_state(&mut self, node: &str, value: Value, max: Value, state: &'static str) {
        match self.states.iter_mut().find(|s| s.0 == node) {
            Some(s) => *s = (node.to_owned(), value, max, state),
            None => self.states.push((node.to_owned(), value, max, state)),
        }
    }

    fn progress_state(&self, shared: &Shared) {
        let pid = &self.q.prompt_id;
        let nodes: Map<String, Value> = self
            .states
            .iter()
            .map(|(id, value, max, state)| {
                (
                    id.clone(),
                    json!({"value": value, "max": max, "state": state, "node_id": id, "prompt_id": pid,
                    "display_node_id": id, "parent_node_id": null, "real_node_id": id}),
                )
            })
            .collect();
        self.emit(shared, "progress_state", json!({"prompt_id": pid, "nodes": nodes}));
    }

    /// An `execution_*` message: sent and kept for the history entry.
    fn execution_message(&mut self, shared: &Shared, kind: &str, data: Value) {
        self.messages.push(json!([kind, data]));
        self.emit(shared, kind, data);
    }
}

pub(super) fn interrupted(shared: &Shared) -> bool {
    shared.lock().interrupt
}

pub(super) async fn run_node(
    shared: &Shared,
    run: &mut Run,
    id: &str,
    class: &str,
    inputs: &Map<String, Value>,
) -> NodeEnd {
    let num = |k: &str| inputs.get(k).and_then(|v| coerce("FLOAT", v).ok().flatten()).unwrap_or(0.0);
    match class {
        "EmptyImage" => {
            let bytes = num("width") * num("height") * num("batch_size") * 4.0;
            if bytes > shared.config.memory_limit as f64 {
                return NodeEnd::Failed {
                    kind: "RuntimeError",
                    message: format!(
                        "[enforce fail at alloc_cpu.cpp:124] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate {} bytes. Error code 12 (Cannot allocate memory)\n",
                        bytes as u64
                    ),
                };
            }
            NodeEnd::Done(None)
        }
        "ProbeSleepProgress" => {
            let steps = num("steps").max(0.0) as u64;
            let step =
                Duration::from_secs_f64((num("step_seconds") * shared.config.time_scale).clamp(0.0, 3600.0));
            for i in 1..=steps {
                tokio::time::sleep(step).await;
                if interrupted(shared) {
                    return NodeEnd::Interrupted;
                }
                run.set_state(id, json!(i), json!(steps), "running");
                run.progress_state(shared);
                let pid = run.q.prompt_id.clone();
                run.emit(shared, "progress", json!({"value": i, "max": steps, "prompt_id": pid, "node": id}));
            }
            run.set_state(id, json!(steps), json!(steps), "finished");
            NodeEnd::Done(None)
        }
        "ProbeRaise" => NodeEnd::Failed {
            kind: "ValueError",
            message: format!(
                "{}\n",
                inputs.get("message").and_then(Value::as_str).unwrap_or("probe failure")
            ),
        },
        "SaveImage" | "PreviewImage" => {
            let (kind, prefix) = if class == "SaveImage" {
                (
                    "output",
                    inputs.get("filename_prefix").and_then(Value::as_str).unwrap_or("ComfyUI").to_owned(),
                )
            } else {
                ("temp", "ComfyUI_temp_mock".to_owned())
            };
            let mut inner = shared.lock();
            let counter = inner.file_counters.entry(format!("{kind}/{prefix}")).or_insert(0);
            *counter += 1;
            let filename = format!("{prefix}_{:05}_.png", *counter);
            inner.files.insert((kind.into(), String::new(), filename.clone()), PNG.to_vec());
            NodeEnd::Done(Some(json!({"images": [{"filename": filename, "subfolder": "", "type": kind}]})))
        }
        _ => NodeEnd::Done(None),
    }
}

pub(super) async fn executor(shared: Arc<Shared>) {
    loop {
        let next = {
            let mut inner = shared.lock();
            heapq::pop(&mut inner.pending).inspect(|q| {
                inner.running = Some((q.clone(), None));
                inner.interrupt = false;
                inner.broadcast_status();
            })
        };
        match next {
            Some(q) => execute(&shared, q).await,
            None => {
                tokio::select! {
                    () = shared.stop.cancelled() => return,
                    () = shared.work.notified() => {}
                }
            }
        }
        if shared.stop.is_cancelled() {
            return;
        }
    }
}

pub(super) async fn execute(shared: &Shared, q: Queued) {
    let pid = q.prompt_id.clone();
    let client = q.client_id();
    let mut run = Run { q, client, states: Vec::new(), messages: Vec::new() };
    run.execution_message(shared, "execution_start", json!({"prompt_id": pid, "timestamp": now_ms()}));
    let order = execution_order(&run.q.prompt, &run.q.outputs);
    let sigs: Vec<String> = order.iter().map(|id| signature(&run.q.prompt, id, 0)).collect();
    let cached: Vec<String> = {
        let inner = shared.lock();
        order
            .iter()
            .zip(&sigs)
            .filter(|(_, s)| inner.cache.contains_key(*s))
            .map(|(id, _)| id.clone())
            .collect()
    };
    run.execution_message(
        shared,
        "execution_cached",
        json!({"nodes": cached, "prompt_id": pid, "timestamp": now_ms()}),
    );
    let mut executed: Vec<String> = Vec::new();
    let mut outputs = Map::new();
    let mut end: Option<(String, String, NodeEnd)> = None;
    for (id, sig) in order.iter().zip(&sigs) {
        let node = run.q.prompt.get(id).cloned().unwrap_or(Value::Null);
        let class = node.get("class_type").and_then(Value::as_str).unwrap_or("").to_owned();
        let inputs = node.get("inputs").and_then(Value::as_object).cloned().unwrap_or_default();
        let is_output = node_def(&class).is_some_and(|d| d.output_node);
        if cached.contains(id) {
            if is_output {
                let ui = shared.lock().cache.get(sig).cloned().flatten();
                run.emit(
                    shared,
                    "executed",
                    json!({"node": id, "display_node": id, "output": ui, "prompt_id": pid}),
                );
                if let Some(ui) = ui {
                    outputs.insert(id.clone(), ui);
                }
                run.set_state(id, json!(1), json!(1), "finished");
                run.progress_state(shared);
            }
            executed.push(id.clone());
            continue;
        }
        if interrupted(shared) {
            end = Some((id.clone(), class, NodeEnd::Interrupted));
            break;
        }
        run.set_state(id, json!(0.0), json!(1.0), "running");
        run.progress_state(shared);
        if let Some((_, current)) = shared.lock().running.as_mut() {
            *current = Some(id.clone());
        }
        run.emit(shared, "executing", json!({"node": id, "display_node": id, "prompt_id": pid}));
        if !shared.config.node_delay.is_zero() {
            tokio::time::sleep(shared.config.node_delay).await;
        }
        match run_node(shared, &mut run, id, &class, &inputs).await {
            NodeEnd::Done(ui) => {
                if let Some(ui) = &ui {
                    run.emit(
                        shared,
                        "executed",
                        json!({"node": id, "display_node": id, "output": ui, "prompt_id": pid}),
                    );
                    outputs.insert(id.clone(), ui.clone());
                }
                if !run.states.iter().any(|s| s.0 == *id && s.3 == "finished") {
                    run.set_state(id, json!(1.0), json!(1.0), "finished");
                }
                run.progress_state(shared);
                shared.lock().cache.insert(sig.clone(), ui);
                executed.push(id.clone());
            }
            other => {
                end = Some((id.clone(), class, other));
                break;
            }
        }
    }
    let executed_set: Vec<&String> = executed.iter().rev().collect();
    let (status_str, completed) = match end {
        None => {
            run.execution_message(
                shared,
                "execution_success",
                json!({"prompt_id": pid, "timestamp": now_ms()}),
            );
            ("success", true)
        }
        Some((node_id, class, NodeEnd::Interrupted)) => {
            let data = json!({"prompt_id": pid, "node_id": node_id, "node_type": class, "executed": executed_set, "timestamp": now_ms()});
            run.execution_message(shared, "execution_interrupted", data);
            ("error", false)
        }
        Some((node_id, class, NodeEnd::Failed { kind, message })) => {
            let inputs = run
                .q
                .prompt
                .get(&node_id)
                .and_then(|n| n.get("inputs"))
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            let current_inputs: Map<String, Value> = inputs
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        json!([if v.is_array() {
                            "tensor(...)".to_owned()
                        } else {
                            v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                        }]),
                    )
                })
                .collect();
            let data = json!({"prompt_id": pid, "node_id": node_id, "node_type": class, "executed": executed_set,
                "exception_message": message, "exception_type": kind,
                "traceback": ["  File \"<comfyui>/execution.py\", line 496, in execute\n"],
                "current_inputs": current_inputs, "current_outputs": order, "timestamp": now_ms()});
            run.execution_message(shared, "execution_error", data);
            ("error", false)
        }
        Some((_, _, NodeEnd::Done(_))) => ("success", true),
    };
    if !shared.config.tail_stall.is_zero() {
        tokio::time::sleep(shared.config.tail_stall).await;
    }
    let meta: Map<String, Value> = outputs
        .keys()
        .map(|k| {
            (k.clone(), json!({"node_id": k, "display_node": k, "parent_node": null, "real_node_id": k}))
        })
        .collect();
    let entry = json!({"prompt": run.q.item(), "outputs": outputs,
        "status": {"status_str": status_str, "completed": completed, "messages": run.messages}, "meta": meta});
    let mut inner = shared.lock();
    inner.history.push((pid.clone(), entry));
    if inner.history.len() > 10_000 {
        inner.history.remove(0);
    }
    inner.running = None;
    inner.broadcast_status();
    inner.emit(run.client.as_deref(), "executing", json!({"node": null, "prompt_id": pid}));
    drop(inner);
    shared.done.notify_waiters();
}
