//! Prompt validation, as ComfyUI's `execution.validate_prompt` / `validate_inputs` do it: the
//! errors and their exact shapes (node, class, input) of docs/services.md §1.

use super::*;

/// An exception raised while validating (the real code's uncaught `KeyError`).
pub(super) struct Raised {
    message: String,
    kind: &'static str,
}

pub(super) type Validated = Vec<(String, bool, Vec<Value>)>;

pub(super) fn memo_get<'a>(validated: &'a Validated, id: &str) -> Option<&'a (String, bool, Vec<Value>)> {
    validated.iter().find(|(k, _, _)| k == id)
}

pub(super) fn memo_set(validated: &mut Validated, id: &str, ok: bool, errors: Vec<Value>) {
    if let Some(e) = validated.iter_mut().find(|(k, _, _)| k == id) {
        *e = (id.to_owned(), ok, errors);
    } else {
        validated.push((id.to_owned(), ok, errors));
    }
}

pub(super) fn link_id(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

pub(super) fn py_float(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e16 { format!("{f:.1}") } else { format!("{f}") }
}

pub(super) fn py_repr(v: &Value) -> String {
    match v {
        Value::String(s) => format!("'{s}'"),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Null => "None".into(),
        other => other.to_string(),
    }
}

/// Converts a scalar like Python's `int()` / `float()`; `Err` is the exception message.
pub(super) fn coerce(kind: &str, v: &Value) -> Result<Option<f64>, String> {
    match kind {
        "INT" => match v {
            Value::Number(n) => Ok(n.as_f64().map(f64::trunc)),
            Value::Bool(b) => Ok(Some(f64::from(u8::from(*b)))),
            Value::String(s) => s
                .trim()
                .parse::<i64>()
                .map(|i| Some(i as f64))
                .map_err(|_| format!("invalid literal for int() with base 10: {}", py_repr(v))),
            _ => Err(format!(
                "int() argument must be a string, a bytes-like object or a real number, not '{}'",
                py_type(v)
            )),
        },
        "FLOAT" => match v {
            Value::Number(n) => Ok(n.as_f64()),
            Value::Bool(b) => Ok(Some(f64::from(u8::from(*b)))),
            Value::String(s) => s
                .trim()
                .parse::<f64>()
                .map(Some)
                .map_err(|_| format!("could not convert string to float: {}", py_repr(v))),
            _ => Err(format!("float() argument must be a string or a real number, not '{}'", py_type(v))),
        },
        _ => Ok(None),
    }
}

pub(super) fn py_type(v: &Value) -> &'static str {
    match v {
        Value::Object(_) => "dict",
        Value::Array(_) => "list",
        Value::Null => "NoneType",
        Value::String(_) => "str",
        Value::Bool(_) => "bool",
        Value::Number(_) => "int",
    }
}

pub(super) fn format_number(kind: &str, f: f64) -> String {
    if kind == "INT" { format!("{}", f as i64) } else { py_float(f) }
}

pub(super) fn validate_inputs(
    prompt: &Map<String, Value>,
    id: &str,
    validated: &mut Validated,
    inner: &Inner,
) -> Result<bool, Raised> {
    if let Some((_, ok, _)) = memo_get(validated, id) {
        return Ok(*ok);
    }
    let node = prompt.get(id).ok_or_else(|| Raised { message: format!("'{id}'"), kind: "KeyError" })?;
    let class = node.get("class_type").and_then(Value::as_str).unwrap_or("");
    let Some(def) = node_def(class) else {
        return Err(Raised { message: format!("'{class}'"), kind: "KeyError" });
    };
    let empty = Map::new();
    let inputs = node.get("inputs").and_then(Value::as_object).unwrap_or(&empty);
    let mut errors = Vec::new();
    let mut valid = true;
    for def_in in &def.inputs {
        let x = def_in.name;
        let config = input_config(def_in);
        let Some(val) = inputs.get(x) else {
            errors.push(json!({"type": "required_input_missing", "message": "Required input is missing", "details": x, "extra_info": {"input_name": x}}));
            continue;
        };
        if let Value::Array(link) = val {
            if link.len() != 2 {
                errors.push(json!({"type": "bad_linked_input", "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]", "details": x,
                    "extra_info": {"input_name": x, "input_config": config, "received_value": val}}));
                continue;
            }
            let o_id = link_id(&link[0]);
            let o_node =
                prompt.get(&o_id).ok_or_else(|| Raised { message: format!("'{o_id}'"), kind: "KeyError" })?;
            let o_class = o_node.get("class_type").and_then(Value::as_str).unwrap_or("");
            let slot = link[1].as_u64().unwrap_or(0) as usize;
            let received = node_def(o_class).and_then(|d| d.outputs.get(slot)).copied().unwrap_or("*");
            if received != def_in.kind && received != "*" && def_in.kind != "*" {
                let details = format!("{x}, received_type({received}) mismatch input_type({})", def_in.kind);
                errors.push(json!({"type": "return_type_mismatch", "message": "Return type mismatch between linked nodes", "details": details,
                    "extra_info": {"input_name": x, "input_config": config, "received_type": received, "linked_node": val}}));
                continue;
            }
            match validate_inputs(prompt, &o_id, validated, inner) {
                Ok(true) => {}
                Ok(false) => valid = false,
                Err(ex) => {
                    valid = false;
                    let error = json!({"type": "exception_during_inner_validation", "message": "Exception when validating inner node", "details": ex.message,
                        "extra_info": {"input_name": x, "input_config": config, "exception_message": ex.message, "exception_type": ex.kind,
                            "traceback": ["  File \"<comfyui>/execution.py\", line 808, in validate_inputs\n    r = await validate_inputs(prompt_id, prompt, o_id, validated)\n"],
                            "linked_node": val}});
                    memo_set(validated, &o_id, false, vec![error]);
                }
            }
            continue;
        }
        if def.class == "LoadImage" && x == "image" {
            let name = val.as_str().unwrap_or("");
            if !inner.files.contains_key(&("input".into(), String::new(), name.to_owned())) {
                errors.push(
                    json!({"type": "custom_validation_failed", "message": "Custom validation failed for node",
                    "details": format!("{x} - Invalid image file: {name}"), "extra_info": {"input_name": x}}),
                );
            }
            continue;
        }
        match coerce(def_in.kind, val) {
            Err(ex) => {
                errors.push(json!({"type": "invalid_input_type", "message": format!("Failed to convert an input value to a {} value", def_in.kind),
                    "details": format!("{x}, {}, {ex}", val.as_str().map_or_else(|| val.to_string(), str::to_owned)),
                    "extra_info": {"input_name": x, "input_config": config, "received_value": val, "exception_message": ex}}));
            }
            Ok(Some(n)) => {
                let min = def_in.config.get("min").and_then(Value::as_f64);
                let max = def_in.config.get("max").and_then(Value::as_f64);
                if let Some(min) = min.filter(|m| n < *m) {
                    errors.push(json!({"type": "value_smaller_than_min",
                        "message": format!("Value {} smaller than min of {}", format_number(def_in.kind, n), format_number(def_in.kind, min)),
                        "details": x, "extra_info": {"input_name": x, "input_config": config, "received_value": val}}));
                } else if let Some(max) = max.filter(|m| n > *m) {
                    errors.push(json!({"type": "value_bigger_than_max",
                        "message": format!("Value {} bigger than max of {}", format_number(def_in.kind, n), format_number(def_in.kind, max)),
                        "details": x, "extra_info": {"input_name": x, "input_config": config, "received_value": val}}));
                }
            }
            Ok(None) => {}
        }
    }
    let ok = errors.is_empty() && valid;
    memo_set(validated, id, ok, errors);
    Ok(ok)
}

/// `Ok((outputs to run, node_errors))` or `Err(400 body)`.
pub(super) fn validate_prompt(
    prompt: &Map<String, Value>,
    targets: Option<&[String]>,
    inner: &Inner,
) -> Result<(Vec<String>, Value), Value> {
    let invalid = |message: String, id: &str| json!({"error": {"type": "invalid_prompt", "message": message, "details": format!("Node ID '#{id}'"), "extra_info": {}}, "node_errors": {}});
    let mut outputs = Vec::new();
    for (id, node) in prompt {
        let Some(class) = node.get("class_type").and_then(Value::as_str) else {
            return Err(invalid(
                "Cannot execute because a node is missing the class_type property.".into(),
                id,
            ));
        };
        let Some(def) = node_def(class) else {
            return Err(invalid(format!("Cannot execute because node {class} does not exist."), id));
        };
        if def.output_node && targets.is_none_or(|t| t.iter().any(|x| x == id)) {
            outputs.push(id.clone());
        }
    }
    if outputs.is_empty() {
        return Err(
            json!({"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}}, "node_errors": {}}),
        );
    }
    let mut good = Vec::new();
    let mut own_errors: Vec<Value> = Vec::new();
    let mut node_errors = Map::new();
    let mut validated: Validated = Vec::new();
    for o in &outputs {
        let (ok, reasons) = match validate_inputs(prompt, o, &mut validated, inner) {
            Ok(ok) => (ok, memo_get(&validated, o).map(|e| e.2.clone()).unwrap_or_default()),
            Err(ex) => {
                let reasons = vec![
                    json!({"type": "exception_during_validation", "message": "Exception when validating node", "details": ex.message,
                    "extra_info": {"exception_type": ex.kind, "traceback": []}}),
                ];
                memo_set(&mut validated, o, false, reasons.clone());
                (false, reasons)
            }
        };
        if ok {
            good.push(o.clone());
            continue;
        }
        own_errors.extend(reasons);
        for (node_id, ok, reasons) in &validated {
            if *ok || reasons.is_empty() {
                continue;
            }
            let class = prompt.get(node_id).and_then(|n| n.get("class_type")).cloned().unwrap_or(Value::Null);
            let entry = node_errors
                .entry(node_id.clone())
                .or_insert_with(|| json!({"errors": reasons, "dependent_outputs": [], "class_type": class}));
            if let Some(d) = entry.get_mut("dependent_outputs").and_then(Value::as_array_mut) {
                d.push(json!(o));
            }
        }
    }
    if good.is_empty() {
        let details: Vec<String> = own_errors
            .iter()
            .map(|e| {
                format!("{}: {}", e["message"].as_str().unwrap_or(""), e["details"].as_str().unwrap_or(""))
            })
            .collect();
        return Err(
            json!({"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
            "details": details.join("\n"), "extra_info": {}}, "node_errors": node_errors}),
        );
    }
    Ok((good, Value::Object(node_errors)))
}
