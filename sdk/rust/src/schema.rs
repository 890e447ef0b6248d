//! The parameter schema: the one JSON Schema subset every plugin declares, and the one
//! implementation that checks it and resolves parameters against it. The host uses it when it
//! loads a plugin and before every call (`--param KEY=VALUE`); plugins use it through
//! [`Params::resolve`](crate::Params::resolve) and in their tests.
//!
//! A schema is
//!
//! ```json
//! {"type": "object", "additionalProperties": false, "properties": {NAME: PROP, ...}}
//! ```
//!
//! and every PROP has
//!
//! - `type`: `number`, `integer`, `boolean` or `string` (an integer is a JSON integer: `5`, not
//!   `5.0`);
//! - `default`: a value of that type that meets the property's own constraints;
//! - `description`: a non-empty string (shown by `audit plugins info`);
//! - optionally `minimum` and `maximum` (numbers, only for `number` and `integer`, minimum not
//!   above maximum) and `enum` (a non-empty array of values of the type, each within the bounds).
//!
//! [`Schema::parse`] refuses anything else with a reason naming the parameter. Resolving fills
//! every missing parameter with its default, refuses unknown keys (hence the required
//! `"additionalProperties": false`), and checks type, bounds and `enum`; its errors name the
//! parameter.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

/// The type of one parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    /// A finite JSON number.
    Number,
    /// A JSON integer (`i64` or `u64`).
    Integer,
    /// `true` or `false`.
    Boolean,
    /// A string.
    String,
}

impl ParamType {
    /// The schema's spelling.
    pub fn name(self) -> &'static str {
        match self {
            ParamType::Number => "number",
            ParamType::Integer => "integer",
            ParamType::Boolean => "boolean",
            ParamType::String => "string",
        }
    }

    /// "a number", "an integer", ... for messages.
    fn a(self) -> &'static str {
        match self {
            ParamType::Number => "a number",
            ParamType::Integer => "an integer",
            ParamType::Boolean => "a boolean",
            ParamType::String => "a string",
        }
    }

    fn from_name(name: &str) -> Option<ParamType> {
        Some(match name {
            "number" => ParamType::Number,
            "integer" => ParamType::Integer,
            "boolean" => ParamType::Boolean,
            "string" => ParamType::String,
            _ => return None,
        })
    }

    /// Whether `v` is a value of this type.
    pub fn accepts(self, v: &Value) -> bool {
        match self {
            ParamType::Number => v.is_number(),
            ParamType::Integer => v.is_i64() || v.is_u64(),
            ParamType::Boolean => v.is_boolean(),
            ParamType::String => v.is_string(),
        }
    }

    fn is_numeric(self) -> bool {
        matches!(self, ParamType::Number | ParamType::Integer)
    }
}

/// One parameter of a schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// Its key.
    pub name: String,
    /// Its type.
    pub ty: ParamType,
    /// Its default (of type `ty`, within the constraints).
    pub default: Value,
    /// Inclusive lower bound (numbers and integers).
    pub minimum: Option<f64>,
    /// Inclusive upper bound (numbers and integers).
    pub maximum: Option<f64>,
    /// The allowed values (`enum`), in the schema's order.
    pub choices: Option<Vec<Value>>,
    /// What it means.
    pub description: String,
}

/// A parsed, checked schema; parameters keep the schema's order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Schema {
    /// The parameters, in the schema's order.
    pub params: Vec<Param>,
}

/// Why a schema was refused (a bug of the plugin that declares it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    /// The parameter whose declaration is wrong, if the fault is in one.
    pub param: Option<String>,
    /// What is wrong.
    pub reason: String,
}

impl SchemaError {
    fn top(reason: impl Into<String>) -> Self {
        SchemaError {
            param: None,
            reason: reason.into(),
        }
    }
    fn at(param: &str, reason: impl Into<String>) -> Self {
        SchemaError {
            param: Some(param.to_string()),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.param {
            Some(p) => write!(f, "parameter schema: parameter `{p}`: {}", self.reason),
            None => write!(f, "parameter schema: {}", self.reason),
        }
    }
}

impl std::error::Error for SchemaError {}

/// Why given parameters were refused (the user can fix it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamError {
    /// A key the schema does not declare.
    Unknown {
        /// The key.
        name: String,
        /// The schema's keys, in order.
        known: Vec<String>,
    },
    /// A value of the wrong type, out of bounds or not in the `enum`.
    Invalid {
        /// The parameter.
        name: String,
        /// What is wrong with the value.
        reason: String,
    },
    /// A command-line assignment without `=`.
    Syntax {
        /// The assignment as given.
        arg: String,
    },
}

impl ParamError {
    /// The parameter the error is about (`None` for a malformed assignment).
    pub fn param(&self) -> Option<&str> {
        match self {
            ParamError::Unknown { name, .. } | ParamError::Invalid { name, .. } => Some(name),
            ParamError::Syntax { .. } => None,
        }
    }
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamError::Unknown { name, known } if known.is_empty() => {
                write!(f, "unknown parameter `{name}`: this plugin takes no parameters")
            }
            ParamError::Unknown { name, known } => {
                write!(f, "unknown parameter `{name}` (known: {})", known.join(", "))
            }
            ParamError::Invalid { name, reason } => write!(f, "parameter `{name}`: {reason}"),
            ParamError::Syntax { arg } => write!(f, "parameter `{arg}`: expected KEY=VALUE"),
        }
    }
}

impl std::error::Error for ParamError {}

fn list(values: &[Value]) -> String {
    values.iter().map(Value::to_string).collect::<Vec<_>>().join(", ")
}

impl Schema {
    /// Parses and checks a schema (see the [module](self) for the rules).
    pub fn parse(text: &str) -> Result<Schema, SchemaError> {
        if text.trim().is_empty() {
            return Err(SchemaError::top(
                "is empty; a plugin without parameters declares {\"type\":\"object\",\"additionalProperties\":false,\"properties\":{}}",
            ));
        }
        let v: Value = serde_json::from_str(text).map_err(|e| SchemaError::top(format!("is not valid JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| SchemaError::top("is not a JSON object"))?;
        match obj.get("type") {
            Some(t) if t == "object" => {}
            Some(t) => return Err(SchemaError::top(format!("\"type\" must be \"object\", found {t}"))),
            None => return Err(SchemaError::top("the top level must have \"type\": \"object\"")),
        }
        if obj.get("additionalProperties") != Some(&Value::Bool(false)) {
            return Err(SchemaError::top(
                "the top level must have \"additionalProperties\": false (unknown parameters are refused)",
            ));
        }
        let props = match obj.get("properties") {
            Some(Value::Object(p)) => p,
            Some(_) => return Err(SchemaError::top("\"properties\" is not an object")),
            None => return Err(SchemaError::top("no \"properties\" object")),
        };
        let params = props
            .iter()
            .map(|(name, p)| Param::parse(name, p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Schema { params })
    }

    /// The parameter named `name`.
    pub fn param(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
    }

    fn unknown(&self, name: &str) -> ParamError {
        ParamError::Unknown {
            name: name.to_string(),
            known: self.params.iter().map(|p| p.name.clone()).collect(),
        }
    }

    /// Resolves given JSON values: refuses unknown keys, checks every given value, and fills
    /// every missing parameter with its default. The result has the schema's order.
    pub fn resolve(&self, given: &Map<String, Value>) -> Result<Map<String, Value>, ParamError> {
        if let Some(key) = given.keys().find(|k| self.param(k).is_none()) {
            return Err(self.unknown(key));
        }
        self.params
            .iter()
            .map(|p| {
                let v = given.get(&p.name).unwrap_or(&p.default);
                p.check(v)?;
                Ok((p.name.clone(), v.clone()))
            })
            .collect()
    }

    /// Resolves command-line assignments `KEY=VALUE` (each value read as its parameter's type; a
    /// later assignment of a key wins), then as [`Schema::resolve`].
    pub fn resolve_args<S: AsRef<str>>(&self, args: &[S]) -> Result<Map<String, Value>, ParamError> {
        let mut given = Map::new();
        for a in args {
            let a = a.as_ref();
            let (key, raw) = a
                .split_once('=')
                .ok_or_else(|| ParamError::Syntax { arg: a.to_string() })?;
            let key = key.trim();
            let param = self.param(key).ok_or_else(|| self.unknown(key))?;
            given.insert(key.to_string(), param.parse_arg(raw)?);
        }
        self.resolve(&given)
    }
}

impl Param {
    fn parse(name: &str, p: &Value) -> Result<Param, SchemaError> {
        let bad = |reason: String| SchemaError::at(name, reason);
        let p = p.as_object().ok_or_else(|| bad("is not an object".into()))?;
        let ty = match p.get("type") {
            Some(Value::String(t)) => ParamType::from_name(t),
            _ => None,
        }
        .ok_or_else(|| {
            bad(format!(
                "type {} is not one of number, integer, boolean, string",
                p.get("type").map_or_else(|| "(missing)".to_string(), Value::to_string)
            ))
        })?;
        let description = match p.get("description") {
            Some(Value::String(d)) if !d.trim().is_empty() => d.clone(),
            Some(Value::String(_)) | None => return Err(bad("has no description".into())),
            Some(d) => return Err(bad(format!("description {d} is not a string"))),
        };
        let default = p.get("default").cloned().ok_or_else(|| bad("has no default".into()))?;
        let bound = |k: &str| -> Result<Option<f64>, SchemaError> {
            match p.get(k) {
                None => Ok(None),
                Some(_) if !ty.is_numeric() => Err(bad(format!(
                    "{k} applies only to number and integer, not {}",
                    ty.name()
                ))),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| bad(format!("{k} {v} is not a number"))),
            }
        };
        let (minimum, maximum) = (bound("minimum")?, bound("maximum")?);
        if let (Some(lo), Some(hi)) = (minimum, maximum) {
            if lo > hi {
                return Err(bad(format!("minimum {lo} is above maximum {hi}")));
            }
        }
        let choices = match p.get("enum") {
            None => None,
            Some(Value::Array(a)) if !a.is_empty() => Some(a.clone()),
            Some(_) => return Err(bad(format!("enum must be a non-empty array of {} values", ty.name()))),
        };
        let mut param = Param {
            name: name.to_string(),
            ty,
            default,
            minimum,
            maximum,
            choices: None,
            description,
        };
        // The enum's entries meet the type and the bounds; the default meets all three.
        for c in choices.iter().flatten() {
            param.check(c).map_err(|e| bad(format!("enum entry: {}", reason(e))))?;
        }
        param.choices = choices;
        param
            .check(&param.default)
            .map_err(|e| bad(format!("default: {}", reason(e))))?;
        Ok(param)
    }

    fn invalid(&self, reason: String) -> ParamError {
        ParamError::Invalid {
            name: self.name.clone(),
            reason,
        }
    }

    /// Reads a command-line value as this parameter's type (booleans: true/false, 1/0, yes/no).
    pub fn parse_arg(&self, raw: &str) -> Result<Value, ParamError> {
        let bad = || self.invalid(format!("`{raw}` is not {}", self.ty.a()));
        let t = raw.trim();
        Ok(match self.ty {
            ParamType::Integer => match t.parse::<i64>() {
                Ok(i) => Value::from(i),
                Err(_) => Value::from(t.parse::<u64>().map_err(|_| bad())?),
            },
            ParamType::Number => {
                let x = t.parse::<f64>().map_err(|_| bad())?;
                if !x.is_finite() {
                    return Err(bad());
                }
                Value::from(x)
            }
            ParamType::Boolean => match t {
                "true" | "1" | "yes" => Value::Bool(true),
                "false" | "0" | "no" => Value::Bool(false),
                _ => return Err(bad()),
            },
            ParamType::String => Value::String(raw.to_string()),
        })
    }

    /// Checks a value against the type, the bounds and the `enum`.
    pub fn check(&self, v: &Value) -> Result<(), ParamError> {
        if !self.ty.accepts(v) {
            return Err(self.invalid(format!("{v} is not {}", self.ty.a())));
        }
        if let Some(x) = v.as_f64().filter(|_| self.ty.is_numeric()) {
            if let Some(min) = self.minimum.filter(|&m| x < m) {
                return Err(self.invalid(format!("{v} is below the minimum {min}")));
            }
            if let Some(max) = self.maximum.filter(|&m| x > m) {
                return Err(self.invalid(format!("{v} is above the maximum {max}")));
            }
        }
        if let Some(choices) = &self.choices {
            if !choices.contains(v) {
                return Err(self.invalid(format!("{v} is not one of {}", list(choices))));
            }
        }
        Ok(())
    }

    /// Type plus constraints, for `audit plugins info`: `number in [0, 1]`, `string one of "a"|"b"`.
    pub fn type_summary(&self) -> String {
        let mut s = self.ty.name().to_string();
        match (self.minimum, self.maximum) {
            (Some(a), Some(b)) => s += &format!(" in [{a}, {b}]"),
            (Some(a), None) => s += &format!(" >= {a}"),
            (None, Some(b)) => s += &format!(" <= {b}"),
            (None, None) => {}
        }
        if let Some(c) = &self.choices {
            let list: Vec<String> = c.iter().map(Value::to_string).collect();
            s += &format!(" one of {}", list.join("|"));
        }
        s
    }
}

/// The reason of an error about a parameter, without the parameter's name.
fn reason(e: ParamError) -> String {
    match e {
        ParamError::Invalid { reason, .. } => reason,
        other => other.to_string(),
    }
}

/// The variant names a Rust enum deserializes from (its `#[serde(rename...)]` spellings), or
/// `None` when `T` does not deserialize as an enum.
pub fn enum_variants<'de, T: Deserialize<'de>>() -> Option<&'static [&'static str]> {
    match T::deserialize(VariantProbe) {
        Err(Probe::Variants(v)) => Some(v),
        _ => None,
    }
}

/// For a plugin's tests: a value of enum parameter `name` outside the schema's `enum`, given
/// straight to the plugin's parameter struct `P` (as a host that skipped the schema would), is an
/// `InvalidInput` error naming the parameter and the unknown variant, never a silent fallback.
pub fn check_refused<P: serde::de::DeserializeOwned>(schema: &str, name: &str) -> Result<(), String> {
    let mut given = crate::Params(Map::new())
        .resolve(schema)
        .map_err(|e| format!("the defaults do not resolve: {}", e.message))?;
    let bad = "not-a-listed-value";
    given.0.insert(name.into(), Value::from(bad));
    match given.parse::<P>() {
        Ok(_) => Err(format!("parameter `{name}`: {bad:?} was accepted")),
        Err(e) if e.status != crate::Status::InvalidInput => {
            Err(format!("parameter `{name}`: status {:?}, not InvalidInput", e.status))
        }
        Err(e)
            if !(e.message.contains(&format!("parameter `{name}`"))
                && e.message.contains(&format!("unknown variant `{bad}`"))) =>
        {
            Err(format!(
                "parameter `{name}`: the error does not name it and the value: {}",
                e.message
            ))
        }
        Err(_) => Ok(()),
    }
}

/// Checks that the `enum` of the string parameter `name` in `schema` and the Rust enum `T` that
/// the plugin deserializes it into name the same values, so no schema value is refused by the
/// plugin and no variant is unreachable. For plugins' unit tests.
pub fn check_enum<T: serde::de::DeserializeOwned>(schema: &str, name: &str) -> Result<(), String> {
    let schema = Schema::parse(schema).map_err(|e| e.to_string())?;
    let param = schema
        .param(name)
        .ok_or_else(|| format!("the schema has no parameter `{name}`"))?;
    let choices = param
        .choices
        .as_ref()
        .ok_or_else(|| format!("parameter `{name}` has no enum"))?;
    let variants = enum_variants::<T>().ok_or_else(|| format!("`{}` is not an enum", std::any::type_name::<T>()))?;
    for c in choices {
        serde_json::from_value::<T>(c.clone())
            .map_err(|e| format!("parameter `{name}`: schema value {c} does not deserialize: {e}"))?;
    }
    let mut schema_names: Vec<&str> = choices.iter().filter_map(Value::as_str).collect();
    let mut rust_names = variants.to_vec();
    schema_names.sort_unstable();
    rust_names.sort_unstable();
    if schema_names != rust_names {
        return Err(format!(
            "parameter `{name}`: the schema's enum {schema_names:?} and the variants of `{}` {rust_names:?} differ",
            std::any::type_name::<T>()
        ));
    }
    Ok(())
}

/// A deserializer that only records the variant names an enum asks for.
struct VariantProbe;

#[derive(Debug)]
enum Probe {
    Variants(&'static [&'static str]),
    Other(String),
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Variants(v) => write!(f, "variants {v:?}"),
            Probe::Other(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Probe {}

impl de::Error for Probe {
    fn custom<M: fmt::Display>(msg: M) -> Self {
        Probe::Other(msg.to_string())
    }
}

impl<'de> Deserializer<'de> for VariantProbe {
    type Error = Probe;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Probe> {
        Err(Probe::Other("not an enum".into()))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Probe> {
        Err(Probe::Variants(variants))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SCHEMA: &str = r#"{"type":"object","additionalProperties":false,"properties":{
        "target":{"type":"integer","default":0,"minimum":0,"description":"target class"},
        "rate":{"type":"number","default":0.05,"minimum":0,"maximum":1,"description":"poison rate"},
        "mode":{"type":"string","default":"all-to-one","enum":["all-to-one","all-to-all"],"description":"relabelling"},
        "adaptive":{"type":"boolean","default":false,"description":"low-rate setting"}}}"#;

    fn given(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    /// `SCHEMA` with one property replaced.
    fn with_prop(prop: &str) -> String {
        format!(r#"{{"type":"object","additionalProperties":false,"properties":{{"a":{prop}}}}}"#)
    }

    #[test]
    fn fills_defaults_and_parses_types() {
        let s = Schema::parse(SCHEMA).unwrap();
        let m = s.resolve_args(&["target=3", "rate=0.1", "adaptive=true"]).unwrap();
        assert_eq!(m["target"], 3);
        assert_eq!(m["rate"], 0.1);
        assert_eq!(m["mode"], "all-to-one");
        assert_eq!(m["adaptive"], true);
        let keys: Vec<&str> = m.keys().map(String::as_str).collect();
        assert_eq!(keys, ["target", "rate", "mode", "adaptive"], "schema order");
        let m = s.resolve(&given(json!({"mode": "all-to-all", "target": 2}))).unwrap();
        assert_eq!(
            (m["mode"].as_str(), m["target"].as_i64(), m["rate"].as_f64()),
            (Some("all-to-all"), Some(2), Some(0.05))
        );
        // Later assignments win; booleans take 1/0 and yes/no.
        let m = s.resolve_args(&["target=1", "target=4", "adaptive=yes"]).unwrap();
        assert_eq!((m["target"].as_i64(), m["adaptive"].as_bool()), (Some(4), Some(true)));
    }

    #[test]
    fn argument_errors_name_the_key() {
        let s = Schema::parse(SCHEMA).unwrap();
        let e = s.resolve_args(&["colour=1"]).unwrap_err();
        assert_eq!(e.param(), Some("colour"));
        let e = e.to_string();
        assert!(
            e.contains("unknown parameter `colour`") && e.contains("target, rate, mode, adaptive"),
            "{e}"
        );
        for (arg, words) in [
            ("target=x", &["`target`", "not an integer"][..]),
            ("target=2.0", &["`target`", "not an integer"]),
            ("rate=1.5", &["`rate`", "above the maximum 1"]),
            ("target=-1", &["`target`", "below the minimum 0"]),
            ("mode=some", &["`mode`", "not one of \"all-to-one\", \"all-to-all\""]),
            ("rate", &["`rate`", "KEY=VALUE"]),
            ("rate=NaN", &["`rate`", "not a number"]),
            ("rate=inf", &["`rate`", "not a number"]),
            ("adaptive=maybe", &["`adaptive`", "not a boolean"]),
        ] {
            let e = s.resolve_args(&[arg]).unwrap_err().to_string();
            assert!(words.iter().all(|w| e.contains(w)), "{arg}: {e}");
        }
        let none = Schema::parse(r#"{"type":"object","additionalProperties":false,"properties":{}}"#).unwrap();
        let e = none.resolve_args(&["a=1"]).unwrap_err().to_string();
        assert!(e.contains("takes no parameters"), "{e}");
    }

    #[test]
    fn json_values_are_checked_strictly() {
        let s = Schema::parse(SCHEMA).unwrap();
        for (v, word) in [
            (json!({"nope": 1}), "nope"),
            (json!({"rate": 1.5}), "rate"),
            (json!({"mode": "one-to-one"}), "mode"),
            (json!({"target": -1}), "target"),
            (json!({"adaptive": "yes"}), "adaptive"),
            (json!({"target": 1.5}), "target"),
            // An integer is a JSON integer: 2.0 is refused, not rounded.
            (json!({"target": 2.0}), "target"),
            (json!({"rate": "0.1"}), "rate"),
        ] {
            let e = s.resolve(&given(v.clone())).unwrap_err();
            assert_eq!(e.param(), Some(word), "{v}: {e}");
            assert!(e.to_string().contains(&format!("`{word}`")), "{e}");
        }
        // A number accepts integers.
        assert_eq!(s.resolve(&given(json!({"rate": 1}))).unwrap()["rate"], 1);
    }

    #[test]
    fn bad_schemas_are_refused_with_a_reason() {
        let refused = |text: &str, words: &[&str]| {
            let e = Schema::parse(text).unwrap_err().to_string();
            assert!(words.iter().all(|w| e.contains(w)), "{text}: {e}");
        };
        refused("{\"type\": \"object\", properties: oops", &["not valid JSON"]);
        refused("", &["empty"]);
        refused("[1]", &["not a JSON object"]);
        refused(
            r#"{"additionalProperties":false,"properties":{}}"#,
            &["\"type\": \"object\""],
        );
        refused(
            r#"{"type":"array","additionalProperties":false,"properties":{}}"#,
            &["\"array\""],
        );
        refused(r#"{"type":"object","properties":{}}"#, &["additionalProperties"]);
        refused(
            r#"{"type":"object","additionalProperties":true,"properties":{}}"#,
            &["additionalProperties"],
        );
        refused(r#"{"type":"object","additionalProperties":false}"#, &["properties"]);
        refused(
            r#"{"type":"object","additionalProperties":false,"properties":[]}"#,
            &["properties"],
        );
        for (prop, words) in [
            ("1", &["`a`", "not an object"][..]),
            (
                r#"{"type":"float","default":1,"description":"d"}"#,
                &["`a`", "\"float\""],
            ),
            (r#"{"default":1,"description":"d"}"#, &["`a`", "(missing)"]),
            (r#"{"type":"integer","description":"d"}"#, &["`a`", "no default"]),
            (r#"{"type":"integer","default":1}"#, &["`a`", "no description"]),
            (
                r#"{"type":"integer","default":1,"description":" "}"#,
                &["no description"],
            ),
            (r#"{"type":"integer","default":1,"description":3}"#, &["description 3"]),
            (
                r#"{"type":"integer","default":"x","description":"d"}"#,
                &["default", "not an integer"],
            ),
            (
                r#"{"type":"integer","default":1.0,"description":"d"}"#,
                &["default", "not an integer"],
            ),
            (
                r#"{"type":"integer","default":5,"maximum":2,"description":"d"}"#,
                &["default", "above the maximum 2"],
            ),
            (
                r#"{"type":"integer","default":-1,"minimum":0,"description":"d"}"#,
                &["default", "below the minimum"],
            ),
            (
                r#"{"type":"number","default":1,"minimum":"0","description":"d"}"#,
                &["minimum \"0\" is not a number"],
            ),
            (
                r#"{"type":"number","default":1,"minimum":2,"maximum":0,"description":"d"}"#,
                &["minimum 2 is above maximum 0"],
            ),
            (
                r#"{"type":"string","default":"x","minimum":0,"description":"d"}"#,
                &["minimum applies only"],
            ),
            (
                r#"{"type":"string","default":"x","enum":[],"description":"d"}"#,
                &["non-empty array"],
            ),
            (
                r#"{"type":"string","default":"x","enum":"x","description":"d"}"#,
                &["non-empty array"],
            ),
            (
                r#"{"type":"string","default":"x","enum":["x",1],"description":"d"}"#,
                &["enum entry", "not a string"],
            ),
            (
                r#"{"type":"integer","default":1,"minimum":0,"enum":[1,-1],"description":"d"}"#,
                &["enum entry", "below the minimum"],
            ),
            (
                r#"{"type":"string","default":"z","enum":["x","y"],"description":"d"}"#,
                &["default", "not one of"],
            ),
        ] {
            refused(&with_prop(prop), words);
        }
        let ok = Schema::parse(&with_prop(
            r#"{"type":"number","default":1,"minimum":1,"maximum":1,"description":"d"}"#,
        ))
        .unwrap();
        assert_eq!(ok.params[0].type_summary(), "number in [1, 1]");
        let e = Schema::parse(&with_prop(r#"{"type":"integer"}"#)).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("a"));
    }

    #[test]
    fn summaries_show_the_constraints() {
        let s = Schema::parse(SCHEMA).unwrap();
        let sums: Vec<String> = s.params.iter().map(Param::type_summary).collect();
        assert_eq!(
            sums,
            [
                "integer >= 0",
                "number in [0, 1]",
                "string one of \"all-to-one\"|\"all-to-all\"",
                "boolean"
            ]
        );
        assert_eq!(s.param("target").unwrap().description, "target class");
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "kebab-case")]
    enum Mode {
        AllToOne,
        AllToAll,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    enum Short {
        AllToOne,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Spelled {
        AllToOne,
        AllToAll,
    }

    #[test]
    fn enums_are_compared_with_the_schema() {
        assert_eq!(enum_variants::<Mode>(), Some(&["all-to-one", "all-to-all"][..]));
        assert_eq!(enum_variants::<String>(), None);
        check_enum::<Mode>(SCHEMA, "mode").unwrap();
        let e = check_enum::<Short>(SCHEMA, "mode").unwrap_err();
        assert!(e.contains("does not deserialize") && e.contains("all-to-all"), "{e}");
        let e = check_enum::<Spelled>(SCHEMA, "mode").unwrap_err();
        assert!(e.contains("does not deserialize"), "{e}");
        let wide = SCHEMA.replace(r#"["all-to-one","all-to-all"]"#, r#"["all-to-one"]"#);
        let e = check_enum::<Mode>(&wide, "mode").unwrap_err();
        assert!(e.contains("differ"), "{e}");
        assert!(check_enum::<Mode>(SCHEMA, "rate").unwrap_err().contains("no enum"));
        assert!(check_enum::<Mode>(SCHEMA, "colour")
            .unwrap_err()
            .contains("no parameter"));
    }

    #[derive(Debug, Deserialize)]
    struct Typed {
        #[allow(dead_code)]
        mode: Mode,
    }

    #[derive(Debug, Deserialize)]
    struct Stringly {
        #[allow(dead_code)]
        mode: String,
    }

    #[test]
    fn unlisted_values_are_refused_by_typed_parameters_only() {
        check_refused::<Typed>(SCHEMA, "mode").unwrap();
        let e = check_refused::<Stringly>(SCHEMA, "mode").unwrap_err();
        assert!(e.contains("was accepted"), "{e}");
    }
}
