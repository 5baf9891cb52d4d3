//! Generic CBOR → JSON for displaying and comparing decoded payloads (verification side).

use base64::Engine;
use ciborium::Value;
use serde_json::{Map, Number, Value as Json};

/// Converts a CBOR value to JSON: text-keyed maps to objects (other keys stringified), tags
/// unwrapped (tag 0 date-time strings, 1004 dates…), byte strings to base64.
pub fn to_json(v: &Value) -> Json {
    match v {
        Value::Integer(i) => {
            let i = i128::from(*i);
            if let Ok(n) = i64::try_from(i) {
                Json::Number(n.into())
            } else if let Ok(n) = u64::try_from(i) {
                Json::Number(n.into())
            } else {
                Json::String(i.to_string())
            }
        }
        Value::Float(f) => Number::from_f64(*f).map(Json::Number).unwrap_or(Json::Null),
        Value::Text(s) => Json::String(s.clone()),
        Value::Bytes(b) => Json::String(base64::engine::general_purpose::STANDARD.encode(b)),
        Value::Bool(b) => Json::Bool(*b),
        Value::Null => Json::Null,
        Value::Tag(_, inner) => to_json(inner),
        Value::Array(a) => Json::Array(a.iter().map(to_json).collect()),
        Value::Map(m) => {
            let mut o = Map::new();
            for (k, v) in m {
                let key = match k {
                    Value::Text(s) => s.clone(),
                    other => match to_json(other) {
                        Json::String(s) => s,
                        j => j.to_string(),
                    },
                };
                o.insert(key, to_json(v));
            }
            Json::Object(o)
        }
        _ => Json::Null,
    }
}
