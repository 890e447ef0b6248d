//! The parameters of a call, and their typed reading: errors name the parameter.

use std::fmt;

use serde::de::value::MapDeserializer;
use serde::de::{self, DeserializeOwned, Deserializer, IntoDeserializer, Visitor};
use serde_json::{Map, Value};

use crate::schema::Schema;
use crate::{Error, Result};

/// The parameters of a call: a JSON object validated by the host against the schema, defaults
/// filled in. The getters fail with [`Status::InvalidInput`](crate::Status::InvalidInput) naming
/// the key.
#[derive(Debug, Clone)]
pub struct Params(pub Map<String, Value>);

impl Params {
    fn raw(&self, key: &str) -> Result<&Value> {
        self.0
            .get(key)
            .ok_or_else(|| Error::invalid(format!("parameter `{key}` is missing")))
    }
    /// A number parameter.
    pub fn f64(&self, key: &str) -> Result<f64> {
        self.raw(key)?
            .as_f64()
            .ok_or_else(|| Error::invalid(format!("parameter `{key}` must be a number")))
    }
    /// An integer parameter.
    pub fn i64(&self, key: &str) -> Result<i64> {
        self.raw(key)?
            .as_i64()
            .ok_or_else(|| Error::invalid(format!("parameter `{key}` must be an integer")))
    }
    /// A boolean parameter.
    pub fn bool(&self, key: &str) -> Result<bool> {
        self.raw(key)?
            .as_bool()
            .ok_or_else(|| Error::invalid(format!("parameter `{key}` must be a boolean")))
    }
    /// A string parameter.
    pub fn str(&self, key: &str) -> Result<&str> {
        self.raw(key)?
            .as_str()
            .ok_or_else(|| Error::invalid(format!("parameter `{key}` must be a string")))
    }
    /// One parameter as a typed value, for example a `#[derive(Deserialize)]` enum of the values
    /// the schema's `enum` lists: an unknown value is an error naming the key and the variants.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<T> {
        let value = self.raw(key)?.clone();
        T::deserialize(Keyed { key, value }).map_err(|e| Error::invalid(e.0))
    }
    /// Deserializes the whole object into a typed struct; an error names the parameter.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        let entries = self.0.iter().map(|(key, value)| {
            (
                key.as_str(),
                Keyed {
                    key,
                    value: value.clone(),
                },
            )
        });
        T::deserialize(MapDeserializer::new(entries)).map_err(|e: DeError| Error::invalid(e.0))
    }
    /// Resolves these parameters against `schema` (see [`Schema::resolve`]): unknown keys refused,
    /// defaults filled, type, bounds and `enum` checked, so a plugin behaves the same whether or
    /// not the host checked first. A schema that does not parse is the plugin's bug
    /// ([`Status::Failed`](crate::Status::Failed)); a bad value is
    /// [`Status::InvalidInput`](crate::Status::InvalidInput) naming the parameter.
    pub fn resolve(&self, schema: &str) -> Result<Params> {
        let schema = Schema::parse(schema).map_err(|e| Error::failed(format!("plugin bug: {e}")))?;
        schema
            .resolve(&self.0)
            .map(Params)
            .map_err(|e| Error::invalid(e.to_string()))
    }
}

/// A deserialization error, already worded for the user.
#[derive(Debug)]
struct DeError(String);

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<M: fmt::Display>(msg: M) -> Self {
        DeError(msg.to_string())
    }
    fn missing_field(field: &'static str) -> Self {
        DeError(format!("parameter `{field}` is missing"))
    }
    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        DeError(format!("unknown parameter `{field}` (known: {})", expected.join(", ")))
    }
}

/// One parameter's value; its errors carry the parameter's name.
struct Keyed<'a> {
    key: &'a str,
    value: Value,
}

impl<'de> IntoDeserializer<'de, DeError> for Keyed<'_> {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

macro_rules! forward {
    ($($method:ident($($arg:ident: $ty:ty),*);)*) => {$(
        fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> std::result::Result<V::Value, DeError> {
            let key = self.key;
            self.value
                .$method($($arg,)* visitor)
                .map_err(|e| DeError(format!("parameter `{key}`: {e}")))
        }
    )*};
}

impl<'de> Deserializer<'de> for Keyed<'_> {
    type Error = DeError;

    forward! {
        deserialize_any(); deserialize_bool(); deserialize_i8(); deserialize_i16(); deserialize_i32();
        deserialize_i64(); deserialize_i128(); deserialize_u8(); deserialize_u16(); deserialize_u32();
        deserialize_u64(); deserialize_u128(); deserialize_f32(); deserialize_f64(); deserialize_char();
        deserialize_str(); deserialize_string(); deserialize_bytes(); deserialize_byte_buf();
        deserialize_option(); deserialize_unit(); deserialize_seq(); deserialize_map();
        deserialize_identifier(); deserialize_ignored_any();
        deserialize_unit_struct(name: &'static str);
        deserialize_newtype_struct(name: &'static str);
        deserialize_tuple(len: usize);
        deserialize_tuple_struct(name: &'static str, len: usize);
        deserialize_struct(name: &'static str, fields: &'static [&'static str]);
        deserialize_enum(name: &'static str, variants: &'static [&'static str]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Status;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "kebab-case")]
    enum Schedule {
        Step,
        Cosine,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Typed {
        epochs: usize,
        schedule: Schedule,
        note: Option<String>,
        #[serde(default)]
        extra: bool,
    }

    fn params(v: Value) -> Params {
        Params(v.as_object().cloned().unwrap())
    }

    #[test]
    fn parse_reads_a_struct_and_errors_name_the_parameter() {
        let p = params(json!({"epochs": 3, "schedule": "cosine", "note": null, "ignored": [1]}));
        let t: Typed = p.parse().unwrap();
        assert_eq!(
            t,
            Typed {
                epochs: 3,
                schedule: Schedule::Cosine,
                note: None,
                extra: false
            }
        );
        for (v, words) in [
            (
                json!({"epochs": 3, "schedule": "linear"}),
                &["parameter `schedule`", "unknown variant `linear`", "`step`"][..],
            ),
            (
                json!({"epochs": 2.5, "schedule": "step"}),
                &["parameter `epochs`", "2.5"],
            ),
            (json!({"epochs": -1, "schedule": "step"}), &["parameter `epochs`"]),
            (json!({"schedule": "step"}), &["parameter `epochs` is missing"]),
        ] {
            let e = params(v).parse::<Typed>().unwrap_err();
            assert_eq!(e.status, Status::InvalidInput);
            assert!(words.iter().all(|w| e.message.contains(w)), "{}", e.message);
        }
    }

    #[test]
    fn get_reads_one_typed_parameter() {
        let p = params(json!({"schedule": "step", "n": 4}));
        assert_eq!(p.get::<Schedule>("schedule").unwrap(), Schedule::Step);
        assert_eq!(p.get::<u8>("n").unwrap(), 4);
        let e = params(json!({"schedule": "Step"}))
            .get::<Schedule>("schedule")
            .unwrap_err();
        assert!(
            e.message.contains("parameter `schedule`") && e.message.contains("unknown variant `Step`"),
            "{}",
            e.message
        );
        assert!(p
            .get::<Schedule>("nope")
            .unwrap_err()
            .message
            .contains("`nope` is missing"));
    }

    #[test]
    fn resolve_fills_defaults_and_tells_plugin_bugs_from_bad_input() {
        let schema = r#"{"type":"object","additionalProperties":false,"properties":{
            "n":{"type":"integer","default":2,"minimum":1,"description":"count"}}}"#;
        assert_eq!(params(json!({})).resolve(schema).unwrap().i64("n").unwrap(), 2);
        let e = params(json!({"n": 0})).resolve(schema).unwrap_err();
        assert_eq!(e.status, Status::InvalidInput);
        assert!(e.message.contains("`n`"), "{}", e.message);
        let e = params(json!({})).resolve(r#"{"type":"object"}"#).unwrap_err();
        assert_eq!(e.status, Status::Failed);
        assert!(e.message.contains("plugin bug"), "{}", e.message);
    }
}
