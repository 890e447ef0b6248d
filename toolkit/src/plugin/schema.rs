//! Plugin parameter schemas. The rules and their one implementation live in the SDK
//! (`audit_sdk::schema`), which the plugins use too: the host checks a plugin's schema when it
//! loads it ([`Schema::parse`]) and resolves every call's `--param KEY=VALUE` against it
//! ([`Schema::resolve_args`]) before the plugin sees them.

pub use audit_sdk::schema::{Param, ParamError, ParamType, Schema, SchemaError};
