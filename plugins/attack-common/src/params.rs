//! The parameters every attack shares. Schemas are checked and resolved by the SDK
//! (`audit_sdk::schema`, [`Params::resolve`]), as in the host.

use audit_sdk::serde_json::{Map, Value};
use audit_sdk::{DatasetRef, Error, Params, Result};
use serde::Deserialize;

/// `poison_rate` used when `adaptive` is true (the low-rate "slow poisoning" setting).
pub const ADAPTIVE_POISON_RATE: f64 = 0.003;

/// How poisoned samples are relabelled (the schema's `mode`: `all-to-one`, `all-to-all`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Every poisoned sample gets the target class.
    AllToOne,
    /// A poisoned sample of class `y` gets `(y + 1) mod K`.
    AllToAll,
}

impl Mode {
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
            mode: p.get("mode")?,
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

#[cfg(test)]
mod tests {
    use super::*;
    use audit_sdk::schema::{check_enum, Schema};
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
    fn common_properties_are_a_valid_schema_and_mode_matches_its_enum() {
        let s = Schema::parse(SCHEMA).unwrap();
        let names: Vec<&str> = s.params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["target", "mode", "poison_rate", "adaptive", "size"]);
        check_enum::<Mode>(SCHEMA, "mode").unwrap();
    }

    #[test]
    fn defaults_are_filled_and_overrides_kept() {
        let p = given(json!({"target": 2, "size": 5})).resolve(SCHEMA).unwrap();
        assert_eq!(p.i64("target").unwrap(), 2);
        assert_eq!(p.i64("size").unwrap(), 5);
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
            // An integer parameter takes a JSON integer: 5.0 is refused (the host's rule), where
            // this crate used to round it.
            (json!({"size": 5.0}), "size"),
        ] {
            let e = given(v).resolve(SCHEMA).unwrap_err();
            assert_eq!(e.status, audit_sdk::Status::InvalidInput);
            assert!(e.message.contains(&format!("`{word}`")), "{}", e.message);
        }
    }

    #[test]
    fn unresolved_params_are_still_checked() {
        // Without the schema's resolution, from_params still refuses what the schema would.
        let base = json!({"target": 0, "mode": "all-to-one", "poison_rate": 0.1, "adaptive": false});
        assert!(CommonParams::from_params(&given(base.clone())).is_ok());
        for (key, bad, word) in [
            ("mode", json!("sideways"), "unknown variant `sideways`"),
            ("target", json!(-1), ">= 0"),
            ("poison_rate", json!(2.0), "0..1"),
        ] {
            let mut v = base.clone();
            v[key] = bad;
            let e = CommonParams::from_params(&given(v)).unwrap_err();
            assert!(
                e.message.contains(&format!("`{key}`")) && e.message.contains(word),
                "{}",
                e.message
            );
        }
    }

    #[test]
    fn adaptive_overrides_rate_and_labels_follow_mode() {
        let p = given(json!({"adaptive": true, "mode": "all-to-all"}))
            .resolve(SCHEMA)
            .unwrap();
        let c = CommonParams::from_params(&p).unwrap();
        assert_eq!(c.effective_rate(), ADAPTIVE_POISON_RATE);
        assert_eq!(c.weakening(), 0.5);
        assert_eq!(c.target_label(3, 10), 4);
        assert_eq!(c.target_label(9, 10), 0);
        assert_eq!(c.report()["target"], Value::Null);
    }
}
