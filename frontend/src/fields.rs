//! A request body as its top-level fields, each kept as raw JSON until it is read as its
//! type: an error then names the field (serde alone names only a line and column), and
//! client JSON inside (tool schemas, arguments) keeps its key order for the chat template.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use crate::api_error::{ApiError, ApiResult};

pub struct Fields {
    map: BTreeMap<String, Box<RawValue>>,
}

impl Fields {
    pub fn parse(body: &[u8]) -> ApiResult<Self> {
        let map = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not a JSON object: {e}")))?;
        Ok(Fields { map })
    }

    /// The field as `T`; None when absent or null.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> ApiResult<Option<T>> {
        match self.map.get(name) {
            None => Ok(None),
            Some(raw) if raw.get() == "null" => Ok(None),
            Some(raw) => serde_json::from_str(raw.get())
                .map(Some)
                .map_err(|e| ApiError::field(name, strip_position(&e))),
        }
    }

    pub fn raw(&self, name: &str) -> Option<&RawValue> {
        self.map.get(name).map(|r| &**r).filter(|r| r.get() != "null")
    }

    pub fn has(&self, name: &str) -> bool {
        self.raw(name).is_some()
    }
}

/// serde's message without " at line 1 column 7", which means nothing for one field.
pub fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(at) => s[..at].to_owned(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_type_names_its_field() {
        let f = Fields::parse(br#"{"temperature": "hot", "n": null, "stop": ["a"]}"#).unwrap();
        let e = f.get::<f32>("temperature").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        assert!(
            e.message.starts_with("temperature: invalid type: string \"hot\""),
            "{}",
            e.message
        );
        assert_eq!(f.get::<u32>("n").unwrap(), None);
        assert_eq!(f.get::<Vec<String>>("stop").unwrap(), Some(vec!["a".to_owned()]));
        assert_eq!(f.get::<u32>("absent").unwrap(), None);
    }

    #[test]
    fn a_body_that_is_not_an_object_is_refused() {
        for body in [&b"{"[..], b"[1]", b"", b"{\"a\": 1,}"] {
            let e = Fields::parse(body).err().unwrap();
            assert_eq!(e.status.as_u16(), 400);
            assert!(e.message.starts_with("the request body is not a JSON object"));
        }
    }
}
