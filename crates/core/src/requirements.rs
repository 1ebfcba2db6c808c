//! Job requirements: what a worker must have (positive) and must not have (negative).
//!
//! Accepted shapes (anything else is rejected at submission with an error naming the field):
//! - a plain object: every key is a positive requirement;
//! - `{"positive_requirements": {…}, "negative_requirements": {…}}`, either block optional, and no other
//!   top-level key beside them.
//!
//! Keys may be nested objects or dot paths (`{"hardware": {"gpu_memory_gb": 16}}` is the same as
//! `{"hardware.gpu_memory_gb": 16}`). Leaves are strings, numbers, booleans or arrays of those. Numbers
//! given as strings (`"16"`) are refused, so a typo cannot silently turn a minimum into an equality.
//! `models` is an array of strings or `"all"`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ValidationError;

/// Parsed, validated requirements, flattened to dot paths (sorted, so equal requirements compare and
/// hash equal whatever their submitted shape).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Value", into = "Value")]
pub struct Requirements {
    /// Leaf path → required value.
    pub positive: BTreeMap<String, Value>,
    /// Leaf path → value the worker must not satisfy.
    pub negative: BTreeMap<String, Value>,
}

const POS: &str = "positive_requirements";
const NEG: &str = "negative_requirements";

impl Requirements {
    /// True when nothing is required.
    pub fn is_empty(&self) -> bool {
        self.positive.is_empty() && self.negative.is_empty()
    }

    /// Parses and validates a requirements document. `field` names it in errors (`requirements`).
    pub fn parse(value: &Value, field: &str) -> Result<Self, ValidationError> {
        let obj = match value {
            Value::Null => return Ok(Self::default()),
            Value::Object(obj) => obj,
            other => {
                return Err(ValidationError::new(field, format!("must be an object, got {}", kind(other))));
            }
        };
        let has_blocks = obj.contains_key(POS) || obj.contains_key(NEG);
        let mut out = Self::default();
        if has_blocks {
            if let Some(other) = obj.keys().find(|k| *k != POS && *k != NEG) {
                return Err(ValidationError::new(
                    &format!("{field}.{other}"),
                    format!("cannot be mixed with {POS}/{NEG}; put it inside {POS}"),
                ));
            }
            for (block, target) in [(POS, &mut out.positive), (NEG, &mut out.negative)] {
                match obj.get(block) {
                    None | Some(Value::Null) => {}
                    Some(Value::Object(inner)) => flatten(inner, &format!("{field}.{block}"), "", target)?,
                    Some(other) => {
                        return Err(ValidationError::new(
                            &format!("{field}.{block}"),
                            format!("must be an object, got {}", kind(other)),
                        ));
                    }
                }
            }
        } else {
            flatten(obj, field, "", &mut out.positive)?;
        }
        Ok(out)
    }

    /// A canonical JSON text of these requirements (sorted paths): equal requirements, equal text.
    pub fn canonical(&self) -> String {
        serde_json::to_string(&(&self.positive, &self.negative)).unwrap_or_default()
    }
}

fn flatten(
    obj: &Map<String, Value>,
    field: &str,
    prefix: &str,
    out: &mut BTreeMap<String, Value>,
) -> Result<(), ValidationError> {
    for (key, value) in obj {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        let here = format!("{field}.{path}");
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(ValidationError::new(&here, "empty key or key segment"));
        }
        match value {
            Value::Object(inner) => {
                if inner.is_empty() {
                    return Err(ValidationError::new(&here, "empty object requires nothing; remove it"));
                }
                flatten(inner, field, &path, out)?;
            }
            _ => {
                check_leaf(&path, value, &here)?;
                if out.insert(path, value.clone()).is_some() {
                    return Err(ValidationError::new(&here, "given twice (nested and dotted)"));
                }
            }
        }
    }
    Ok(())
}

fn check_leaf(path: &str, value: &Value, here: &str) -> Result<(), ValidationError> {
    if path == "models" {
        return match value {
            Value::String(s) if s == "all" => Ok(()),
            Value::Array(items) if items.iter().all(Value::is_string) => Ok(()),
            _ => Err(ValidationError::new(here, "must be an array of model names or \"all\"")),
        };
    }
    match value {
        Value::Null => Err(ValidationError::new(here, "null is not a requirement; remove the key")),
        Value::String(s) => check_string(s, here),
        Value::Number(_) | Value::Bool(_) => Ok(()),
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::String(s) => check_string(s, here)?,
                    Value::Number(_) | Value::Bool(_) => {}
                    other => {
                        return Err(ValidationError::new(
                            here,
                            format!("array items must be strings, numbers or booleans, got {}", kind(other)),
                        ));
                    }
                }
            }
            Ok(())
        }
        Value::Object(_) => Ok(()),
    }
}

fn check_string(s: &str, here: &str) -> Result<(), ValidationError> {
    let t = s.trim();
    if !t.is_empty() && t.parse::<f64>().is_ok_and(f64::is_finite) {
        return Err(ValidationError::new(
            here,
            format!("number given as a string ({s:?}); send a JSON number"),
        ));
    }
    Ok(())
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl TryFrom<Value> for Requirements {
    type Error = ValidationError;
    fn try_from(value: Value) -> Result<Self, Self::Error> {
        Self::parse(&value, "requirements")
    }
}

impl From<Requirements> for Value {
    fn from(r: Requirements) -> Value {
        let to_obj = |m: BTreeMap<String, Value>| Value::Object(m.into_iter().collect());
        if r.negative.is_empty() {
            to_obj(r.positive)
        } else {
            let mut obj = Map::new();
            if !r.positive.is_empty() {
                obj.insert(POS.into(), to_obj(r.positive));
            }
            obj.insert(NEG.into(), to_obj(r.negative));
            Value::Object(obj)
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(v: Value) -> Result<Requirements, ValidationError> {
        Requirements::parse(&v, "requirements")
    }

    #[test]
    fn nested_and_dotted_are_the_same() {
        let a = parse(json!({"hardware": {"gpu_memory_gb": 16}})).unwrap();
        let b = parse(json!({"hardware.gpu_memory_gb": 16})).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.canonical(), b.canonical());
    }

    #[test]
    fn negative_requirements_parse_and_write_back_alike() {
        let r = parse(json!({"negative_requirements": {"region": "eu"}})).unwrap();
        assert!(r.positive.is_empty());
        assert_eq!(r.negative.get("region"), Some(&json!("eu")));
        let back: Value = r.clone().into();
        assert_eq!(parse(back).unwrap(), r);
    }

    #[test]
    fn rejections_name_the_field() {
        let cases = [
            (json!("gpu"), "requirements"),
            (json!([1]), "requirements"),
            (json!({"hardware": {"gpu_memory_gb": "16"}}), "requirements.hardware.gpu_memory_gb"),
            (json!({"models": "sdxl"}), "requirements.models"),
            (json!({"models": [1]}), "requirements.models"),
            (json!({"positive_requirements": {}, "gpu": "x"}), "requirements.gpu"),
            (json!({"positive_requirements": 3}), "requirements.positive_requirements"),
            (json!({"a": null}), "requirements.a"),
            (json!({"a": [{"b": 1}]}), "requirements.a"),
            (json!({"a": {}}), "requirements.a"),
            (json!({"a..b": 1}), "requirements.a..b"),
            (json!({"a": {"b": 1}, "a.b": 2}), "requirements.a.b"),
        ];
        for (value, field) in cases {
            let err = parse(value.clone()).expect_err(&value.to_string());
            assert_eq!(err.field, field, "{value}");
        }
    }

    #[test]
    fn models_all_and_strings_ok() {
        assert!(parse(json!({"models": "all"})).is_ok());
        assert!(parse(json!({"models": ["sdxl", "flux"]})).is_ok());
        assert!(parse(json!({"gpu_model": "RTX 4090"})).is_ok());
        assert!(parse(Value::Null).unwrap().is_empty());
    }
}
