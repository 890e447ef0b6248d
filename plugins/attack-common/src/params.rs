//! The parameters every attack shares, and a small checker of the JSON Schema subset the host uses.

use audit_sdk::serde_json::{Map, Value};
use audit_sdk::{DatasetRef, Error, Params, Result};

/// `poison_rate` used when `adaptive` is true (the low-rate "slow poisoning" setting).
pub const ADAPTIVE_POISON_RATE: f64 = 0.003;

/// How poisoned samples are relabelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every poisoned sample gets the target class.
    AllToOne,
    /// A poisoned sample of class `y` gets `(y + 1) mod K`.
    AllToAll,
}

impl Mode {
    /// Parses `all-to-one` / `all-to-all`.
    pub fn parse(s: &str) -> Result<Mode> {
        match s {
            "all-to-one" => Ok(Mode::AllToOne),
            "all-to-all" => Ok(Mode::AllToAll),
            other => Err(Error::invalid(format!(
                "parameter `mode`: `{other}` is not one of all-to-one, all-to-all"
            ))),
        }
    }
    /// The schema spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::AllToOne => "all-to-one",
            Mode::AllToAll => "all-to-all",
        }
    }
}

/// `target`, `mode`, `poison_rate` and `adaptive`, as every attack's schema declares them
/// (see [`common_schema_properties!`](crate::common_schema_properties)).
#[derive(Debug, Clone, PartialEq)]
pub struct CommonParams {
    /// Target class (all-to-one).
    pub target: i64,
    /// Relabelling mode.
    pub mode: Mode,
    /// Poison rate the user asked for.
    pub poison_rate: f64,
    /// The low-rate adaptive setting.
    pub adaptive: bool,
}

impl CommonParams {
    /// Reads the four common parameters.
    pub fn from_params(p: &Params) -> Result<Self> {
        let target = p.i64("target")?;
        if target < 0 {
            return Err(Error::invalid(format!("parameter `target` must be >= 0, got {target}")));
        }
        let poison_rate = p.f64("poison_rate")?;
        if !(0.0..=1.0).contains(&poison_rate) {
            return Err(Error::invalid(format!(
                "parameter `poison_rate` must lie in 0..1, got {poison_rate}"
            )));
        }
        Ok(CommonParams {
            target,
            mode: Mode::parse(p.str("mode")?)?,
            poison_rate,
            adaptive: p.bool("adaptive")?,
        })
    }

    /// The rate actually used: [`ADAPTIVE_POISON_RATE`] in the adaptive setting, else `poison_rate`.
    pub fn effective_rate(&self) -> f64 {
        if self.adaptive {
            ADAPTIVE_POISON_RATE
        } else {
            self.poison_rate
        }
    }

    /// Factor on the trigger's strength: 0.5 in the adaptive setting, else 1.
    pub fn weakening(&self) -> f64 {
        if self.adaptive {
            0.5
        } else {
            1.0
        }
    }

    /// Checks the parameters against the data: a non-empty set with a non-empty image, a target
    /// below the number of classes, at least two classes for all-to-all.
    pub fn validate(&self, data: &DatasetRef<'_>) -> Result<()> {
        if data.is_empty() {
            return Err(Error::invalid("the dataset has no samples"));
        }
        let (c, h, w) = data.chw();
        if c == 0 || h == 0 || w == 0 {
            return Err(Error::invalid(format!(
                "images have an empty shape {:?}",
                data.images.shape
            )));
        }
        if self.target as usize >= data.num_classes {
            return Err(Error::invalid(format!(
                "parameter `target` is {} but the dataset has {} classes (0..{})",
                self.target, data.num_classes, data.num_classes
            )));
        }
        if self.mode == Mode::AllToAll && data.num_classes < 2 {
            return Err(Error::invalid("mode all-to-all needs at least 2 classes"));
        }
        Ok(())
    }

    /// The label the attack wants for a sample whose true label is `y`, with `num_classes` classes.
    pub fn target_label(&self, y: i64, num_classes: usize) -> i64 {
        match self.mode {
            Mode::AllToOne => self.target,
            Mode::AllToAll => (y + 1).rem_euclid(num_classes as i64),
        }
    }

    /// The effective common parameters, for reports.
    pub fn report(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("mode".into(), self.mode.as_str().into());
        let target = match self.mode {
            Mode::AllToOne => Value::from(self.target),
            Mode::AllToAll => Value::Null,
        };
        m.insert("target".into(), target);
        m.insert("adaptive".into(), self.adaptive.into());
        m.insert("poison_rate".into(), self.poison_rate.into());
        m.insert("effective_poison_rate".into(), self.effective_rate().into());
        m
    }
}

fn properties(schema: &Value) -> std::result::Result<&Map<String, Value>, String> {
    schema
        .get("properties")
        .and_then(Value::as_object)
        .ok_or_else(|| "schema has no `properties` object".to_string())
}

fn parse_schema(schema: &str) -> std::result::Result<Value, String> {
    audit_sdk::serde_json::from_str(schema).map_err(|e| format!("schema is not valid JSON: {e}"))
}

/// Checks `value` against one property schema; integral floats are turned into integers for
/// `"type":"integer"`.
fn check_value(key: &str, prop: &Value, value: &Value) -> std::result::Result<Value, String> {
    let ty = prop.get("type").and_then(Value::as_str).unwrap_or("");
    let value = match ty {
        "number" if value.is_number() => value.clone(),
        "integer" if value.is_i64() || value.is_u64() => value.clone(),
        "integer" if value.as_f64().is_some_and(|f| f.fract() == 0.0 && f.abs() < 9.0e15) => {
            Value::from(value.as_f64().unwrap_or_default() as i64)
        }
        "boolean" if value.is_boolean() => value.clone(),
        "string" if value.is_string() => value.clone(),
        "number" | "integer" | "boolean" | "string" => {
            return Err(format!("parameter `{key}` must be of type {ty}, got {value}"))
        }
        other => return Err(format!("parameter `{key}`: unsupported schema type `{other}`")),
    };
    if let Some(x) = value.as_f64() {
        if let Some(min) = prop.get("minimum").and_then(Value::as_f64) {
            if x < min {
                return Err(format!("parameter `{key}` must be >= {min}, got {value}"));
            }
        }
        if let Some(max) = prop.get("maximum").and_then(Value::as_f64) {
            if x > max {
                return Err(format!("parameter `{key}` must be <= {max}, got {value}"));
            }
        }
    }
    if let Some(options) = prop.get("enum").and_then(Value::as_array) {
        if !options.contains(&value) {
            let list: Vec<String> = options.iter().map(|o| o.to_string()).collect();
            return Err(format!(
                "parameter `{key}` must be one of {}, got {value}",
                list.join(", ")
            ));
        }
    }
    Ok(value)
}

/// Resolves `given` against `schema`: rejects unknown keys, fills every missing key with its
/// `default`, and checks type, `minimum`, `maximum` and `enum`. A broken schema is a plugin bug
/// ([`Error::failed`]); a bad value is [`Error::invalid`] naming the parameter.
pub fn resolve_params(schema: &str, given: &Params) -> Result<Params> {
    let schema = parse_schema(schema).map_err(|e| Error::failed(format!("plugin bug: {e}")))?;
    let props = properties(&schema).map_err(|e| Error::failed(format!("plugin bug: {e}")))?;
    if let Some(key) = given.0.keys().find(|k| !props.contains_key(*k)) {
        let known: Vec<&str> = props.keys().map(String::as_str).collect();
        return Err(Error::invalid(format!(
            "unknown parameter `{key}` (known: {})",
            known.join(", ")
        )));
    }
    let mut out = Map::new();
    for (key, prop) in props {
        let value = match given.0.get(key).or_else(|| prop.get("default")) {
            Some(v) => check_value(key, prop, v).map_err(Error::invalid)?,
            None => return Err(Error::failed(format!("plugin bug: parameter `{key}` has no default"))),
        };
        out.insert(key.clone(), value);
    }
    Ok(Params(out))
}

/// Checks that `schema` is the subset the host understands: a top-level object with
/// `"additionalProperties": false`, and for every property a known `type`, a non-empty
/// `description`, and a `default` that satisfies the property's own constraints (as do its `enum`
/// entries).
pub fn check_schema(schema: &str) -> std::result::Result<(), String> {
    let schema = parse_schema(schema)?;
    if schema.get("type").and_then(Value::as_str) != Some("object") {
        return Err("top level must have \"type\": \"object\"".into());
    }
    if schema.get("additionalProperties") != Some(&Value::Bool(false)) {
        return Err("top level must have \"additionalProperties\": false".into());
    }
    for (key, prop) in properties(&schema)? {
        if prop
            .get("description")
            .and_then(Value::as_str)
            .is_none_or(|d| d.trim().is_empty())
        {
            return Err(format!("parameter `{key}` has no description"));
        }
        let default = prop
            .get("default")
            .ok_or_else(|| format!("parameter `{key}` has no default"))?;
        check_value(key, prop, default).map_err(|e| format!("default: {e}"))?;
        for option in prop.get("enum").and_then(Value::as_array).into_iter().flatten() {
            check_value(key, prop, option).map_err(|e| format!("enum: {e}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use audit_sdk::serde_json::json;

    const SCHEMA: &str = concat!(
        r#"{"type":"object","additionalProperties":false,"properties":{"#,
        crate::common_schema_properties!(0.05),
        r#","size":{"type":"integer","default":3,"minimum":1,"description":"x"}}}"#
    );

    fn given(v: Value) -> Params {
        Params(v.as_object().cloned().unwrap())
    }

    #[test]
    fn defaults_are_filled_and_overrides_kept() {
        check_schema(SCHEMA).unwrap();
        let p = resolve_params(SCHEMA, &given(json!({"target": 2, "size": 5.0}))).unwrap();
        assert_eq!(p.i64("target").unwrap(), 2);
        assert_eq!(p.i64("size").unwrap(), 5, "integral float normalised to an integer");
        assert_eq!(p.f64("poison_rate").unwrap(), 0.05);
        let c = CommonParams::from_params(&p).unwrap();
        assert_eq!(c.mode, Mode::AllToOne);
        assert!(!c.adaptive);
        assert_eq!(c.effective_rate(), 0.05);
    }

    #[test]
    fn bad_values_are_invalid_and_name_the_parameter() {
        for (v, word) in [
            (json!({"nope": 1}), "nope"),
            (json!({"poison_rate": 1.5}), "poison_rate"),
            (json!({"mode": "one-to-one"}), "mode"),
            (json!({"size": 0}), "size"),
            (json!({"adaptive": "yes"}), "adaptive"),
            (json!({"target": 1.5}), "target"),
        ] {
            let e = resolve_params(SCHEMA, &given(v)).unwrap_err();
            assert_eq!(e.status, audit_sdk::Status::InvalidInput);
            assert!(e.message.contains(word), "{}", e.message);
        }
    }

    #[test]
    fn check_schema_rejects_incomplete_properties() {
        let no_default =
            r#"{"type":"object","additionalProperties":false,"properties":{"a":{"type":"integer","description":"d"}}}"#;
        assert!(check_schema(no_default).unwrap_err().contains("default"));
        let bad_default = r#"{"type":"object","additionalProperties":false,"properties":{"a":{"type":"integer","default":-1,"minimum":0,"description":"d"}}}"#;
        assert!(check_schema(bad_default).is_err());
        let open = r#"{"type":"object","properties":{}}"#;
        assert!(check_schema(open).is_err());
    }

    #[test]
    fn adaptive_overrides_rate_and_labels_follow_mode() {
        let p = resolve_params(SCHEMA, &given(json!({"adaptive": true, "mode": "all-to-all"}))).unwrap();
        let c = CommonParams::from_params(&p).unwrap();
        assert_eq!(c.effective_rate(), ADAPTIVE_POISON_RATE);
        assert_eq!(c.weakening(), 0.5);
        assert_eq!(c.target_label(3, 10), 4);
        assert_eq!(c.target_label(9, 10), 0);
        assert_eq!(c.report()["target"], Value::Null);
    }
}
