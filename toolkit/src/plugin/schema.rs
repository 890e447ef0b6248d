//! Plugin parameter schemas (a JSON Schema subset) and validation of `--param k=v` against them.
//!
//! A schema is `{"type":"object","properties":{NAME: PROP, ...}}`, each PROP having `type`
//! (`number`, `integer`, `boolean`, `string`), a `default` of that type, and optionally
//! `minimum`, `maximum`, `enum` and `description`. The host checks the schema when it loads the
//! plugin and validates every call's parameters before the plugin sees them.

use serde_json::{Map, Value};

/// The type of one parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    Number,
    Integer,
    Boolean,
    String,
}

impl ParamType {
    fn name(self) -> &'static str {
        match self {
            ParamType::Number => "number",
            ParamType::Integer => "integer",
            ParamType::Boolean => "boolean",
            ParamType::String => "string",
        }
    }

    fn accepts(self, v: &Value) -> bool {
        match self {
            ParamType::Number => v.is_number(),
            ParamType::Integer => v.is_i64() || v.is_u64(),
            ParamType::Boolean => v.is_boolean(),
            ParamType::String => v.is_string(),
        }
    }
}

/// One parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: String,
    pub ty: ParamType,
    pub default: Value,
    pub minimum: Option<f64>,
    pub maximum: Option<f64>,
    pub choices: Option<Vec<Value>>,
    pub description: String,
}

/// A parsed, checked schema; parameters keep the schema's order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Schema {
    pub params: Vec<Param>,
}

impl Schema {
    /// Parses and checks a schema string. The error says what is wrong (the caller adds the file).
    pub fn parse(text: &str) -> Result<Schema, String> {
        if text.trim().is_empty() {
            return Ok(Schema::default());
        }
        let v: Value = serde_json::from_str(text).map_err(|e| format!("parameter schema is not valid JSON: {e}"))?;
        let obj = v.as_object().ok_or("parameter schema is not a JSON object")?;
        if let Some(t) = obj.get("type") {
            if t != "object" {
                return Err(format!("parameter schema must have \"type\": \"object\", found {t}"));
            }
        }
        let Some(props) = obj.get("properties") else {
            return Ok(Schema::default());
        };
        let props = props
            .as_object()
            .ok_or("parameter schema: \"properties\" is not an object")?;
        let mut params = Vec::with_capacity(props.len());
        for (name, p) in props {
            let p = p
                .as_object()
                .ok_or_else(|| format!("parameter `{name}`: schema is not an object"))?;
            let ty = match p.get("type").and_then(Value::as_str) {
                Some("number") => ParamType::Number,
                Some("integer") => ParamType::Integer,
                Some("boolean") => ParamType::Boolean,
                Some("string") => ParamType::String,
                other => {
                    return Err(format!(
                        "parameter `{name}`: type {} is not one of number, integer, boolean, string",
                        other.map(|s| format!("\"{s}\"")).unwrap_or_else(|| "(missing)".into())
                    ))
                }
            };
            let default = p
                .get("default")
                .cloned()
                .ok_or_else(|| format!("parameter `{name}`: no default"))?;
            if !ty.accepts(&default) {
                return Err(format!("parameter `{name}`: default {default} is not a {}", ty.name()));
            }
            let num = |k: &str| -> Result<Option<f64>, String> {
                match p.get(k) {
                    None => Ok(None),
                    Some(v) => v
                        .as_f64()
                        .map(Some)
                        .ok_or_else(|| format!("parameter `{name}`: {k} is not a number")),
                }
            };
            let choices = match p.get("enum") {
                None => None,
                Some(Value::Array(a)) if !a.is_empty() && a.iter().all(|c| ty.accepts(c)) => Some(a.clone()),
                Some(_) => {
                    return Err(format!(
                        "parameter `{name}`: enum must be a non-empty array of {}",
                        ty.name()
                    ))
                }
            };
            let param = Param {
                name: name.clone(),
                ty,
                default,
                minimum: num("minimum")?,
                maximum: num("maximum")?,
                choices,
                description: p.get("description").and_then(Value::as_str).unwrap_or("").to_string(),
            };
            param.check(&param.default).map_err(|e| format!("default of {e}"))?;
            params.push(param);
        }
        Ok(Schema { params })
    }

    fn get(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
    }

    /// Turns `key=value` strings into a JSON object with every default filled in. Errors name the key.
    pub fn resolve(&self, assignments: &[String]) -> Result<Map<String, Value>, String> {
        let mut out: Map<String, Value> = self
            .params
            .iter()
            .map(|p| (p.name.clone(), p.default.clone()))
            .collect();
        for a in assignments {
            let (key, raw) = a
                .split_once('=')
                .ok_or_else(|| format!("--param `{a}`: expected KEY=VALUE"))?;
            let key = key.trim();
            let Some(param) = self.get(key) else {
                let known: Vec<&str> = self.params.iter().map(|p| p.name.as_str()).collect();
                return Err(if known.is_empty() {
                    format!("unknown parameter `{key}`: this plugin takes no parameters")
                } else {
                    format!("unknown parameter `{key}` (known: {})", known.join(", "))
                });
            };
            let value = param.parse(raw)?;
            param.check(&value)?;
            out.insert(key.to_string(), value);
        }
        Ok(out)
    }
}

impl Param {
    fn parse(&self, raw: &str) -> Result<Value, String> {
        let name = &self.name;
        let bad = || format!("parameter `{name}`: `{raw}` is not a {}", self.ty.name());
        Ok(match self.ty {
            ParamType::Integer => Value::from(raw.trim().parse::<i64>().map_err(|_| bad())?),
            ParamType::Number => {
                let x = raw.trim().parse::<f64>().map_err(|_| bad())?;
                if !x.is_finite() {
                    return Err(bad());
                }
                Value::from(x)
            }
            ParamType::Boolean => match raw.trim() {
                "true" | "1" | "yes" => Value::Bool(true),
                "false" | "0" | "no" => Value::Bool(false),
                _ => return Err(bad()),
            },
            ParamType::String => Value::String(raw.to_string()),
        })
    }

    /// Checks a value against type, range and enum.
    pub fn check(&self, v: &Value) -> Result<(), String> {
        let name = &self.name;
        if !self.ty.accepts(v) {
            return Err(format!("parameter `{name}`: {v} is not a {}", self.ty.name()));
        }
        if let Some(x) = v.as_f64() {
            if let Some(min) = self.minimum.filter(|&m| x < m) {
                return Err(format!("parameter `{name}`: {v} is below the minimum {min}"));
            }
            if let Some(max) = self.maximum.filter(|&m| x > m) {
                return Err(format!("parameter `{name}`: {v} is above the maximum {max}"));
            }
        }
        if let Some(choices) = &self.choices {
            if !choices.contains(v) {
                let list: Vec<String> = choices.iter().map(|c| c.to_string()).collect();
                return Err(format!("parameter `{name}`: {v} is not one of {}", list.join(", ")));
            }
        }
        Ok(())
    }

    /// Type plus constraints, for `plugins info`.
    pub fn type_summary(&self) -> String {
        let mut s = self.ty.name().to_string();
        match (self.minimum, self.maximum) {
            (Some(a), Some(b)) => s += &format!(" in [{a}, {b}]"),
            (Some(a), None) => s += &format!(" >= {a}"),
            (None, Some(b)) => s += &format!(" <= {b}"),
            (None, None) => {}
        }
        if let Some(c) = &self.choices {
            let list: Vec<String> = c.iter().map(|c| c.to_string()).collect();
            s += &format!(" one of {}", list.join("|"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = r#"{"type":"object","properties":{
        "target":{"type":"integer","default":0,"minimum":0,"description":"target class"},
        "rate":{"type":"number","default":0.05,"minimum":0,"maximum":1},
        "mode":{"type":"string","default":"all-to-one","enum":["all-to-one","all-to-all"]},
        "adaptive":{"type":"boolean","default":false}}}"#;

    #[test]
    fn fills_defaults_and_parses_types() {
        let s = Schema::parse(SCHEMA).unwrap();
        let m = s
            .resolve(&["target=3".into(), "rate=0.1".into(), "adaptive=true".into()])
            .unwrap();
        assert_eq!(m["target"], 3);
        assert_eq!(m["rate"], 0.1);
        assert_eq!(m["mode"], "all-to-one");
        assert_eq!(m["adaptive"], true);
    }

    #[test]
    fn errors_name_the_key() {
        let s = Schema::parse(SCHEMA).unwrap();
        let e = s.resolve(&["colour=1".into()]).unwrap_err();
        assert!(
            e.contains("unknown parameter `colour`") && e.contains("target, rate, mode, adaptive"),
            "{e}"
        );
        let e = s.resolve(&["target=x".into()]).unwrap_err();
        assert!(e.contains("`target`") && e.contains("not a integer"), "{e}");
        let e = s.resolve(&["rate=1.5".into()]).unwrap_err();
        assert!(e.contains("`rate`") && e.contains("above the maximum 1"), "{e}");
        let e = s.resolve(&["target=-1".into()]).unwrap_err();
        assert!(e.contains("below the minimum 0"), "{e}");
        let e = s.resolve(&["mode=some".into()]).unwrap_err();
        assert!(e.contains("not one of"), "{e}");
        let e = s.resolve(&["rate".into()]).unwrap_err();
        assert!(e.contains("KEY=VALUE"), "{e}");
        let e = s.resolve(&["rate=NaN".into()]).unwrap_err();
        assert!(e.contains("not a number"), "{e}");
    }

    #[test]
    fn bad_schemas_are_refused_with_a_reason() {
        assert!(Schema::parse("{\"type\": \"object\", properties: oops")
            .unwrap_err()
            .contains("not valid JSON"));
        assert!(Schema::parse("[1]").unwrap_err().contains("not a JSON object"));
        assert!(Schema::parse(r#"{"properties":{"a":{"type":"float","default":1}}}"#)
            .unwrap_err()
            .contains("`a`"));
        assert!(Schema::parse(r#"{"properties":{"a":{"type":"integer"}}}"#)
            .unwrap_err()
            .contains("no default"));
        assert!(Schema::parse(r#"{"properties":{"a":{"type":"integer","default":"x"}}}"#).is_err());
        assert!(Schema::parse(r#"{"properties":{"a":{"type":"integer","default":5,"maximum":2}}}"#).is_err());
        assert_eq!(Schema::parse("").unwrap(), Schema::default());
    }
}
